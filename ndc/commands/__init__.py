"""One module per ``ndc`` subcommand; each defines a click command named ``command``."""

"""docs/cli.md, generated from the commands' own ``--help`` (``python -m ndc.clidoc > docs/cli.md``).

A test regenerates it and compares, so the reference never drifts from the code.
"""

from __future__ import annotations

from click.testing import CliRunner

from ndc.cli import COMMANDS, main

HEADER = """# Command-line reference

Generated from `ndc --help` and `ndc COMMAND --help` by `python -m ndc.clidoc > docs/cli.md`;
`tests/test_cli_docs.py` fails when this page and the code disagree.

Conventions: every command takes `-w/--workspace DIR` (default `./ndc-work`) and `--format text|json`;
with `json` exactly one JSON document goes to stdout when the command succeeds (nothing when it fails),
progress and warnings to stderr. `distill`, `finetune` and `kd`, the commands that train, take `--quiet`
(no progress; warnings still go to stderr). A user error is one line, `Error: ...`, with exit status 1. Exit status 2 is a command line that does not parse (an unknown
option, a value of the wrong type or outside a declared range: click's usage error); a value that parses but
is checked later (a spec, a shape, a device, a NaN rate) is a user error, exit status 1.
Ctrl-C exits with status 130, SIGTERM with 143; either stops the command's workers and keeps what it finished.
"""


def help_text(args: list[str]) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], prog_name="ndc", terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output.rstrip() + "\n"


def render() -> str:
    parts = [HEADER, "## ndc\n", "```", help_text([]).rstrip(), "```\n"]
    for name in COMMANDS:
        parts += [f"## ndc {name}\n", "```", help_text([name]).rstrip(), "```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")

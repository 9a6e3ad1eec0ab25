"""The ``ndc`` command line: a click group whose commands live in ``ndc/commands``.

Each command parses its options, calls the library, and prints. Shared options
(``-w/--workspace``, ``--format``) are defined once in :mod:`ndc.commands.common`.
"""

from __future__ import annotations

import importlib
import signal
import threading

import click

from ndc import __version__

# command name -> module in ndc.commands that defines a click command called `command`.
# Imported lazily so `ndc --help` does not pay for torch.
COMMANDS = {
    "partition": "partition",
    "distill": "distill",
    "stitch": "stitch",
    "finetune": "finetune",
    "search": "search",
    "probe": "probe",
    "eval": "evaluate",
    "kd": "kd",
    "data": "data",
    "demo": "demo",
}

_HELP = {
    "partition": "Trace a teacher and cut it into neighbourhoods.",
    "distill": "Rewrite and train a student for every neighbourhood.",
    "stitch": "Recombine trained students and export the model.",
    "finetune": "End-to-end knowledge distillation of the stitched student.",
    "search": "Student Search: pick one candidate per neighbourhood.",
    "probe": "The thresholding effect: accuracy against noise per neighbourhood.",
    "eval": "Accuracy and agreement with the teacher on a data set.",
    "kd": "End-to-end baselines: the same student trained from scratch.",
    "data": "Show what a data spec resolves to.",
    "demo": "The whole pipeline on an embedded default.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._module(name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = self._module(name)
        return None if module is None else module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _HELP[name]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    @staticmethod
    def _module(name: str):
        if name not in COMMANDS:
            return None
        try:
            return importlib.import_module(f"ndc.commands.{COMMANDS[name]}")
        except ModuleNotFoundError as e:
            if e.name == f"ndc.commands.{COMMANDS[name]}":
                return None
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ndc")
@click.pass_context
def main(ctx: click.Context) -> None:
    """ndc, the Neighbourhood Distillation Compiler.

    Cut a trained teacher into neighbourhoods, distil a smaller student for each
    one independently, stitch them back, and export the result.

    \b
      ndc partition model.pt --by residual --trust-pickle
      ndc distill --width 0.5 --data fashion-mnist
      ndc stitch -o student.onnx
    """
    _stop_on_sigterm(ctx)


def _stop_on_sigterm(ctx: click.Context) -> None:
    """A SIGTERM (``kill``, a batch scheduler, systemd) stops a command as a Ctrl-C does: workers stopped, finished
    artefacts kept, exit status 143 (it used to die at once, leaving the pool's semaphores to the resource tracker)."""
    if threading.current_thread() is not threading.main_thread():
        return
    from ndc.errors import Terminated

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))

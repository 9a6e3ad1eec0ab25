"""Progress on stderr: a bar with an ETA on a terminal, and one line per finished piece of work.

``--quiet`` silences both; ``--format json`` silences the bar (stdout belongs
to the JSON document; the lines stay on stderr, as every log does).
"""

from __future__ import annotations

import sys

import click


class Progress:
    """One bar over ``total`` units (candidate-steps for distill, epochs for finetune and kd)."""

    def __init__(self, total: int, what: str, *, quiet: bool = False, bar: bool = True):
        self.quiet = quiet
        self.bar = None
        if bar and not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit="step" if what == "distill" else "epoch", file=sys.stderr,
                            dynamic_ncols=True, leave=False, smoothing=0.1)

    def advance(self, n: float, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def grow(self, n: int) -> None:
        """More work than planned (a resumed run's, or a second phase)."""
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        """Something the user should hear even with --quiet."""
        line = f"warning: {message}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            click.echo(line, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The one exception type a user can cause.

Library code raises :class:`NdcError` with a message that fits on one line and
says what to do; the CLI turns it into ``Error: ...`` and exit status 1.
Anything else escaping to the CLI is a bug in ndc. The helpers below shape
what goes into such messages.
"""

from __future__ import annotations


class Terminated(KeyboardInterrupt):
    """SIGTERM to a command: raised in its main thread like a Ctrl-C, so that it stops its workers, keeps what it
    finished, and exits 143."""


class NdcError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def fmt_shape(shape) -> str:
    """``(1, 3, 32, 32)`` -> ``1x3x32x32`` (``()`` for a scalar's empty shape)."""
    return "x".join(str(int(d)) for d in shape) or "()"


def first_line(e: BaseException, width: int = 200) -> str:
    """The first non-empty line of an exception's message (its type's name if none), at most ``width`` characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return _clip(lines[0] if lines else type(e).__name__, width)


def one_line(e: BaseException, width: int = 160) -> str:
    """An exception's whole message on one line, at most ``width`` characters."""
    return _clip(" ".join(str(e).split()), width)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 epoch", "3 epochs", "2 batches" (with ``plural``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def a_or_an(word: str) -> str:
    """``word`` after its indefinite article: "an ImageClassifierOutput", "a SequenceClassifierOutput"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"

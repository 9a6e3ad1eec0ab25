"""The one exception type a user can cause.

Library code raises :class:`NdcError` with a message that fits on one line and
says what to do; the CLI turns it into ``Error: ...`` and exit status 1.
Anything else escaping to the CLI is a bug in ndc.
"""

from __future__ import annotations


class NdcError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

"""Where jobs run: in this process, in a pool of local processes, or on Ray. See :mod:`ndc.backends.base`."""

from ndc.backends.base import Backend, make_backend

__all__ = ["Backend", "make_backend"]

"""Finding a user's function from ``module:function`` or ``file.py:function`` (data sources, metrics)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ndc.errors import NdcError


def working_folder_importable() -> None:
    """Let user code import modules from the working folder, as under ``python -m ndc`` (the ``ndc`` script's
    ``sys.path`` starts at the script's own folder instead). Appended, so an installed module of the same name wins."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)


def is_function_spec(spec: str) -> bool:
    """Whether ``spec`` reads as ``target:function`` (a function name after the last colon)."""
    target, sep, attr = spec.rpartition(":")
    return bool(sep and target and attr.isidentifier())


def find_function(spec: str, example: str, alternatives: str = "") -> tuple[Callable, Path | None]:
    """The callable ``spec`` names and the file that defines it (None for a module without one).

    ``example`` is a file name for the hint when the module cannot be
    imported (``data.py`` gives "give a path like data.py:load"), followed by
    ``alternatives`` when given ("or one of ...").
    """
    from ndc.load import _import_file

    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise NdcError(f"{target}: no such file")
        module, file = _import_file(path), path
    else:
        working_folder_importable()
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            other = f" or one of {alternatives}" if alternatives else ""
            raise NdcError(f"cannot import module {target!r} ({e}); give a path like {example}:{attr}{other}") from None
        file = Path(module.__file__) if getattr(module, "__file__", None) else None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise NdcError(f"{target} has no callable {attr!r}")
    return fn, file

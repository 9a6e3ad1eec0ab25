"""The registry of data sources: which code opens a ``--data SPEC``.

A spec is matched, in this order, by

1. its **prefix**, the text before the first colon (``fashion-mnist``,
   ``mnist:DIR``, ``digits``, ``imagefolder:DIR``);
2. its **suffix** (``file.npz``);
3. otherwise ``module:function`` / ``file.py:function``, user code.

An opener is called as ``open(spec, argument)``: for a prefix the argument is
the text after the colon ("" when there is none), for a suffix and user code
the whole spec. It returns a :class:`~ndc.data.splits.Raw` and raises
:class:`~ndc.errors.NdcError` with one line for anything the user can fix.
Adding a source is one entry in :data:`SOURCES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ndc.data import folders, idx, npz, user
from ndc.data.splits import Raw
from ndc.errors import NdcError
from ndc.usercode import is_function_spec

Opener = Callable[[str, str], Raw]


@dataclass(frozen=True)
class SourceEntry:
    match: str      # "prefix" or "suffix"
    key: str        # the prefix (without colon) or the suffix (with its dot)
    open: Opener
    usage: str      # how a user writes it, for help texts


SOURCES: tuple[SourceEntry, ...] = (
    SourceEntry("prefix", "fashion-mnist", idx.open_fashion_mnist, "fashion-mnist[:DIR]"),
    SourceEntry("prefix", "mnist", idx.open_mnist, "mnist:DIR"),
    SourceEntry("prefix", "digits", idx.open_digits, "digits"),
    SourceEntry("suffix", ".npz", npz.open_npz, "file.npz"),
    SourceEntry("prefix", "imagefolder", folders.open_imagefolder, "imagefolder:DIR"),
)
USER_CODE = "module:function or file.py:function"
TOKENS = "text:FILE[,TOKENIZER]"  # token ids (and integer .npz files) are opened by ndc.tokens before this registry
DATA_SPEC_HELP = ", ".join(e.usage for e in SOURCES) + ", " + TOKENS + ", " + USER_CODE


def resolve(spec: str) -> Raw:
    """Parse SPEC and open its files (lazily where the format allows)."""
    name, _, arg = spec.partition(":")
    for entry in SOURCES:
        if entry.match == "prefix" and entry.key == name:
            return entry.open(spec, arg)
    for entry in SOURCES:
        if entry.match == "suffix" and spec.endswith(entry.key):
            return entry.open(spec, spec)
    if is_function_spec(spec):
        return user.open_function(spec, spec)
    raise NdcError(f"unknown data spec {spec!r}; expected {DATA_SPEC_HELP}")

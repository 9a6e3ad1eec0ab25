"""Exported model files: the one table of suffixes, and the one way to load a file back.

| format | suffixes | safe to load | written by |
|---|---|---|---|
| ``onnx`` | ``.onnx`` | yes (onnxruntime) | :func:`ndc.passes.export.export_model` |
| ``pt2`` | ``.pt2`` | yes (``torch.export.load``) | the same |
| ``pt`` | ``.pt``, ``.pth``, ``.pkl``, ``.pickle`` | no: a pickle, trusted only | the same |

:func:`load_exported` is used both by export (to verify the file it just
wrote) and by ``ndc eval`` (to score a file a user gives), so what is
verified is what is evaluated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from ndc.errors import NdcError, first_line


@dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]
    safe: bool  # loading it runs no code


FORMATS = (
    Format("onnx", (".onnx",), True),
    Format("pt2", (".pt2",), True),
    Format("pt", (".pt", ".pth", ".pkl", ".pickle"), False),
)
SUFFIXES = {suffix: f for f in FORMATS for suffix in f.suffixes}
SUFFIX_HELP = ".onnx or .pt2 (safe to load) or .pt (pickled, trusted-only)"


def format_of(path: str | os.PathLike, doing: str = "export to") -> Format:
    """The :class:`Format` of ``path`` by its suffix; anything else is one :class:`NdcError` line."""
    path = Path(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        what = f"unknown suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise NdcError(f"cannot {doing} {path}: {what}; use {SUFFIX_HELP}")
    return fmt


class Predictor:
    """A loaded model file: ``predictor(x)`` gives its first output (a CPU tensor), ``outputs(x)`` all of them (numpy).

    ``kind`` is the format's name; ``input_shape`` the per-example input shape
    the file declares (without the batch dimension), or None when it does not
    say (a pickled module); ``module`` the torch module behind a .pt2/.pt file
    (None for onnx); ``latency_target`` what to time; ``sigmoid_output``
    whether the file's output is made by a sigmoid (probabilities).
    """

    def __init__(self, outputs: Callable[[torch.Tensor], list[np.ndarray]], kind: str, path: Path,
                 input_shape: tuple[int, ...] | None, latency_target: Any, module: Any = None,
                 sigmoid_output: bool = False):
        self.outputs = outputs
        self.kind, self.path, self.input_shape = kind, path, input_shape
        self.latency_target, self.module, self.sigmoid_output = latency_target, module, sigmoid_output

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.outputs(x)[0]))

    def __repr__(self) -> str:
        return f"Predictor({self.kind}, {str(self.path)!r})"


def load_exported(path: str | os.PathLike, *, trust_pickle: bool = False, threads: int = 1) -> Predictor:
    """Open a model file by its suffix: ``.onnx`` (onnxruntime, ``threads`` intra-op threads), ``.pt2``
    (``torch.export.load``), a pickle only with ``trust_pickle``."""
    path = Path(path)
    if not path.exists():
        raise NdcError(f"{path}: no such file")
    if path.is_dir():
        raise NdcError(f"{path} is a folder, not a model file")
    fmt = format_of(path, "evaluate")
    if fmt.name == "onnx":
        return _load_onnx(path, threads)
    if fmt.name == "pt2":
        return _load_pt2(path, trust_pickle)
    if not trust_pickle:
        raise NdcError(f"refusing to unpickle {path}: loading a pickled module can run arbitrary code; "
                       "pass --trust-pickle if you made or trust this file, or evaluate the .onnx or .pt2 export")
    from ndc.load import load_model

    module = load_model(str(path), trust_pickle=True).model.eval()
    return Predictor(_torch_outputs(module), "pt", path, None, module, module)


def _load_onnx(path: Path, threads: int) -> Predictor:
    from ndc.report import ort_session

    try:
        session = ort_session(path, threads=threads)
    except Exception as e:
        raise NdcError(f"{path} is not a readable ONNX model: {first_line(e)}") from None
    inp = session.get_inputs()[0]
    dims = list(inp.shape)
    per_example = tuple(dims[1:]) if all(isinstance(d, int) for d in dims[1:]) else None
    fixed_batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    name = inp.name
    dtype = np.int64 if inp.type == "tensor(int64)" else np.float32  # token ids stay integers

    def outputs(x: torch.Tensor) -> list[np.ndarray]:
        array = x.detach().cpu().numpy().astype(dtype, copy=False)
        if fixed_batch is None or len(array) == fixed_batch:
            return list(session.run(None, {name: array}))
        # A file exported with a fixed batch size: run it in chunks of that size, zero-padding the last.
        chunks = []
        for start in range(0, len(array), fixed_batch):
            chunk = array[start:start + fixed_batch]
            n = len(chunk)
            if n < fixed_batch:
                chunk = np.concatenate([chunk, np.zeros((fixed_batch - n, *chunk.shape[1:]), chunk.dtype)])
            chunks.append([o[:n] for o in session.run(None, {name: chunk})])
        return [np.concatenate(parts) for parts in zip(*chunks)]

    return Predictor(outputs, "onnx", path, per_example, session, sigmoid_output=_onnx_sigmoid(path))


def _onnx_sigmoid(path: Path) -> bool:
    """Whether the first graph output is made by a Sigmoid node (the file's output is probabilities)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - onnxruntime read it; a detail we cannot read is not an error
        return False
    first = graph.output[0].name if graph.output else None
    return any(node.op_type == "Sigmoid" and first in node.output for node in graph.node)


def _load_pt2(path: Path, trust_pickle: bool = False) -> Predictor:
    from ndc.load import read_program

    program = read_program(path, trust_pickle)
    module = program.module()
    return Predictor(_torch_outputs(module), "pt2", path, _program_input_shape(program), module, module)


def _program_input_shape(program: Any) -> tuple[int, ...] | None:
    """The per-example shape of an exported program's first user input, when every dimension after the batch is fixed."""
    try:
        first = program.graph_signature.user_inputs[0]
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)
        dims = node.meta["val"].shape[1:]
        return tuple(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None
    except (IndexError, KeyError, StopIteration, AttributeError):
        return None


def _torch_outputs(module: Callable) -> Callable[[torch.Tensor], list[np.ndarray]]:
    def outputs(x: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.detach().cpu().numpy() for t in tree_leaves(module(x)) if isinstance(t, torch.Tensor)]

    return outputs

"""Evaluation: accuracy on a data set, and agreement with the teacher.

``evaluate`` takes whatever a user has at hand: an ``nn.Module`` (a teacher,
a stitched student), a ``torch.export`` program, an onnxruntime session, or
the result of :func:`load_for_eval` on an exported file. Every model sees the
same batches in the same order, so two models evaluated on the same
:class:`~ndc.data.DataSource` are compared example by example.

* ``accuracy``: fraction of examples whose arg-max class is the label.
* ``agreement``: fraction of examples where model and teacher predict the same
  class (the student's fidelity, independent of the labels).

Files are opened safely: ``.onnx`` with onnxruntime, ``.pt2`` with
``torch.export.load``. A ``.pt`` (a pickled module) can run code when it is
loaded, so :func:`load_for_eval` refuses it unless ``trust_pickle=True``.

>>> data = open_data("digits", (3, 32, 32), limit=200)            # doctest: +SKIP
>>> evaluate(load_for_eval("student.onnx"), data, teacher=teacher.gm)   # doctest: +SKIP
{'accuracy': 0.91, 'teacher_accuracy': 0.93, 'agreement': 0.96, 'examples': 200}
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ndc.errors import NdcError, first_line

if TYPE_CHECKING:
    from ndc.data import DataSource

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle")


class Predictor:
    """A loaded model as evaluation sees it: ``predictor(x) -> logits`` (torch tensors, on the CPU).

    ``kind`` is ``onnx``, ``pt2`` or ``pt``; ``input_shape`` is the per-example
    input shape the file declares (without the batch dimension), or None when
    the file does not say (a pickled module).
    """

    def __init__(self, fn: Callable[[torch.Tensor], Any], kind: str, path: Path, input_shape: tuple[int, ...] | None,
                 module: nn.Module | None = None):
        self._fn = fn
        self.kind = kind
        self.path = path
        self.input_shape = input_shape
        self.module = module  # the torch module behind a .pt2/.pt predictor (None for onnx)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def __repr__(self) -> str:
        return f"Predictor({self.kind}, {str(self.path)!r})"


def load_for_eval(path: str | os.PathLike, *, trust_pickle: bool = False) -> Predictor:
    """Open an exported model for evaluation: ``.onnx`` (onnxruntime), ``.pt2`` (torch.export.load), ``.pt`` (trusted only)."""
    path = Path(path)
    if not path.exists():
        raise NdcError(f"{path}: no such file")
    if path.is_dir():
        raise NdcError(f"{path} is a folder, not a model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _load_onnx(path)
    if suffix == ".pt2":
        return _load_pt2(path)
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise NdcError(f"refusing to unpickle {path}: loading a pickled module can run arbitrary code; "
                           "pass --trust-pickle if you made or trust this file, or evaluate the .onnx or .pt2 export")
        from ndc.load import load_model

        module = load_model(str(path), trust_pickle=True).model.eval()
        return Predictor(_torch_fn(module), "pt", path, None, module)
    raise NdcError(f"cannot evaluate {path}: unknown suffix {path.suffix!r}; expected .onnx, .pt2 or .pt (trusted-only)")


def _load_onnx(path: Path) -> Predictor:
    from ndc.report import ort_session

    try:
        session = ort_session(path, threads=torch.get_num_threads())
    except Exception as e:
        raise NdcError(f"{path} is not a readable ONNX model: {first_line(e)}") from None
    inp = session.get_inputs()[0]
    dims = list(inp.shape)
    per_example = tuple(dims[1:]) if all(isinstance(d, int) for d in dims[1:]) else None
    fixed_batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    name = inp.name

    def run(x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy().astype(np.float32, copy=False)
        if fixed_batch is None or len(array) == fixed_batch:
            return torch.from_numpy(session.run(None, {name: array})[0])
        # A file exported with a fixed batch size: run it in chunks of that size, zero-padding the last.
        outs = []
        for start in range(0, len(array), fixed_batch):
            chunk = array[start:start + fixed_batch]
            n = len(chunk)
            if n < fixed_batch:
                chunk = np.concatenate([chunk, np.zeros((fixed_batch - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(session.run(None, {name: chunk})[0][:n])
        return torch.from_numpy(np.concatenate(outs))

    return Predictor(run, "onnx", path, per_example)


def _load_pt2(path: Path) -> Predictor:
    try:
        program = torch.export.load(path)
    except Exception as e:
        raise NdcError(f"{path} is not a readable torch.export archive: {first_line(e)}") from None
    module = program.module()
    return Predictor(_torch_fn(module), "pt2", path, _program_input_shape(program), module)


def _program_input_shape(program: Any) -> tuple[int, ...] | None:
    """The per-example shape of an exported program's first user input, when every dimension after the batch is fixed."""
    try:
        first = program.graph_signature.user_inputs[0]
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)
        dims = node.meta["val"].shape[1:]
        return tuple(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None
    except (IndexError, KeyError, StopIteration, AttributeError):
        return None


def _torch_fn(module: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


# ------------------------------------------------------------------ evaluate


def evaluate(model: Any, data: DataSource, *, split: str = "test", teacher: Any = None, batch_size: int = 256,
             device: str = "cpu") -> dict:
    """Accuracy of ``model`` on ``data``'s ``split``; with ``teacher``, also the teacher's accuracy and agreement.

    ``model`` and ``teacher``: an ``nn.Module`` (run in eval mode under
    ``torch.no_grad`` on ``device``; its mode is restored afterwards, but it
    stays on ``device``), a ``torch.export.ExportedProgram``, an onnxruntime
    session, a :class:`Predictor`, or any callable from a float tensor to
    logits ``(batch, classes)``. Returns ``{"accuracy", "examples"}`` plus
    ``"teacher_accuracy"`` and ``"agreement"`` when a teacher is given.
    """
    with contextlib.ExitStack() as stack, torch.no_grad():
        run = stack.enter_context(_runner(model, device, "the model"))
        run_teacher = stack.enter_context(_runner(teacher, device, "the teacher")) if teacher is not None else None
        n = correct = teacher_correct = agree = 0
        for x, y in data.batches(split, batch_size):
            pred = _predict(run, x, data, "the model")
            n += len(y)
            correct += int((pred == y).sum())
            if run_teacher is not None:
                teacher_pred = _predict(run_teacher, x, data, "the teacher")
                teacher_correct += int((teacher_pred == y).sum())
                agree += int((pred == teacher_pred).sum())
    if n == 0:
        raise NdcError(f"the {split} split of {data.name} has no examples")
    result: dict[str, Any] = {"accuracy": correct / n}
    if run_teacher is not None:
        result["teacher_accuracy"] = teacher_correct / n
        result["agreement"] = agree / n
    result["examples"] = n
    return result


@contextlib.contextmanager
def _runner(model: Any, device: str, what: str) -> Iterator[Callable[[torch.Tensor], Any]]:
    """``model`` as a function of a CPU batch; an nn.Module runs in eval mode on ``device`` (its mode restored after)."""
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if type(model).__module__.startswith("onnxruntime"):
        session = model
        name = session.get_inputs()[0].name
        yield lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        return
    if isinstance(model, Predictor):
        yield model
        return
    if isinstance(model, nn.Module):
        was_training = model.training
        with contextlib.suppress(NotImplementedError):  # torch.export modules refuse eval()
            model.eval()
        try:
            model.to(device)
        except Exception as e:
            raise NdcError(f"cannot move {what} to {device}: {first_line(e)}") from None
        try:
            yield lambda x: model(x.to(device))
        finally:
            with contextlib.suppress(NotImplementedError):
                model.train(was_training)
        return
    if callable(model):
        yield model
        return
    raise NdcError(f"cannot evaluate {what}: a {type(model).__name__} is not a model")


def _predict(run: Callable[[torch.Tensor], Any], x: torch.Tensor, data: DataSource, what: str) -> torch.Tensor:
    try:
        out = run(x)
    except NdcError:
        raise
    except Exception as e:
        raise NdcError(f"{what} does not run on {data.name} batches of shape {'x'.join(map(str, x.shape))}: "
                       f"{type(e).__name__}: {first_line(e)}") from None
    leaves = [t for t in tree_leaves(out) if isinstance(t, (torch.Tensor, np.ndarray))]
    if not leaves:
        raise NdcError(f"{what} returned no tensor")
    logits = torch.as_tensor(leaves[0]).cpu()
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise NdcError(f"{what} returns shape {list(logits.shape)}; evaluation needs class scores of shape [batch, classes]")
    if logits.shape[1] < data.classes:
        raise NdcError(f"{what} scores {logits.shape[1]} classes but {data.name} has {data.classes}")
    return logits.argmax(dim=1)

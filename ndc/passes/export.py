"""export: write a model to ``.onnx``, ``.pt2`` or ``.pt``, and prove the file computes what the model does.

Invariant: when :func:`export_model` returns, ``path`` holds a file that, once
loaded the way a user would load it, gives the module's outputs within
``atol + rtol * |expected|`` at batch sizes 1, 7 and 64, on random inputs
other than the export example. Otherwise it raises :class:`NdcError`, leaves
whatever was at ``path`` before untouched, and (for a mismatch) writes a
repro report. The caller's module is never modified.

Formats, chosen by the file's suffix:

* ``.onnx`` -- the dynamo exporter (``torch.onnx.export(..., dynamo=True)``),
  a dynamic batch dimension, one self-contained file (no external data);
  checked with ``onnx.checker`` and compared against onnxruntime. Safe to
  load; the file to ship.
* ``.pt2`` -- a ``torch.export`` archive with a dynamic batch dimension,
  compared after ``torch.export.load(...).module()``. Safe to load (no
  pickled code).
* ``.pt`` -- ``torch.save`` of the whole module: **a pickle, trusted-only**.
  Loading it needs ``torch.load(weights_only=False)``, which can run
  arbitrary code, and the classes of its submodules must be importable. It is
  offered because it is what PyTorch users expect from ``.pt``; the report
  says ``"trusted_only": true``. (A safetensors state dict plus a recipe
  would be safe but is no deployable model on its own: rebuilding it needs
  ndc and the teacher's code, which is what a workspace already is.)

Every file is written to a temporary file beside the target, loaded back and
verified there, and only then renamed into place, so a failed export never
leaves a partial or unverified file at ``path``.

>>> report = export_model(student, "student.onnx", (1, 3, 32, 32))   # doctest: +SKIP
>>> report["max_abs_diff"], report["latency_ms"]                      # doctest: +SKIP
(2.4e-06, {'1': 0.41, '32': 6.2})
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ndc.errors import NdcError, first_line, fmt_shape
from ndc.formats import format_of, load_exported
from ndc.metrics import count_flops, count_params
from ndc.passes.inputs import FLOAT, InputSpec
from ndc.report import library_versions, measure_latency
from ndc.workspace import atomic_write, pid_alive, write_json_atomic

CHECK_BATCH_SIZES = (1, 7, 64)
# torch.export specialises a dimension whose example size is 0 or 1, so the
# example that fixes the graph has batch size 2 (never one of the checked sizes).
EXAMPLE_BATCH = 2
# A rejected file is copied into the repro report only up to this size.
REPRO_MODEL_LIMIT = 64 << 20


def export_model(module: nn.Module, path: str | os.PathLike, input_shape: Sequence[int], *, fold_bn: bool = False,
                 atol: float = 1e-4, rtol: float = 1e-3, check: bool = True, report_dir: Path | None = None,
                 latency_runs: int = 20, seed: int = 0, inputs: InputSpec | None = None) -> dict:
    """Export ``module`` to ``path`` (format by suffix), verify it, and return a report.

    ``input_shape`` is an example input shape including the batch dimension
    (its batch size is ignored: the batch dimension is dynamic).
    ``fold_bn`` folds every batch norm that directly follows a convolution
    into it first (see :mod:`ndc.passes.fold`), checked against the unfolded
    model with the same tolerance. ``check=False`` skips the output
    comparison (not ``onnx.checker``). A mismatch writes a repro report to
    ``report_dir`` (default: ``<path>.repro/`` beside the target) and raises.
    ``latency_runs=0`` skips the latency measurement. Inputs of the check are
    drawn from ``torch.Generator().manual_seed(seed)``, batch sizes in order;
    ``inputs`` says what they are (token ids for a language model; floats by
    default).

    The report: ``output``, ``format``, ``bytes``, ``max_abs_diff`` (over every
    checked batch size), ``checked_batch_sizes``, ``params``, ``flops`` (per
    example), ``latency_ms`` (median per batch size, onnxruntime for
    ``.onnx``, torch otherwise, one thread), ``folded_bn``, ``trusted_only``.
    """
    path = Path(path)
    fmt = check_output_path(path)
    shape = _input_shape(input_shape)
    inputs = inputs or FLOAT

    with _quiet_exporter():  # copying a torch.export graph warns of torch's own LeafSpec deprecation
        model = copy.deepcopy(module).eval()  # the caller's module stays as it was (mode included)
        folded = 0
        if fold_bn:
            model, folded = _fold(model, shape, atol, rtol, seed, inputs)

    with torch.no_grad():
        try:
            model(_example(shape, seed + 1, inputs))
        except Exception as e:
            raise NdcError(f"the model does not run on an input of shape {fmt_shape((EXAMPLE_BATCH, *shape[1:]))}: "
                           f"{type(e).__name__}: {first_line(e)}") from None

    report_dir = Path(report_dir) if report_dir is not None else path.parent / f"{path.name}.repro"
    with _temporary_beside(path) as tmp:
        try:
            _WRITERS[fmt](model, tmp, shape, seed, inputs)
        except OSError as e:  # name the file the user asked for, not the temporary one
            raise OSError(e.errno, e.strerror, str(path)) from None
        run = load_exported(tmp, trust_pickle=True)  # we wrote it a moment ago: unpickling our own file is safe
        diffs: dict[str, float] = {}
        if check:
            diffs = verify(model, run.outputs, shape, fmt=fmt, atol=atol, rtol=rtol, seed=seed,
                           report_dir=report_dir, rejected=tmp, inputs=inputs)
        latency = measure_latency(run.latency_target, shape, runs=latency_runs, inputs=inputs) if latency_runs > 0 else None
        _fsync(tmp)
        os.replace(tmp, path)

    report = {
        "output": str(path),
        "format": fmt,
        "bytes": path.stat().st_size,
        "max_abs_diff": max(diffs.values()) if diffs else None,
        "checked_batch_sizes": [int(b) for b in diffs],
        "params": count_params(model),
        "flops": count_flops(model, (1, *shape[1:]), inputs),
        "latency_ms": latency,
        "folded_bn": folded,
        "trusted_only": fmt == "pt",
    }
    if fmt == "pt":
        report["warning"] = (f"{path.name} is a pickle: loading it (torch.load(weights_only=False)) can run arbitrary "
                             "code; load only files you made or trust, and ship .onnx or .pt2 instead")
    return report


# ------------------------------------------------------------------ checks


def check_output_path(path: str | os.PathLike) -> str:
    """The export format of ``path`` ('onnx', 'pt2' or 'pt'), after checking it can be written.

    Commands call this first, so a typo in ``-o`` costs nothing: an unknown
    suffix, a missing folder or a target that is a folder is one
    :class:`NdcError` line before any training or export work.
    """
    path = Path(path)
    fmt = export_format(path)
    check_destination(path)
    return fmt


def export_format(path: Path) -> str:
    """'onnx', 'pt2' or 'pt' from ``path``'s suffix (:data:`ndc.formats.FORMATS`); anything else is one :class:`NdcError` line."""
    return format_of(path).name


def check_destination(path: Path) -> None:
    """Refuse, before any work, a target that cannot be written: no such folder, a folder, a folder that takes no files.

    A file is really created (and removed) beside the target: permission bits
    alone do not say whether ``/proc`` or a read-only mount accepts one. The
    temporary files of earlier exports to the same name that were killed are
    removed on the way.
    """
    parent = path.parent
    if not parent.is_dir():
        raise NdcError(f"cannot write {path}: folder {parent} does not exist" if not parent.exists()
                       else f"cannot write {path}: {parent} is not a folder")
    if path.is_dir():
        raise NdcError(f"cannot write {path}: it is a folder")
    try:
        with _temporary_beside(path):
            pass
    except OSError as e:
        raise NdcError(f"cannot write {path}: {e.strerror or first_line(e)}") from None
    for stale in parent.glob(f".{glob.escape(path.stem)}.*.tmp{glob.escape(path.suffix)}"):
        pid = stale.name[len(path.stem) + 2:].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):  # left by an export that was killed
            with contextlib.suppress(OSError):
                stale.unlink()


def _input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise NdcError(f"bad input shape {input_shape!r}: expected sizes such as 1,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise NdcError(f"bad input shape {list(shape)}: expected positive sizes with the batch first, such as 1,3,32,32")
    return shape


def verify(model: nn.Module, run: Callable[[torch.Tensor], list[np.ndarray]], input_shape: Sequence[int], *,
           fmt: str, atol: float, rtol: float, seed: int = 0, report_dir: Path, rejected: Path | None = None,
           batch_sizes: Sequence[int] = CHECK_BATCH_SIZES, inputs: InputSpec | None = None) -> dict[str, float]:
    """Compare ``run`` (the exported file) with ``model`` at each batch size; max abs diff per batch size.

    A value passes when ``|got - expected| <= atol + rtol * |expected|`` (numpy's
    ``allclose`` rule); shapes must match and NaNs never pass. On a mismatch
    the repro report is written to ``report_dir`` and :class:`NdcError` raised.
    """
    gen = torch.Generator().manual_seed(seed)
    diffs: dict[str, float] = {}
    failures: list[tuple[int, np.ndarray, list[np.ndarray], list[np.ndarray]]] = []
    for b in batch_sizes:
        x = (inputs or FLOAT).sample((b, *input_shape[1:]), gen)
        try:
            with torch.no_grad():
                expected = [t.detach().cpu().numpy() for t in tree_leaves(model(x)) if isinstance(t, torch.Tensor)]
        except Exception as e:
            raise NdcError(f"the model does not run at batch size {b}: {type(e).__name__}: {first_line(e)}") from None
        got = run(x)
        diff, ok = _compare(expected, got, atol, rtol)
        diffs[str(b)] = diff
        if not ok:
            failures.append((b, x.numpy(), expected, got))
    if failures:
        b = failures[0][0]
        where = write_repro(report_dir, fmt=fmt, input_shape=input_shape, seed=seed, atol=atol, rtol=rtol,
                            diffs=diffs, failures=failures, rejected=rejected)
        raise NdcError(f"the exported {fmt} model does not match PyTorch: max abs diff {diffs[str(b)]:.3g} at batch size {b} "
                       f"(tolerance atol={atol:g}, rtol={rtol:g}); file not written, repro report in {where}")
    return diffs


def _compare(expected: list[np.ndarray], got: list[np.ndarray], atol: float, rtol: float) -> tuple[float, bool]:
    if len(expected) != len(got):
        return float("inf"), False
    worst, ok = 0.0, True
    for e, g in zip(expected, got):
        g = np.asarray(g)
        if e.shape != g.shape:
            return float("inf"), False
        if e.size == 0:
            continue
        delta = np.abs(g.astype(np.float64) - e.astype(np.float64))
        d = float(np.max(delta))
        worst = max(worst, d if np.isfinite(d) else float("inf"))
        ok = ok and bool(np.all(delta <= atol + rtol * np.abs(e.astype(np.float64))))
    return worst, ok


def write_repro(report_dir: Path, *, fmt: str, input_shape: Sequence[int], seed: int, atol: float, rtol: float,
                diffs: dict[str, float], failures: list, rejected: Path | None) -> Path:
    """Write ``report.json`` and the offending inputs/outputs (``.npy``) to ``report_dir``; returns it."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for b, x, expected, got in failures:
        arrays = {f"input_b{b}.npy": x}
        for i, (e, g) in enumerate(zip(expected, got)):
            suffix = "" if len(expected) == 1 else f"_{i}"
            arrays[f"torch_b{b}{suffix}.npy"] = e
            arrays[f"exported_b{b}{suffix}.npy"] = np.asarray(g)
        for name, array in arrays.items():
            with atomic_write(report_dir / name, "wb") as f:
                np.save(f, array)
            files.append(name)
    model_file = None
    if rejected is not None and rejected.is_file() and rejected.stat().st_size <= REPRO_MODEL_LIMIT:
        model_file = f"rejected.{fmt}"
        shutil.copyfile(rejected, report_dir / model_file)
        files.append(model_file)
    write_json_atomic(report_dir / "report.json", {
        "format": fmt,
        "input_shape": [int(d) for d in input_shape[1:]],
        "batch_sizes": [int(b) for b in diffs],
        "input_shapes": {b: [int(b), *map(int, input_shape[1:])] for b in diffs},
        "seed": seed,
        "inputs": f"torch.randn per batch size in the order of batch_sizes, from torch.Generator().manual_seed({seed})",
        "atol": atol,
        "rtol": rtol,
        "max_abs_diff": diffs,
        "failed_batch_sizes": [int(b) for b, *_ in failures],
        "versions": library_versions(),
        "files": files,
        "rejected_model": model_file,
        "how_to_reproduce": "feed input_bN.npy to the rejected model (onnxruntime, torch.export.load or torch.load) "
                            "and compare with torch_bN.npy; exported_bN.npy is what it returned here",
    })
    return report_dir


# ------------------------------------------------------------- folding


def _fold(model: nn.Module, shape: tuple[int, ...], atol: float, rtol: float, seed: int,
          inputs: InputSpec) -> tuple[fx.GraphModule, int]:
    from ndc.passes.fold import fold_conv_bn
    from ndc.passes.trace import trace

    gm = model if isinstance(model, fx.GraphModule) else trace(model, shape, inputs=inputs).gm
    folded = fold_conv_bn(gm)
    x = inputs.sample((7, *shape[1:]), torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        expected = [t.numpy() for t in tree_leaves(gm(x)) if isinstance(t, torch.Tensor)]
        got = [t.numpy() for t in tree_leaves(folded.gm(x)) if isinstance(t, torch.Tensor)]
    diff, ok = _compare(expected, got, atol, rtol)
    if not ok:
        raise NdcError(f"folding batch norms into convolutions changed the outputs by up to {diff:.3g} "
                       f"(tolerance atol={atol:g}, rtol={rtol:g}); export without batch-norm folding")
    return folded.gm, folded.count


# ------------------------------------------------------------- writers


def _example(shape: tuple[int, ...], seed: int, inputs: InputSpec) -> torch.Tensor:
    return inputs.sample((EXAMPLE_BATCH, *shape[1:]), torch.Generator().manual_seed(seed))


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def _capture(model: nn.Module, shape: tuple[int, ...], seed: int, inputs: InputSpec) -> torch.export.ExportedProgram:
    """The model as a ``torch.export`` program with a dynamic batch dimension: what both .pt2 and .onnx are made from.

    Capturing it here (rather than letting the ONNX exporter do it) means a
    model that fixes its batch size fails with one clear line: given the
    module, torch 2.13's ``torch.onnx.export(dynamo=True, dynamic_shapes=...)``
    quietly writes a graph with the example's static batch instead.
    """
    with _quiet_exporter():
        try:
            return torch.export.export(model, (_example(shape, seed + 1, inputs),), dynamic_shapes=_dynamic_batch())
        except Exception as e:
            raise NdcError(_export_failure("torch.export", e)) from None


def _write_pt2(model: nn.Module, tmp: Path, shape: tuple[int, ...], seed: int, inputs: InputSpec) -> None:
    program = _capture(model, shape, seed, inputs)
    buffer = io.BytesIO()
    with _quiet_exporter():
        torch.export.save(program, buffer)
    # Written by Python, not by torch's C++ zip writer, which aborts the process on a full disk.
    tmp.write_bytes(buffer.getbuffer())


def _write_onnx(model: nn.Module, tmp: Path, shape: tuple[int, ...], seed: int, inputs: InputSpec) -> None:
    program = _capture(model, shape, seed, inputs)
    n_outputs = len(program.graph_signature.user_outputs)
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    with _quiet_exporter():
        try:
            onnx_program = torch.onnx.export(program, dynamo=True, external_data=False, input_names=["input"],
                                             output_names=output_names, verbose=False)
        except Exception as e:
            raise NdcError(_export_failure("the ONNX exporter", e)) from None
        _name_batch_dimension(onnx_program.model.graph)
        _drop_trace_metadata(onnx_program.model.graph)
        try:
            onnx_program.save(tmp, external_data=False)
        except ValueError as e:  # protobuf's 2 GiB limit on one file
            raise NdcError(f"cannot write one self-contained ONNX file: {first_line(e)}") from None
    import onnx

    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as e:
        raise NdcError(f"the exported ONNX model fails onnx.checker: {first_line(e)}") from None


def _drop_trace_metadata(graph: Any) -> None:
    """Remove the exporter's per-node debugging metadata (stack traces, module scopes): for a small student it is
    most of the file (a 2-layer GPT-2: 383 KB with it, 148 KB without), and nothing reads it at inference."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(graph):
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*graph.inputs, *graph.outputs, *graph.initializers.values()]:
        value.metadata_props.clear()


def _name_batch_dimension(graph: Any) -> None:
    """Call the batch dimension of the graph's inputs and outputs ``batch`` (torch.export names it ``s77`` or so)."""
    import onnx_ir as ir

    first = graph.inputs[0].shape[0] if graph.inputs and graph.inputs[0].shape is not None else None
    if not isinstance(first, ir.SymbolicDim) or first.value is None:
        return
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape(["batch" if isinstance(d, ir.SymbolicDim) and d.value == first.value else d
                                    for d in value.shape.dims])


def _write_pt(model: nn.Module, tmp: Path, shape: tuple[int, ...], seed: int, inputs: InputSpec) -> None:
    for sub in model.modules():  # a stitched student may hold one GraphModule per neighbourhood
        if isinstance(sub, fx.GraphModule):
            _make_picklable(sub)
    try:
        torch.save(model, tmp)
    except Exception as e:  # a lambda or local class somewhere in the module
        raise NdcError(f"cannot pickle the model to .pt: {first_line(e)}; export to .pt2 or .onnx instead") from None


def _make_picklable(gm: fx.GraphModule) -> None:
    """Work around two ways a traced GraphModule fails to round-trip through pickle (in place, on our copy).

    * Unpickling re-traces the saved code with the tracer class that made the
      graph, called without arguments; ndc's tracer takes arguments, so the
      file would not load (and would depend on ndc's internals). A plain
      ``fx.Tracer`` re-traces the saved code just as well.
    * Under ``from __future__ import annotations`` a traced ``forward(self, x:
      torch.Tensor)`` records the *string* ``'torch.Tensor'`` as the
      placeholder's type, and pickling then fails in torch 2.13 (``'str'
      object has no attribute '__name__'`` while it writes the import block).
      Annotations change nothing at run time.
    """
    gm._tracer_cls = None
    gm._tracer_extras = {}
    changed = False
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
            changed = True
    if changed:
        gm.recompile()


_WRITERS = {"onnx": _write_onnx, "pt2": _write_pt2, "pt": _write_pt}


# ------------------------------------------------------------- helpers


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary file name in ``path``'s folder (same suffix); removed unless renamed into place."""
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}-", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the user's file gets the usual mode
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporters' chatter off stdout (``--format json`` owns it) and drop their internal deprecations."""
    # torch.onnx logs one warning per missing torchvision op at every export; onnxscript's constant folding one per
    # constant it could not fold ("Evaluation failed: cannot reshape ..."), which it then leaves as it was.
    loggers = [logging.getLogger(name) for name in ("torch.onnx._internal.exporter._registration",
                                                    "onnxscript.optimizer._constant_folding")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_failure(what: str, e: BaseException) -> str:
    text = str(e)
    if "Constraints violated" in text:
        constant = re.search(r"specialized it to be a constant \((\d+)\)", text)
        fixed = f" to {constant.group(1)}" if constant else ""
        return (f"{what} cannot give the model a dynamic batch dimension: its code fixes the batch size{fixed} "
                "(e.g. x.view(N, -1) with a constant N); use x.shape[0] or x.flatten(1) instead")
    root, seen = e, {id(e)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:  # the innermost cause
        root = nxt
        seen.add(id(root))
    cause = f" (caused by {type(root).__name__}: {first_line(root)})" if root is not e else ""
    hint = "; a .pt2 export (-o FILE.pt2) needs no ONNX conversion" if "ONNX" in what else ""
    return f"{what} failed: {type(e).__name__}: {first_line(e)}{cause}{hint}"

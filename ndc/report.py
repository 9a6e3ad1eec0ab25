"""Measuring deployed models: latency (onnxruntime or torch), library versions.

Latency is the **median** wall time of repeated runs after a warm-up, on one
thread by default (``intra_op_num_threads=1`` for onnxruntime,
``torch.set_num_threads(1)`` for torch, restored afterwards), on a fixed
random input. One thread makes figures comparable across machines and with
the rest of ndc's measurements; pass ``threads`` to measure otherwise. The
machines ndc runs on are shared and noisy: compare latencies measured in the
same run.

>>> measure_latency("student.onnx", (1, 3, 32, 32))      # doctest: +SKIP
{'1': 0.41, '32': 6.2}
>>> measure_latency(teacher_gm, (1, 3, 32, 32))           # doctest: +SKIP
{'1': 0.95, '32': 14.8}
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

LATENCY_BATCH_SIZES = (1, 32)


def ort_session(path: str | os.PathLike, threads: int = 1):
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: keep onnxruntime's notices off the user's terminal
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_runs(fn: Callable[[], Any], runs: int = 20, warmup: int = 3) -> list[float]:
    """Wall time of each of ``runs`` calls of ``fn`` (milliseconds), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_latency(model: Any, input_shape: Sequence[int], batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES, *,
                    runs: int = 20, warmup: int = 3, threads: int = 1, seed: int = 0, inputs=None) -> dict[str, float]:
    """Median latency in milliseconds per batch size: ``{"1": ms, "32": ms}``.

    ``model`` is a path to an ``.onnx`` file or an onnxruntime session
    (measured with onnxruntime), or a torch callable (an ``nn.Module``, a
    ``torch.export`` program's ``.module()``), measured under ``torch.no_grad``.
    ``input_shape`` is the example input shape; its batch size is replaced by
    each of ``batch_sizes``; ``inputs`` (an :class:`~ndc.passes.inputs.InputSpec`)
    says when inputs are token ids rather than floats.
    """
    from ndc.passes.inputs import FLOAT

    sample = (inputs or FLOAT).sample
    per_example = tuple(int(d) for d in input_shape[1:])
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, (str, os.PathLike)) or _is_ort_session(model):
        session = ort_session(model, threads) if isinstance(model, (str, os.PathLike)) else model
        name = session.get_inputs()[0].name
        result = {}
        for b in batch_sizes:
            feed = {name: sample((b, *per_example), gen).numpy()}
            result[str(b)] = statistics.median(time_runs(lambda: session.run(None, feed), runs, warmup))
        return result
    return _torch_latency(model, per_example, batch_sizes, runs, warmup, threads, gen, sample)


def _torch_latency(fn: Callable, per_example: tuple[int, ...], batch_sizes: Sequence[int], runs: int, warmup: int,
                   threads: int, gen: torch.Generator, sample: Callable) -> dict[str, float]:
    if isinstance(fn, torch.nn.Module):
        # A torch.export program's .module() has its mode baked in and refuses eval().
        with contextlib.suppress(NotImplementedError):
            fn.eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = {}
        with torch.no_grad():
            for b in batch_sizes:
                x = sample((b, *per_example), gen)
                result[str(b)] = statistics.median(time_runs(lambda: fn(x), runs, warmup))
        return result
    finally:
        torch.set_num_threads(before)


def _is_ort_session(obj: Any) -> bool:
    return type(obj).__module__.startswith("onnxruntime") and hasattr(obj, "get_inputs")


def library_versions() -> dict[str, str | None]:
    """Versions of everything an exported file's behaviour depends on (None when not installed)."""
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions

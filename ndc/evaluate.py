"""Evaluation: a model's score on a data set, the teacher's, and their agreement.

``evaluate`` takes whatever a user has at hand: an ``nn.Module`` (a teacher,
a stitched student), a ``torch.export`` program, an onnxruntime session, or
the result of :func:`~ndc.formats.load_exported` on an exported file. Every
model sees the same batches in the same order, so two models evaluated on the
same :class:`~ndc.data.DataSource` are compared example by example. The
numbers come from :mod:`ndc.scoring`, as everywhere else.

>>> data = open_data("digits", (3, 32, 32), limit=200)            # doctest: +SKIP
>>> evaluate(load_for_eval("student.onnx"), data, teacher=teacher.gm)   # doctest: +SKIP
{'metric': 'accuracy', 'score': 0.91, 'teacher_score': 0.93, 'agreement': 0.96, 'examples': 200, ...}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ndc.formats import Predictor, load_exported
from ndc.scoring import Metric, runner, scores

if TYPE_CHECKING:
    from ndc.data import DataSource

__all__ = ["Predictor", "evaluate", "load_for_eval"]


def load_for_eval(path, *, trust_pickle: bool = False) -> Predictor:
    """Open an exported model for evaluation (:func:`ndc.formats.load_exported` with this process's threads)."""
    return load_exported(path, trust_pickle=trust_pickle, threads=torch.get_num_threads())


def evaluate(model: Any, data: DataSource, *, split: str = "test", teacher: Any = None,
             metric: Metric | None = None, batch_size: int = 256, device: str = "cpu") -> dict:
    """``model``'s score on ``data``'s ``split``; with ``teacher``, the teacher's own score and their agreement.

    ``model`` and ``teacher``: anything :func:`ndc.scoring.runner` runs.
    ``metric`` defaults to accuracy; class labels the model has no output for
    are refused first, naming the example. Returns ``metric``, ``score`` and
    ``examples``; with a teacher also ``teacher_score`` (when the metric
    scores against the labels or is a function) and ``agreement`` (when it
    scores classes); with the accuracy metric the same numbers also under
    their old names ``accuracy`` and ``teacher_accuracy``.
    """
    metric = metric or Metric("accuracy")
    first = next(data.batches(split, 2), None)
    if metric.needs_labels and data.labels == "classes" and first is not None:
        with runner(model, device, "the model", data.name) as run:
            out = run(first[0])
        if out.dim() == 2:
            data.check_classes(out.shape[1])
    batches = data.batches(split, batch_size)
    own = [metric] + ([Metric("agreement", metric.threshold)] if teacher is not None and metric.needs_labels else [])
    theirs = [metric] if teacher is not None and not metric.needs_teacher else []
    values, teacher_values, n = scores(model, batches, own, teacher=teacher, teacher_metrics=theirs, device=device,
                                     source=data.name)
    result: dict[str, Any] = {"metric": metric.name, "score": values[0]}
    if theirs:
        result["teacher_score"] = teacher_values[0]
    if teacher is not None:
        result["agreement"] = values[0] if metric.kind == "agreement" else (values[1] if len(values) > 1 else None)
    if metric.kind == "accuracy":
        result["accuracy"] = values[0]
        if theirs:
            result["teacher_accuracy"] = teacher_values[0]
    result["examples"] = n
    return result

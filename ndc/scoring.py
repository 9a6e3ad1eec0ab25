"""Scores: the one way eval, search, probe and training measure a model.

A :class:`Metric` turns ``(student outputs, teacher outputs, labels)`` batch
by batch into one number. The metrics:

* ``accuracy``: the fraction of examples whose arg-max class is the label;
  for multi-label heads (a sigmoid output, or 0/1 target rows) the fraction
  of (example, output) pairs on the right side of the threshold (0.5 for
  probabilities, 0 for logits);
* ``top-K`` (``top-5``): the label is among the K largest scores;
* ``agreement``: the fraction of examples where model and teacher predict the
  same class (for multi-label heads, the same side of the threshold per output);
* ``r2``: the coefficient of determination of real-valued targets
  (regression), ``1 − Σ(y − S(x))² / Σ(y − ȳ)²`` over the whole set, with
  one mean ȳ per output (several outputs pool their sums); shown as a
  percentage, 100% for a perfect fit, 0% for predicting the mean, negative
  when worse than that;
* ``rmse``, ``mae``: the root mean squared and the mean absolute error
  against real-valued targets, in their units (lower is better);
* ``output-error``: the relative output error
  ``‖S(x) − T(x)‖ / ‖T(x)‖`` over the whole set (lower is better): the
  measure that fits any head;
* ``module:function`` / ``file.py:function``: a user's
  ``fn(student_out, teacher_out, y) -> float``, called once with the outputs
  of the whole set (``teacher_out`` None without a teacher, ``y`` None
  without labels); higher is better unless the function has an attribute
  ``higher_is_better = False``.

:class:`Divergence` measures how far outputs are from the teacher's, on a
continuous scale that is 0 for the teacher itself (KL divergence for class
scores, Bernoulli KL for sigmoid heads, relative squared error otherwise):
what Student Search's budget rule minimises.

:func:`choose_metric` picks ``auto``'s metric from the teacher's output and
the data, and says why when it is not the obvious one. :func:`score` runs a
model (an ``nn.Module``, a ``torch.export`` program, an onnxruntime session,
a loaded file, any callable) over batches and returns one metric's value;
:func:`scores` computes several in one pass.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ndc.errors import NdcError, first_line, fmt_shape
from ndc.heads import Head, label_kind, label_misfit, labels_fit
from ndc.losses import _EPS, choose_loss
from ndc.metrics import per_position
from ndc.usercode import find_function, is_function_spec

METRIC_HELP = ("auto, accuracy, top-K (e.g. top-5), agreement, r2, rmse, mae, output-error, or module:function / "
               "file.py:function")
_VALUE_METRICS = ("r2", "rmse", "mae")  # against real-valued targets
_TOP_K = re.compile(r"top-?(\d+)$")


# ----------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """A metric by name, and for multi-label heads the threshold between negative and positive outputs.

    Frozen and JSON-able (``dataclasses.asdict``), so it can key checkpoints and caches.
    """

    name: str
    threshold: float | None = None  # multi-label: output > threshold is positive; None: single-label (arg-max)

    def __post_init__(self) -> None:
        parse_metric(self.name)

    @property
    def kind(self) -> str:
        """``accuracy``, ``top``, ``agreement``, ``r2``, ``rmse``, ``mae``, ``output-error`` or ``function``."""
        return parse_metric(self.name)[0]

    @property
    def needs_labels(self) -> bool:
        return self.kind in ("accuracy", "top", *_VALUE_METRICS)

    @property
    def of_classes(self) -> bool:
        """Whether it scores predicted classes (so a model and its teacher can also be compared by agreement)."""
        return self.kind in ("accuracy", "top", "agreement")

    @property
    def needs_teacher(self) -> bool:
        return self.kind in ("agreement", "output-error")

    @property
    def higher_is_better(self) -> bool:
        if self.kind in ("output-error", "rmse", "mae"):
            return False
        if self.kind == "function":
            return bool(getattr(_user_metric(self.name), "higher_is_better", True))
        return True

    @property
    def fraction(self) -> bool:
        """Whether values are fractions, shown as percentages and compared in points."""
        return self.kind not in ("function", "rmse", "mae")

    @property
    def bounds(self) -> tuple[float, float]:
        """The values it can take (R² is negative when worse than the mean)."""
        if self.kind == "r2":
            return -math.inf, 1.0
        return (0.0, 1.0) if self.fraction else (-math.inf, math.inf)

    @property
    def title(self) -> str:
        return {"accuracy": "accuracy", "top": f"{self.name} accuracy", "agreement": "agreement with the teacher",
                "output-error": "relative output error", "r2": "R²", "rmse": "RMSE", "mae": "MAE"}.get(self.kind, self.name)

    def better(self, a: float, b: float | None) -> bool:
        """Whether score ``a`` beats ``b`` (None: nothing yet)."""
        if b is None:
            return True
        return a > b if self.higher_is_better else a < b

    def drop(self, reference: float, value: float) -> float:
        """How much worse ``value`` is than ``reference``: in points for fractions, positive when worse."""
        scale = 100.0 if self.fraction else 1.0
        return scale * ((reference - value) if self.higher_is_better else (value - reference))

    def format(self, value: float | None) -> str:
        if value is None:
            return ""
        return f"{100 * value:.2f}%" if self.fraction else f"{value:.4g}"

    def tally(self) -> Tally:
        kind = self.kind
        if kind == "output-error":
            return _ErrorTally()
        if kind == "function":
            return _FunctionTally(self.name, _user_metric(self.name))
        if kind in _VALUE_METRICS:
            return _ValueTally(kind)
        if self.threshold is not None:
            return _MultiLabelTally(self.threshold, against_teacher=kind == "agreement")
        k = parse_metric(self.name)[1] if kind == "top" else 1
        return _ClassTally(k, against_teacher=kind == "agreement")


def as_metric(metric: Metric | str) -> Metric:
    """A :class:`Metric` from itself or its name (single-label)."""
    return Metric(metric) if isinstance(metric, str) else metric


def parse_metric(name: str) -> tuple[str, int]:
    """``(kind, k)`` of a metric name; an unknown name is one :class:`NdcError` line listing the valid ones."""
    if name in ("accuracy", "agreement", "output-error", *_VALUE_METRICS):
        return name, 1
    top = _TOP_K.match(name)
    if top and int(top.group(1)) >= 1:
        return "top", int(top.group(1))
    if is_function_spec(name):
        return "function", 0
    raise NdcError(f"unknown metric {name!r}; valid: {METRIC_HELP}")


_USER_METRICS: dict[str, Callable] = {}


def _user_metric(spec: str) -> Callable:
    if spec not in _USER_METRICS:
        _USER_METRICS[spec] = find_function(spec, "metrics.py")[0]
    return _USER_METRICS[spec]


# ------------------------------------------------------------------ choice


def choose_metric(requested: str, data: Any, head: Head) -> tuple[Metric, str | None]:
    """The metric ``requested`` (``auto`` or a name) for ``data`` and the teacher's ``head``; and why, when auto
    settles for less than accuracy.

    ``auto``: accuracy when the labels fit the output (class labels within its
    scores, or 0/1 target rows of its shape); R² when they are real-valued
    targets with one value per output (regression); else agreement with the
    teacher when the output is class scores (more than one score per example,
    or a sigmoid); else the relative output error. A request the data or the head
    cannot support (accuracy without fitting labels, top-K of a multi-label
    head) is one line saying what to use instead.
    """
    if requested != "auto":
        parse_metric(requested)
    multilabel = _multilabel(data, head)
    threshold = (0.5 if head.sigmoid else 0.0) if multilabel else None
    fits = _labels_fit(data, head, multilabel)
    regression = label_kind(head, data) == "targets" and not multilabel
    class_scores = head.scores is not None and (head.scores > 1 or multilabel) and not regression
    if requested == "auto":
        if fits:
            return Metric("accuracy", threshold), None
        if regression and _values_fit(data, head):
            return Metric("r2"), None
        why = _why_not_accuracy(data, head)
        if class_scores:
            return Metric("agreement", threshold), f"{why}: measuring agreement with the teacher"
        return Metric("output-error"), f"{why}: measuring the relative output error against the teacher"
    kind = parse_metric(requested)[0]
    if kind in _VALUE_METRICS and not _values_fit(data, head):
        raise NdcError(f"cannot measure {requested}: it compares the outputs with real-valued targets of their size, "
                       f"and {_why_not_values(data, head)}; use --metric output-error or a function")
    if kind in ("accuracy", "top") and not fits:
        raise NdcError(f"cannot measure {requested}: {_why_not_accuracy(data, head)}; use --metric agreement, "
                       "output-error or a function")
    if kind == "top":
        if multilabel:
            raise NdcError(f"cannot measure {requested} on a multi-label output; use --metric accuracy")
        if parse_metric(requested)[1] > head.scores:
            raise NdcError(f"cannot measure {requested}: the teacher has only {head.scores} outputs")
    if kind == "agreement" and head.scores is None:
        raise NdcError(f"cannot measure agreement: the teacher's output {head.describe()} is not class scores "
                       "(batch, classes); use --metric output-error or a function")
    return Metric(requested, threshold if kind in ("accuracy", "agreement") else None), None


def teacher_doubt(metric: Metric, teacher_score: float | None, data: Any) -> str | None:
    """A warning when the teacher classifies ``data`` barely better than chance (one class per example), or predicts
    its targets worse than their mean does (R² below 0): the data, or how it is prepared, is almost surely not what
    the teacher was trained on. None when the score is plausible."""
    if teacher_score is None:
        return None
    if metric.kind == "r2":
        if teacher_score >= 0:
            return None
        what = f"R² {teacher_score:.1%} on {data.name}: its predictions are worse than the targets' mean"
    else:
        classes = getattr(data, "classes", None)
        if metric.kind != "accuracy" or not classes or classes < 2 or tuple(getattr(data, "label_shape", ())) != ():
            return None
        chance = 1 / classes
        if teacher_score >= chance + 0.25 * (1 - chance):
            return None
        what = f"{teacher_score:.1%} accuracy on {data.name} (chance {chance:.0%})"
    hint = ""
    if getattr(data, "normalization", "none") == "training statistics":
        hint = "; ndc standardises inputs by their training statistics by default: a teacher trained on raw inputs needs --normalize none"
    return f"the teacher scores {what}: it was probably trained on other data or other preprocessing{hint}"


def pick_metric(requested: str, data: Any, head: Head, *, labels_must_fit: bool = False, without_teacher: str = "",
                warn: Callable[[str], None] | None = None) -> Metric:
    """The :class:`Metric` for ``requested`` on ``data`` and the teacher's ``head``; ``warn`` hears why when auto
    settles for less than accuracy. ``labels_must_fit``: class labels that a classifier has no output for are an
    error naming the example, rather than a reason for auto to measure agreement. ``without_teacher``: there is no
    teacher to compare with, and this says how to give one."""
    if (labels_must_fit and requested == "auto" and head.scores and head.scores > 1 and not head.sigmoid
            and label_kind(head, data) == "classes" and labels_fit(head, data)):
        # without a teacher, --metric agreement is one more error: say how to give one
        data.check_classes(head.scores, f"to score by agreement with the teacher instead, {without_teacher}" if without_teacher
                           else "score by agreement with the teacher instead with --metric agreement")
    metric, why = choose_metric(requested, data, head)
    if without_teacher and metric.needs_teacher:
        raise NdcError(f"{metric.title} compares with the teacher: {without_teacher}")
    if why and warn is not None:
        warn(why)
    if warn is not None and metric.kind == "function" and not hasattr(_user_metric(metric.name), "higher_is_better"):
        warn(f"--metric {metric.name}: higher values taken as better (the function has no higher_is_better "
             "attribute; set it to False for an error or a loss)")
    return metric


def _multilabel(data: Any, head: Head) -> bool:
    """A sigmoid head, or 0/1 target rows with one value per output."""
    if head.scores is None:
        return False
    targets = label_kind(head, data) == "targets" and getattr(data, "binary", False)
    return head.sigmoid or (targets and math.prod(data.target_shape or ()) == head.scores)


def _labels_fit(data: Any, head: Head, multilabel: bool) -> bool:
    labels = label_kind(head, data)
    if head.scores is None or labels == "none":
        return False
    if labels == "targets":
        return multilabel and bool(data.binary) and math.prod(data.target_shape or ()) == head.scores
    if not labels_fit(head, data) or data.classes is None:
        return False
    if multilabel:
        return head.scores == 1 and data.classes <= 2  # 0/1 labels, one sigmoid
    return data.classes <= head.scores


def _values_fit(data: Any, head: Head) -> bool:
    """Target rows with one value per output of the teacher."""
    return (label_kind(head, data) == "targets"
            and math.prod(getattr(data, "target_shape", None) or ()) == math.prod(head.shape))


def _why_not_values(data: Any, head: Head) -> str:
    name = getattr(data, "name", "the data")
    labels = label_kind(head, data)
    if labels == "none":
        return f"{name} has no labels"
    if labels == "classes":
        return f"the labels of {name} are classes"
    return (f"the targets of {name} have shape {fmt_shape(data.target_shape)}, the teacher's output "
            f"{head.describe()}")


def _why_not_accuracy(data: Any, head: Head) -> str:
    labels = label_kind(head, data)
    name = getattr(data, "name", "the data")
    if labels == "none":
        if getattr(data, "labels", "none") == "classes":  # token ids whose labels ndc made up: the next tokens
            return f"{name} has no labels (the next tokens ndc makes from its ids fit a language model's scores only)"
        return f"{name} has no labels"
    if head.scores is None:
        return f"the teacher's output {head.describe()} is not class scores"
    if labels == "classes" and not labels_fit(head, data):
        return label_misfit(head, data)
    if labels == "targets" and data.binary:
        return (f"the labels of {name} are 0/1 targets of shape {fmt_shape(data.target_shape)}, which do not fit "
                f"the teacher's output {head.describe()}")
    if labels == "targets":
        return f"the labels of {name} are real-valued targets (regression), not classes"
    return (f"the labels of {name} ({data.classes} classes) do not fit the teacher's output "
            f"{head.describe()}")


# ------------------------------------------------------------------ tallies


class Tally:
    """Accumulates one metric over batches: ``add(out, teacher_out, y)`` per batch, then ``result()``."""

    def add(self, out: torch.Tensor, teacher_out: torch.Tensor | None, y: torch.Tensor | None) -> None:
        raise NotImplementedError

    def result(self) -> float:
        raise NotImplementedError


def _need(value: Any, what: str) -> Any:
    if value is None:
        raise NdcError(f"this metric needs {what}")
    return value


def _as_targets(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if y.numel() != out.numel():
        raise NdcError(f"labels of shape {fmt_shape(y.shape)} do not fit outputs of shape {fmt_shape(out.shape)}")
    return y.reshape(out.shape).float()


class _ClassTally(Tally):
    def __init__(self, k: int, against_teacher: bool):
        self.k, self.against_teacher, self.hits, self.n = k, against_teacher, 0, 0

    def add(self, out, teacher_out, y):
        if self.against_teacher:
            y = None  # agreement reads the teacher, whatever the labels
        if out.dim() == 3:  # token logits (B, L, V): one classification per position, label -100 unknown
            if y is not None and tuple(y.shape) != tuple(out.shape[:2]):
                raise NdcError(f"labels of shape {fmt_shape(y.shape)} do not fit scores of shape {fmt_shape(out.shape)}: "
                               "scores per position need a label per position; use --metric agreement")
            out, *rest = per_position(out, *(t for t in (teacher_out, y) if t is not None))
            teacher_out = rest.pop(0) if teacher_out is not None else None
            y = rest.pop(0) if y is not None else None
            if y is not None:
                known = y >= 0
                out, y = out[known], y[known]
        if out.dim() != 2:
            raise NdcError(f"class metrics need scores of shape (batch, classes), not {fmt_shape(out.shape)}")
        if self.against_teacher:
            reference = _need(teacher_out, "the teacher's outputs").argmax(1)
        else:
            reference = _need(y, "class labels")
            if reference.dim() != 1 or reference.is_floating_point():
                raise NdcError(f"{'accuracy' if self.k == 1 else f'top-{self.k}'} needs class labels, not targets of "
                               f"shape {fmt_shape(reference.shape)}; use --metric output-error, agreement or a function")
            if out.shape[1] and int(reference.max()) >= out.shape[1]:
                raise NdcError(f"a label is {int(reference.max())} but the model scores {out.shape[1]} classes")
        if self.k == 1:
            self.hits += int((out.argmax(1) == reference).sum())
        else:
            self.hits += int((out.topk(self.k, 1).indices == reference[:, None]).any(1).sum())
        self.n += len(out)

    def result(self):
        return self.hits / max(self.n, 1)


class _MultiLabelTally(Tally):
    def __init__(self, threshold: float, against_teacher: bool):
        self.threshold, self.against_teacher, self.hits, self.n = threshold, against_teacher, 0, 0

    def add(self, out, teacher_out, y):
        predicted = out > self.threshold
        if self.against_teacher:
            reference = _need(teacher_out, "the teacher's outputs") > self.threshold
        else:
            reference = _as_targets(_need(y, "labels"), out) > 0.5
        self.hits += int((predicted == reference).sum())
        self.n += predicted.numel()

    def result(self):
        return self.hits / max(self.n, 1)


class _ErrorTally(Tally):
    def __init__(self):
        self.err = self.ref = 0.0

    def add(self, out, teacher_out, y):
        t = _need(teacher_out, "the teacher's outputs").double()
        self.err += float(((out.double() - t) ** 2).sum())
        self.ref += float((t * t).sum())

    def result(self):
        return math.sqrt(self.err / self.ref) if self.ref > 0 else (0.0 if self.err == 0 else math.inf)


class _ValueTally(Tally):
    """R², RMSE or MAE against real-valued targets, summed in float64; R²'s sums of squares are taken about the
    first batch's means, so targets far from zero lose no precision."""

    def __init__(self, kind: str):
        self.kind, self.values = kind, 0
        self.error = 0.0  # Σ (y − S)², or Σ |y − S| for mae
        self.shift = self.sum = self.squares = None  # per output: a reference, Σ (y − shift), Σ (y − shift)²
        self.examples = 0

    def add(self, out, teacher_out, y):
        y = _as_targets(_need(y, "targets"), out).reshape(len(out), -1).double()
        diff = y - out.reshape(len(out), -1).double()
        self.error += float(diff.abs().sum() if self.kind == "mae" else (diff * diff).sum())
        self.values += diff.numel()
        if self.kind == "r2" and len(y):
            if self.shift is None:
                self.shift = y.mean(0)
                self.sum, self.squares = torch.zeros_like(self.shift), torch.zeros_like(self.shift)
            v = y - self.shift
            self.sum += v.sum(0)
            self.squares += (v * v).sum(0)
            self.examples += len(y)

    def result(self):
        if self.kind == "mae":
            return self.error / max(self.values, 1)
        if self.kind == "rmse":
            return math.sqrt(self.error / max(self.values, 1))
        if self.shift is None:
            return 0.0
        total = float((self.squares - self.sum * self.sum / self.examples).clamp_min(0).sum())
        if total == 0:  # constant targets: R² is undefined; 100% for a perfect fit, else 0 (as scikit-learn does)
            return 1.0 if self.error == 0 else 0.0
        return 1.0 - self.error / total


class _FunctionTally(Tally):
    def __init__(self, spec: str, fn: Callable):
        self.spec, self.fn = spec, fn
        self.outs: list[torch.Tensor] = []
        self.teacher: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, out, teacher_out, y):  # the user's function sees CPU tensors, whatever device measured them
        self.outs.append(out.cpu())
        if teacher_out is not None:
            self.teacher.append(teacher_out.cpu())
        if y is not None:
            self.labels.append(y.cpu())

    def result(self):
        def joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
            return torch.cat(parts) if parts and len(parts) == len(self.outs) else None

        try:
            value = float(self.fn(torch.cat(self.outs), joined(self.teacher), joined(self.labels)))
        except NdcError:
            raise
        except Exception as e:  # noqa: BLE001 - user code may raise anything; report it in one line
            raise NdcError(f"metric {self.spec} raised {type(e).__name__}: {first_line(e)}") from None
        if math.isnan(value):
            raise NdcError(f"metric {self.spec} returned NaN")
        return value


# ------------------------------------------------------------------ divergence


DIVERGENCES = ("kl", "bernoulli-kl", "squared-error")
DIVERGENCE_TITLES = {"kl": "KL", "bernoulli-kl": "Bernoulli KL", "squared-error": "squared error"}
_DIVERGENCE_OF_LOSS = {"kd": "kl", "bce": "bernoulli-kl", "mse": "squared-error"}


@dataclass(frozen=True)
class Divergence:
    """How far outputs are from the teacher's, averaged over examples; 0 for the teacher's own outputs.

    * ``kl``: KL(softmax(T) ‖ softmax(S)) per example (per position for token
      scores), in nats: class scores;
    * ``bernoulli-kl``: the summed per-output Bernoulli KL of the teacher's
      probabilities from the model's (``probabilities``: the outputs already
      are probabilities, else logits): sigmoid and multi-label heads;
    * ``squared-error``: ``‖S − T‖² / ‖T‖²`` over the whole set: any other head.

    Unlike a score counted in examples, it is continuous (every example
    contributes, however small the change) and it cannot be better than the
    teacher's; to second order, small independent changes at different
    neighbourhoods add up, which is what a summed objective needs.
    """

    kind: str
    probabilities: bool = False

    def __post_init__(self) -> None:
        if self.kind not in DIVERGENCES:
            raise NdcError(f"unknown divergence {self.kind!r}; valid: {', '.join(DIVERGENCES)}")

    @classmethod
    def of(cls, head: Head, data: Any) -> "Divergence":
        """The divergence that fits ``head`` and ``data``: the teacher term of the loss ``--loss auto`` trains with
        (kd: ``kl``, bce: ``bernoulli-kl``, mse: ``squared-error``)."""
        return cls(_DIVERGENCE_OF_LOSS[choose_loss("auto", head, data)[0]], probabilities=head.sigmoid)

    def __str__(self) -> str:
        return self.kind

    def tally(self) -> Tally:
        return _DivergenceTally(self)


class _DivergenceTally(Tally):
    CHUNK = 1 << 22  # elements per float64 piece: a language model's (batch x positions x vocabulary) scores stay small

    def __init__(self, divergence: Divergence):
        self.kind, self.probabilities = divergence.kind, divergence.probabilities
        self.total = self.reference = 0.0
        self.count = 0

    def add(self, out, teacher_out, y):
        s, t = per_position(out, _need(teacher_out, "the teacher's outputs"))  # token scores: a row per position
        s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
        rows = max(1, self.CHUNK // max(1, t.shape[1]))
        for a, b in zip(s.split(rows), t.split(rows)):
            self._add(a.double(), b.double())
        self.count += len(t)

    def _add(self, s: torch.Tensor, t: torch.Tensor) -> None:
        if self.kind == "squared-error":
            self.total += float(((s - t) ** 2).sum())
            self.reference += float((t * t).sum())
        elif self.kind == "kl":
            log_t, log_s = torch.log_softmax(t, dim=-1), torch.log_softmax(s, dim=-1)
            self.total += float((log_t.exp() * (log_t - log_s)).sum())
        else:
            (lt, l1t), (ls, l1s) = self._logs(t), self._logs(s)
            self.total += float((lt.exp() * (lt - ls) + l1t.exp() * (l1t - l1s)).sum())

    def _logs(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p and log (1 - p) of probabilities, or of the sigmoid of logits."""
        if self.probabilities:
            v = v.clamp(_EPS, 1 - _EPS)
            return v.log(), torch.log1p(-v)
        return torch.nn.functional.logsigmoid(v), torch.nn.functional.logsigmoid(-v)

    def result(self):
        if self.kind == "squared-error":
            return self.total / self.reference if self.reference > 0 else (0.0 if self.total == 0 else math.inf)
        return self.total / self.count if self.count else 0.0


# ------------------------------------------------------------------ running


Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]


@contextlib.contextmanager
def runner(model: Any, device: str | None = None, what: str = "the model",
           source: str = "") -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """``model`` as a function from a CPU batch to its first output tensor (on the CPU), without gradients.

    An ``nn.Module`` runs in eval mode on ``device`` (its mode is restored
    afterwards; it stays on ``device``), or where its parameters are when
    ``device`` is None (it is not moved); an ``ExportedProgram`` runs its
    module; an onnxruntime session is fed numpy; any other callable is called.
    Failures are one line naming ``what``, the data (``source``) and the batch shape.
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    restore = None
    if type(model).__module__.startswith("onnxruntime"):
        session, name = model, model.get_inputs()[0].name
        call = lambda x: session.run(None, {name: x.numpy()})[0]  # noqa: E731
    elif isinstance(model, nn.Module):
        was_training = model.training
        with contextlib.suppress(NotImplementedError):  # torch.export modules refuse eval()
            model.eval()
        restore = lambda: model.train(was_training)  # noqa: E731
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        else:
            try:
                model.to(device)
            except Exception as e:
                raise NdcError(f"cannot move {what} to {device}: {first_line(e)}") from None
        call = lambda x: model(x.to(device))  # noqa: E731
    elif callable(model):
        call = model
    else:
        raise NdcError(f"cannot evaluate {what}: a {type(model).__name__} is not a model")

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            with torch.no_grad():
                out = call(x)
        except NdcError:
            raise
        except Exception as e:
            raise NdcError(f"{what} does not run on {source + ' ' if source else ''}batches of shape {fmt_shape(x.shape)}: "
                           f"{type(e).__name__}: {first_line(e)}") from None
        leaves = [t for t in tree_leaves(out) if isinstance(t, (torch.Tensor, np.ndarray))]
        if not leaves:
            raise NdcError(f"{what} returned no tensor")
        first = torch.as_tensor(leaves[0]).detach().cpu()
        if first.dim() == 0 or first.shape[0] != x.shape[0]:
            raise NdcError(f"{what} returns shape {fmt_shape(first.shape)} for a batch of {x.shape[0]}; "
                           "scoring needs one output row per example")
        return first

    try:
        yield run
    finally:
        if restore is not None:
            with contextlib.suppress(NotImplementedError):
                restore()


def scores(model: Any, batches: Batches, metrics: Sequence[Metric], *, teacher: Any = None,
           teacher_metrics: Sequence[Metric] = (), device: str | None = None,
           source: str = "") -> tuple[list[float], list[float], int]:
    """One pass over ``batches``: ``model``'s value of each of ``metrics``, the teacher's own value of each of
    ``teacher_metrics`` (scored against the labels), and the number of examples.

    The teacher runs only when a metric needs its outputs or ``teacher_metrics`` is not empty.
    """
    use_teacher = teacher is not None and (any(m.needs_teacher or m.kind == "function" for m in metrics)
                                          or teacher_metrics)
    if teacher_metrics and teacher is None:
        raise ValueError("teacher_metrics need a teacher")
    for m in metrics:
        if m.needs_teacher and teacher is None:
            raise NdcError(f"{m.title} needs the teacher to compare with")
    tallies = [m.tally() for m in metrics]
    teacher_tallies = [m.tally() for m in teacher_metrics]
    n = 0
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(runner(model, device, "the model", source))
        run_teacher = stack.enter_context(runner(teacher, device, "the teacher", source)) if use_teacher else None
        for x, y in batches:
            y = y.cpu() if isinstance(y, torch.Tensor) else y  # data held on a GPU; the runners return host outputs
            out = run(x)
            t = run_teacher(x) if run_teacher is not None else None
            for tally in tallies:
                tally.add(out, t, y)
            for tally in teacher_tallies:
                tally.add(t, t, y)
            n += len(x)
    if n == 0:
        raise NdcError("no examples to score")
    return [t.result() for t in tallies], [t.result() for t in teacher_tallies], n


def score(model: Any, batches: Batches, metric: Metric, teacher: Any = None, device: str | None = None) -> float:
    """``model``'s value of ``metric`` over ``batches`` (``teacher`` for the metrics that compare with it).

    >>> score(student, data.batches("test", 256), Metric("accuracy"))   # doctest: +SKIP
    0.912
    """
    return scores(model, batches, [metric], teacher=teacher, device=device)[0][0]

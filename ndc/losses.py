"""Losses of end-to-end training (``ndc finetune``, ``ndc kd``): one for each kind of head, and auto's choice.

With ``S`` the student's output, ``T`` the teacher's and ``y`` the labels::

    kd   τ² · CE(softmax(T/τ), softmax(S/τ)) + λ · CE(y, softmax(S))       classifiers (Hinton et al.)
    ce   CE(y, softmax(S))                                               labels alone, no teacher
    mse  MSE(S, T) + λ · MSE(S, y)                                       any head: regression, features
    bce  BCE(σ(S), σ(T)) + λ · BCE(σ(S), y)                              sigmoid / multi-label heads

``mse`` matches the teacher's outputs themselves, the natural end-to-end
continuation of neighbourhood distillation (whose jobs match each
neighbourhood's outputs the same way) for a model of any kind. ``bce``
matches the teacher's probabilities; when the model computes the sigmoid
itself (``probabilities=True``), its outputs are used as they are. The label
term is added only where the data has labels of the loss's kind (class
indices for kd, one per row of scores: per example, or per position for a
language model; values of the output's size for mse; 0/1 targets for bce)
and λ > 0; unlabelled data, and labels that do not fit, train on the
teacher alone.

The paper's eq. 3 has no τ² factor; we follow Hinton et al. (2015) and scale
the soft term by τ², which keeps its gradients the same size as the hard
term's whatever τ is, so λ means the same at every temperature
(``tau_squared=False`` gives the paper's form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ndc.errors import NdcError, fmt_shape
from ndc.heads import Head, label_kind, label_misfit, labels_fit
from ndc.metrics import per_position

LOSSES = ("kd", "ce", "mse", "bce")
LOSS_CHOICES = ("auto", *LOSSES)
_EPS = 1e-6  # probabilities are clamped this far from 0 and 1 before a logarithm


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, tau: float = 2.5,
            lam: float = 1.0, tau_squared: bool = True) -> torch.Tensor:
    """Hinton's loss: soft cross entropy with the teacher at temperature τ (× τ²) plus λ × label cross entropy.

    Token logits ``(B, L, V)`` count every position (labels ``(B, L)``; -100 is ignored).
    """
    if labels is not None and lam != 0:
        _class_labels(labels, student_logits)
    student_logits, teacher_logits, *rest = per_position(student_logits, teacher_logits, *([labels] if labels is not None else []))
    labels = rest[0] if rest else None
    soft_targets = F.softmax(teacher_logits / tau, dim=1)
    soft = -(soft_targets * F.log_softmax(student_logits / tau, dim=1)).sum(dim=1).mean()
    if tau_squared:
        soft = soft * tau * tau
    if labels is None or lam == 0:
        return soft
    return soft + lam * F.cross_entropy(student_logits, labels)


def mse_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None, lam: float = 1.0) -> torch.Tensor:
    """Mean squared error to the teacher's outputs, plus λ × mean squared error to the targets."""
    loss = F.mse_loss(student, teacher)
    if targets is None or lam == 0:
        return loss
    return loss + lam * F.mse_loss(student, _like(targets, student))


def bce_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None, lam: float = 1.0,
             probabilities: bool = False) -> torch.Tensor:
    """Binary cross entropy with the teacher's probabilities, plus λ × binary cross entropy with 0/1 targets.

    ``probabilities``: the outputs already are probabilities (the model ends in a sigmoid); otherwise they are
    logits and the sigmoid is applied here (in the numerically stable form).
    """
    def bce(target: torch.Tensor) -> torch.Tensor:
        if probabilities:
            return F.binary_cross_entropy(student.clamp(_EPS, 1 - _EPS), target.clamp(0, 1))
        return F.binary_cross_entropy_with_logits(student, target)

    loss = bce(teacher if probabilities else torch.sigmoid(teacher))
    if targets is None or lam == 0:
        return loss
    return loss + lam * bce(_like(targets, student))


def _class_labels(labels: torch.Tensor, logits: torch.Tensor) -> None:
    """Refuse class labels that are not one per row of scores: (B,) for (B, K), (B, L) for a language model's (B, L, V)."""
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise NdcError(f"class labels of shape {fmt_shape(labels.shape)} do not fit scores of shape "
                       f"{fmt_shape(logits.shape)}: one label per row of scores is needed")


def _like(targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    if targets.numel() != outputs.numel():
        raise NdcError(f"targets of shape {fmt_shape(targets.shape)} do not fit outputs of shape {fmt_shape(outputs.shape)}")
    return targets.reshape(outputs.shape).to(outputs.dtype)


@dataclass(frozen=True)
class Loss:
    """One training loss, by name, with its settings; ``loss(student_out, teacher_out, y)`` gives the batch's loss.

    ``labels``: whether the label term is used (the data has labels the loss
    can use); without it only the teacher's outputs are matched.
    """

    name: str
    tau: float = 2.5
    lam: float = 1.0
    tau_squared: bool = True
    probabilities: bool = False
    labels: bool = True

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise NdcError(f"unknown --loss {self.name!r}; valid: {', '.join(LOSS_CHOICES)}")

    @property
    def needs_teacher(self) -> bool:
        return self.name != "ce"

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        y = y if self.labels else None
        if self.name == "ce":
            if y is None:
                raise NdcError("--loss ce needs class labels")
            _class_labels(y, student)
            return F.cross_entropy(*per_position(student, y))
        if teacher is None:
            raise NdcError(f"--loss {self.name} needs the teacher's outputs")
        if self.name == "kd":
            return kd_loss(student, teacher, y, self.tau, self.lam, self.tau_squared)
        if self.name == "mse":
            return mse_loss(student, teacher, y, self.lam)
        return bce_loss(student, teacher, y, self.lam, self.probabilities)


# ------------------------------------------------------------------ choice


def choose_loss(requested: str, head: Head, data: Any) -> tuple[str, bool, str]:
    """``(loss, labels, why)``: the loss ``requested`` (or auto's choice) for the teacher's ``head`` and ``data``,
    whether its label term can use ``data``'s labels, and a line saying what was chosen and why.

    auto: ``bce`` for a sigmoid head or 0/1 targets with one value per output;
    ``kd`` for class scores (more than one output per example); ``mse`` for
    everything else (regression heads, real-valued targets, outputs that are
    not a vector). A request the head cannot support (kd on a feature map,
    ce without class labels) is one line saying what fits.
    """
    if requested not in LOSS_CHOICES:
        raise NdcError(f"unknown --loss {requested!r}; valid: {', '.join(LOSS_CHOICES)}")
    kinds = label_kind(head, data)
    binary = kinds == "targets" and bool(getattr(data, "binary", False)) and _per_example(data) == head.scores
    regression = kinds == "targets" and not binary
    if requested == "auto":
        if head.scores is not None and (head.sigmoid or binary):
            name, why = "bce", ("the teacher's output comes from a sigmoid" if head.sigmoid
                                else "the labels are 0/1 targets, one per output")
        elif head.scores is not None and head.scores > 1 and not regression:
            name, why = "kd", f"the teacher outputs {head.scores} class scores"
        else:
            name, why = "mse", (f"the teacher's output {head.describe()} is not class scores" if not regression
                                else "the labels are real-valued targets")
    else:
        name, why = requested, "as asked"
        if name in ("kd", "ce", "bce") and head.scores is None:
            raise NdcError(f"--loss {name} needs a vector of scores per example, but the teacher outputs "
                           f"{head.describe()}; use --loss mse")
        if name == "ce" and kinds != "classes":
            raise NdcError(f"--loss ce trains on class labels alone, but {data.name} has "
                           f"{'no labels' if kinds == 'none' else 'targets, not class labels'}; use "
                           f"{'--loss bce (0/1 targets, one per output)' if binary else '--loss mse or kd'}")
        if name == "ce" and not labels_fit(head, data):
            raise NdcError(f"--loss ce trains on class labels alone, but {label_misfit(head, data)}; use --loss kd")
    labels = _labels_usable(name, kinds, data, head, binary)
    if kinds == "none":
        tail = "" if name == "ce" else f"; {data.name} has no labels, so only the teacher is matched"
    elif labels:
        tail = ""
    elif kinds == "classes" and head.scores is not None and not labels_fit(head, data):
        tail = f"; {label_misfit(head, data)}, so only the teacher is matched"
    else:
        tail = f"; the labels of {data.name} do not fit it, so only the teacher is matched"
    if requested == "kd" and head.sigmoid:
        tail += "; the teacher ends in a sigmoid: --loss bce matches its probabilities, kd softmaxes them as class scores"
    return name, labels, f"loss {name}: {why}{tail}"


def _per_example(data: Any) -> int | None:
    shape = getattr(data, "target_shape", None)
    return None if shape is None else math.prod(shape)


def _labels_usable(name: str, kinds: str, data: Any, head: Head, binary: bool) -> bool:
    if kinds == "classes":
        if not labels_fit(head, data):
            return False
        if name in ("kd", "ce"):
            return True  # labels the model has no output for are refused by DataSource.check_classes
        return name == "bce" and head.scores == 1 and data.classes is not None and data.classes <= 2
    if kinds == "targets":
        return (name == "mse" and _per_example(data) == math.prod(head.shape)) or (name == "bce" and binary)
    return False

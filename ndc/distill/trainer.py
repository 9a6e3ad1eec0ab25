"""One candidate's training, with no file I/O: both engines drive it step by step.

A :class:`CandidateTrainer` owns its student, optimiser, learning-rate
schedule, sparsity ramp, early stopping and best weights. An engine feeds it
batches (:meth:`loss`, then a backward the engine runs, then :meth:`step`),
asks it to :meth:`evaluate` now and then, and finally publishes its
:meth:`results`. Its loss depends only on its own parameters, so summing the
losses of many trainers and running one backward trains each of them exactly
as alone.

Subclasses train other kinds of job through the same interface:
:class:`~ndc.distill.slimmable.SlimmableTrainer` (one weight-shared student
for several widths: :meth:`outputs` has one output per width and
:meth:`results` one candidate per width) and
:class:`~ndc.distill.gates.GatedTrainer` (learned channel gates). The engines
know nothing of either.

Loss (the paper's eq. 4-5): ``L_i = L_{i,0} + Σ_j α_j L_{i,j}`` where
``L_{i,j}`` is the mean squared error, normalised by the feature size, between
``T_{i+j}∘…∘T_{i+1}(S_i(a))`` and the teacher's own activation there.

Nothing here reads a value back to the host per step: training losses are
summed on the device and read at evaluation points, where finiteness is
checked (a non-finite loss fails this candidate alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ndc.distill.config import DistillConfig
from ndc.ir import Spec
from ndc.training import BestWeights, SparsityRamp, compiled, cosine, track_running_stats


class CandidateFailed(Exception):
    """This candidate cannot train on (its loss is not finite, or its student raised); the others go on."""


@dataclass
class Result:
    """One finished candidate a trainer hands its engine to publish (a slimmable trainer has one per width)."""

    spec: Spec
    model: nn.Module
    student: dict  # student.json: what rebuilds the architecture (spec, rewrite record), and which job made it
    initial: dict  # held-out errors before and after training: {"mse", "relative"}
    final: dict
    history: list[dict]
    metrics: dict = field(default_factory=dict)  # extra metrics.json entries


class CandidateTrainer:
    """Training state of one (neighbourhood, spec) candidate.

    ``index`` is the neighbourhood's position in the plan; ``ahead`` the frozen
    teacher parts of its look-ahead terms; ``total`` the planned optimiser steps.
    """

    def __init__(self, name: str, index: int, spec: Spec, key: str, student, ahead: list[nn.Module], cfg: DistillConfig,
                 total: int, device: str):
        self.name, self.index, self.spec, self.key = name, index, spec, key
        self.student = student
        self.model = student.module.to(device)
        self.ahead = ahead
        self.alphas = cfg.alphas()[: len(ahead)]
        self.lookahead = len(ahead)
        self.total = total
        self.patience = cfg.patience
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay) if self.params else None
        self.base_lr = cfg.lr
        self.norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if cfg.frozen_bn else []
        if not cfg.frozen_bn:
            track_running_stats(self.model)
        self.ramp = SparsityRamp(student.pruner, spec.sparsity, total) if student.pruner is not None else None
        self.best: BestWeights | None = None
        self.steps = 0
        self.resumed_from = 0
        self.history: list[dict] = []
        self.initial: dict | None = None
        self.stopped_early = False
        self.failed: str | None = None
        self._loss_sum = torch.zeros((), device=device)
        self._loss_count = 0
        self._objective = self.objective
        self.train_mode()

    def compile(self, mode: str) -> None:
        """Train through ``torch.compile`` (``--compile``): the objective's forward and backward become compiled graphs."""
        self._objective = compiled(self.objective, mode)

    @property
    def label(self) -> str:
        return f"{self.name} {self.spec}"

    @property
    def active(self) -> bool:
        return self.failed is None and not self.stopped_early and self.steps < self.total

    # ------------------------------------------------------------------ steps
    def loss(self, batch) -> torch.Tensor:
        """The loss on one batch (train mode, graph kept for the engine's backward)."""
        a, targets = batch.pair(self.index, self.lookahead)
        if not self.model.training:  # set once, not every step: it walks every module (evaluations restore it)
            self.train_mode()
        return self.track(self._objective(a, targets))

    def objective(self, a: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """What this kind of job minimises on inputs ``a`` (a subclass's other objective goes here)."""
        return self.against(self.model(a), targets)[0]

    def train_mode(self) -> None:
        self.model.train()
        for m in self.norms:  # --bn-stats frozen: normalise with the teacher's running statistics
            m.eval()

    def against(self, out: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eq. 4-5 for student output ``out``: the loss against ``targets``, and ``out`` with its look-ahead outputs."""
        loss = F.mse_loss(out.float(), targets[0])
        outs = [out]
        for j, part in enumerate(self.ahead):
            outs.append(part(outs[-1]))
            loss = loss + self.alphas[j] * F.mse_loss(outs[-1].float(), targets[j + 1])
        return loss, outs

    def track(self, loss: torch.Tensor) -> torch.Tensor:
        """Add ``loss`` to the training loss reported at the next evaluation (on the device: no sync)."""
        self._loss_sum += loss.detach()
        self._loss_count += 1
        return loss

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def step(self, scaler=None) -> None:
        """After the engine's backward: one optimiser step (through the fp16 loss scaler), the schedule, the sparsity ramp."""
        if self.optimizer is not None:
            if scaler is not None:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        self.steps += 1
        self._schedule()
        if self.ramp is not None:
            self.ramp.after_step(self.steps)

    # ------------------------------------------------------------- measuring
    def start(self, initial: dict) -> None:
        """The held-out error before training; a dense student's starting weights compete for best."""
        self.initial = initial
        dense = self.ramp is None
        self.best = BestWeights(self.model, initial["mse"] if dense else None, self.patience)

    def evaluate(self, heldout: dict) -> None:
        """Record a held-out measurement: history, best weights, early stopping, a non-finite loss."""
        train_loss = float(self._loss_sum) / max(self._loss_count, 1)
        self._loss_sum.zero_()
        self._loss_count = 0
        if not math.isfinite(train_loss) or not math.isfinite(heldout["mse"]):
            raise CandidateFailed(f"{self.label}: the loss became {train_loss if not math.isfinite(train_loss) else heldout['mse']} "
                                  f"by step {self.steps}; try a lower --lr")
        self.history.append({"step": self.steps, "train_loss": train_loss, "heldout_mse": heldout["mse"]})
        if self.comparable():
            self.best.offer(heldout["mse"])
            self.stopped_early = self.best.exhausted and self.steps < self.total

    def comparable(self) -> bool:
        """Whether the current weights are a valid student to keep as the best (a sparse one only at full sparsity)."""
        return self.ramp is None or self.ramp.ramped(self.steps)

    def fail(self, message: str) -> None:
        self.failed = " ".join(message.split())

    def outputs(self, a: torch.Tensor) -> list[torch.Tensor]:
        """The student's outputs on held-out inputs ``a``, one per candidate this trainer makes (eval mode is set by the caller)."""
        return [self.model(a)]

    def results(self, final: dict) -> list[Result]:
        """The finished candidates, after :meth:`settle`; ``final`` is :func:`heldout_errors`' entry for this trainer."""
        sparsity = None
        if self.ramp is not None:
            achieved = self.student.pruner.sparsity()
            sparsity = sum(achieved.values()) / len(achieved) if achieved else 0.0
        student = {"neighbourhood": self.name, "spec": str(self.spec), "record": self.student.record, "key": self.key,
                   "report": self.student.report}
        return [Result(self.spec, self.model, student, self.initial, final, self.history, {"sparsity": sparsity})]

    def release(self) -> None:
        """Free the device memory of a published trainer."""
        self.model = None
        self.student.module = None

    def settle(self) -> None:
        """The weights to publish: the best measured ones, at the target sparsity."""
        self.best.restore()
        if self.ramp is not None:
            self.ramp.finish()

    # ------------------------------------------------------------ checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON that resume this trainer exactly (see :meth:`load_state`)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.best is not None and self.best.state is not None:
            tensors.update({f"best.{k}": v for k, v in self.best.state.items()})
        if self.optimizer is not None:
            for i, group_state in self.optimizer.state_dict()["state"].items():
                for name, value in group_state.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optim.{i}.{name}"] = value
        if self.ramp is not None:
            tensors.update({f"mask.{k}": v for k, v in self.student.pruner.masks.items()})
        meta = {"key": self.key, "steps": self.steps, "history": self.history, "initial": self.initial,
                "best_score": None if self.best is None else self.best.score, "bad": 0 if self.best is None else self.best.bad}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        device = next(iter(self.model.state_dict().values())).device
        self.model.load_state_dict(part("model."))
        if self.optimizer is not None:
            state = self.optimizer.state_dict()
            for k, v in tensors.items():
                if k.startswith("optim."):
                    _, i, name = k.split(".", 2)
                    state["state"].setdefault(int(i), {})[name] = v
            self.optimizer.load_state_dict(state)
        if self.ramp is not None:
            self.student.pruner.masks.update({k: v.to(device) for k, v in part("mask.").items()})
        self.steps, self.history, self.initial = meta["steps"], meta["history"], meta["initial"]
        self.resumed_from = self.steps
        self.best = BestWeights(self.model, None, self.patience)
        best = part("best.")
        if best:
            self.best.state = {k: v.to(device) for k, v in best.items()}
        if meta.get("best_score") is not None:
            self.best.score = meta["best_score"]
        self.best.bad = meta.get("bad", 0)
        self._schedule()

    def _schedule(self) -> None:
        """The cosine learning rate at this step (a parameter group may scale it: ``lr_scale``)."""
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = self.base_lr * group.get("lr_scale", 1.0) * cosine(self.steps, self.total)


@torch.no_grad()
def heldout_errors(trainers: list[CandidateTrainer], batches) -> list[dict]:
    """Mean squared error and relative error ‖S(a) − T(a)‖ / ‖T(a)‖ of every trainer on the held-out batches.

    Each entry is ``{"mse", "relative", "members"}``: ``members`` has one
    ``{"mse", "relative"}`` per output of :meth:`CandidateTrainer.outputs`
    (one per width of a slimmable trainer), and the top-level values are
    their means (for a plain candidate, its own). One pass over the held-out
    batches serves every trainer; sums stay on the device and are read once
    at the end.
    """
    if not trainers:
        return []
    sums: list[list[list]] = [[] for _ in trainers]
    modes = [t.model.training for t in trainers]
    for t in trainers:
        t.model.eval()
    for batch in batches:
        for s, t in zip(sums, trainers):
            a, targets = batch.pair(t.index, 0)
            outs = t.outputs(a)
            while len(s) < len(outs):
                s.append([0.0, 0.0, 0])
            for acc, out in zip(s, outs):
                acc[0] = acc[0] + ((out - targets[0]) ** 2).sum()
                acc[1] = acc[1] + (targets[0] ** 2).sum()
                acc[2] += targets[0].numel()
    for t, mode in zip(trainers, modes):
        if mode:
            t.train_mode()
    out = []
    for per_trainer in sums:
        members = [_errors(float(d), float(q), n) for d, q, n in per_trainer] or [_errors(0.0, 0.0, 0)]
        out.append({"mse": sum(m["mse"] for m in members) / len(members),
                    "relative": sum(m["relative"] for m in members) / len(members), "members": members})
    return out


def _errors(sq_diff: float, sq_target: float, count: int) -> dict:
    if not count:
        return {"mse": math.nan, "relative": math.nan}
    return {"mse": sq_diff / count, "relative": math.sqrt(sq_diff / sq_target) if sq_target else math.nan}

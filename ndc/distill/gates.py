"""Gated neighbourhoods (FiGS): channel gates learned with a structured sparsity penalty choose each group's width.

``ndc distill --gates --gate-penalty L`` trains, in each neighbourhood's job,
one gate per channel of every shrinkable channel group. A gate is drawn from
the stretched logistic-sigmoid ("hard concrete") distribution,
``z = clamp(sigmoid((logit(u) + log α) / β) · (ζ − γ) + γ, 0, 1)`` with
``u ~ U(0, 1)``, so it is exactly 0 or 1 with positive probability and
differentiable in ``log α``. The loss is

    relative squared error of the output  +  L · size

where *size* is the student's parameter count over the neighbourhood's, each
channel counted by its *openness*: ``log α`` on a linear ramp from closed
(deterministic gate 0) to open (gate 1), inside which it is kept. A weight
tensor bound to two gated groups counts the product of their openness, so the
penalty has the structure of the real size. Because the ramp is linear, the
penalty pulls every gate equally hard wherever it stands: a channel closes
exactly when its marginal value to the distillation loss falls below ``L``
times its share of the neighbourhood's parameters. ``L`` is thus a price, in
relative squared error, of the whole neighbourhood. (Pricing the probability
that a gate is open instead, as L0 regularisation does, saturates near the
open end and then runs away once gates start closing: sizes jumped from
nothing removed to nearly everything between L = 0.3 and 3, measured.)
One ``L`` for every neighbourhood is the Lagrangian relaxation of the
budgeted search (least total error under a parameter budget): several values
(``--gate-penalty 0.1,0.3,1``) give each neighbourhood a menu of sizes, and
``ndc search --budget`` picks among them exactly, like among widths.

Where a gate acts: on the weights of the layers that *consume* the group (a
convolution's input channels, a linear layer's input features), so closing a
gate removes exactly that channel's contribution whatever lies between its
producer and its consumers (batch norms, activations, residual additions of
the same group). The layers are modules (fx) or, in exported graphs, their
ATen functions on ``get_attr`` weights: ``linear``, the convolutions, and
``addmm``/``mm`` by an ``(in, out)`` matrix (GPT-2's ``Conv1D``, a decomposed
``nn.Linear``). A group is gated only when every use of it is such a consumer
or passes it on channel by channel; a group that meets a norm over its
channels, a softmax along the axis that carries it, or a contraction without
weights (attention's ``q·kᵀ`` over the head dimension) keeps the teacher's
width, and ``metrics.json``'s ``"gates": {"ungated": ...}`` and the report say
which use stopped it. A softmax mixes only along its ``dim``: a group on
another axis passes through it channel by channel, so hand-written attention
(``(q @ kᵀ).softmax(-1) @ v``, the heads on a batch-like axis of the scores)
is gated per head, as ``F.scaled_dot_product_attention`` is.

Training has two phases: for the first ``GATE_PHASE`` of the steps gates are
sampled and penalised; then (the cosine learning rate restarted) each
gate is fixed closed, where its deterministic value (``log α`` alone) is 0,
or fully open, and the weights settle with the gates fixed, with early
stopping and best weights as in any job. Open means 1, not the deterministic
value: the penalty leaves a useful channel's gate wherever it balanced the
loss, often mid-ramp (0.4 for two attention heads at L = 0.3), and a gate
fixed there is a scale the weights, at their learning rate, would take
thousands of steps to undo (relative error 0.2 instead of 0.02, measured, and
worse the longer the gate phase). The
published student is the neighbourhood with the closed channels removed and
the open gates folded into the consumers' weights: a candidate like any other,
spec ``gates=L``, rebuilt by :func:`~ndc.passes.rewrite.rebuild_student` from
its record.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ndc.distill.config import DistillConfig
from ndc.distill.trainer import CandidateTrainer, Result
from ndc.training import BestWeights, cosine
from ndc.distill.views import borrow, lend, parameter_names
from ndc.ir import Spec
from ndc.passes.rewrite import Student, analyse, rebuild_student
from ndc.passes.rewrite.analysis import Analysis
from ndc.passes.rewrite.aten import _CONVS as _ATEN_CONVS, _matrix
from ndc.passes.rewrite.dims import Layout
from ndc.passes.rewrite.rules import _arg
from ndc.passes.rewrite.width import apply_width, make_record, reinitialise, report

DEFAULT_PENALTY = 0.3
GAMMA, ZETA, BETA = -0.1, 1.1, 2 / 3  # the stretch and temperature of the hard-concrete gate (Louizos et al., 2018)
OPEN = 2.5  # initial log α: every gate open (deterministic value 1 from log 11 ≈ 2.4 up): the job starts from the teacher
LIMIT = math.log(11) + 0.5  # log α stays in [-LIMIT, LIMIT]: just past where the deterministic gate is 0 and 1
GATE_PHASE = 0.7  # fraction of the steps with sampled, penalised gates; the rest settles the weights with the gates fixed
GATE_LR = 0.1  # log α moves on a scale of units whatever --lr the weights use
# The fewest gate steps in which a gate can close: Adam moves log α by about GATE_LR a step (at full learning rate)
CLOSING_STEPS = math.ceil((OPEN + math.log(11)) / GATE_LR)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Operations that pass a channel group on but mix its channels: statistics over channels (every group they read), and
# softmaxes (the groups on the axis they run along, their ``dim``, the argument after the input in every form).
_MIXING_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_aten = torch.ops.aten
_MIXING_FUNCTIONS = {F.layer_norm, F.group_norm, F.local_response_norm, F.normalize, torch.norm,
                     # the same in exported graphs (torch.export, every Hugging Face model)
                     _aten.layer_norm.default, _aten.native_layer_norm.default, _aten.group_norm.default,
                     _aten.native_group_norm.default, _aten.rms_norm.default, _aten.linalg_vector_norm.default}
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax,
                      _aten.softmax.int, _aten._softmax.default, _aten.log_softmax.int, _aten._log_softmax.default}
_MIXING_METHODS = {"norm"}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
# Reads of a tensor's shape, rank, dtype or device, not of its channels (``q.size()`` before splitting heads)
_METADATA_METHODS = {"size", "dim", "ndimension", "is_contiguous", "get_device"}
_METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
_LINEAR_FUNCTIONS = {F.linear, _aten.linear.default}
# Matrix products by a weight of shape (in, out) in exported graphs: GPT-2's Conv1D (``addmm(bias, x, weight)``), and
# nn.Linear decomposed (``addmm(bias, x, t(weight))``).
_MATRIX_FUNCTIONS = {_aten.addmm.default, _aten.mm.default}


# ------------------------------------------------------------------ analysis


def consumer(an: Analysis, node: fx.Node) -> tuple[str, int, Layout] | None:
    """``(weight name, axis, layout)`` when ``node`` consumes channels through a weight axis a gate can scale."""
    if node.op == "call_function":
        return _consumer_function(an, node)
    if node.op != "call_module":
        return None
    m = an.module(node)
    x = node.args[0] if node.args else None
    if not an.is_tensor(x):
        return None
    axes = an.axes(x)
    if isinstance(m, nn.Linear):
        return f"{node.target}.weight", 1, axes[-1]
    if isinstance(m, _CONVS + _TRANSPOSED) and m.groups == 1 and len(node.args) == 1 and not node.kwargs:
        ch = len(an.shape(x)) - (m.weight.dim() - 1)
        return f"{node.target}.weight", 0 if isinstance(m, _TRANSPOSED) else 1, axes[ch]
    return None


def _consumer_function(an: Analysis, node: fx.Node) -> tuple[str, int, Layout] | None:
    """:func:`consumer` for the function forms of the layers: ``F.linear`` and the ATen operators of exported graphs."""
    try:
        target = node.target
        kind = ("linear" if target in _LINEAR_FUNCTIONS else "matrix" if target in _MATRIX_FUNCTIONS
                else "conv" if target in _ATEN_CONVS else None)
    except TypeError:  # an unhashable callable: no layer
        return None
    if kind == "linear":  # F.linear(x, weight, bias): weight (out, in)
        x, w = node.args[0] if node.args else None, _arg(node, 1, "weight")
        if an.is_tensor(x) and isinstance(w, fx.Node) and w.op == "get_attr":
            return str(w.target), 1, an.axes(x)[-1]
    elif kind == "matrix":  # addmm(bias, x, w) / mm(x, w): w (in, out), the parameter itself or a transposed nn.Linear weight
        x, w = (list(node.args) + [None] * 3)[1:3] if target == _aten.addmm.default else (list(node.args) + [None] * 2)[:2]
        found = _matrix(an, w) if not node.kwargs else None
        if an.is_tensor(x) and found is not None:
            name, out_axis = found
            return str(name), 1 - out_axis, an.axes(x)[-1]
    elif kind == "conv":  # conv2d(x, weight, ...) / convolution(...): weight (out, in, ...), transposed (in, out, ...)
        groups_at, transposed = _ATEN_CONVS[target]
        if transposed is None:
            transposed = bool(_arg(node, 6, "transposed", False))
        x, w = node.args[0] if node.args else None, _arg(node, 1, "weight")
        if (an.is_tensor(x) and isinstance(w, fx.Node) and w.op == "get_attr" and _arg(node, groups_at, "groups", 1) == 1):
            ch = len(an.shape(x)) - (an.tensor(str(w.target)).dim() - 1)
            return str(w.target), 0 if transposed else 1, an.axes(x)[ch]
    return None


def _mixed(an: Analysis, node: fx.Node, reads: set[int]) -> set[int]:
    """The groups among ``reads`` whose channels ``node`` mixes: all for a norm, for a softmax those on its ``dim``."""
    if node.op == "call_module":
        m = an.module(node)
        if isinstance(m, _SOFTMAX_MODULES):
            return _along(an, node, m.dim, reads)
        return reads if isinstance(m, _MIXING_MODULES) else set()
    if node.op == "call_function":
        try:
            if node.target in _SOFTMAX_FUNCTIONS:
                return _along(an, node, _arg(node, 1, "dim"), reads)
            return reads if node.target in _MIXING_FUNCTIONS else set()
        except TypeError:  # an unhashable callable: nothing known about it, so assume it mixes
            return reads
    if node.op == "call_method" and node.target in _SOFTMAX_METHODS:
        return _along(an, node, _arg(node, 1, "dim"), reads)
    return reads if node.op == "call_method" and node.target in _MIXING_METHODS else set()


def _along(an: Analysis, node: fx.Node, dim, reads: set[int]) -> set[int]:
    """The groups among ``reads`` on axis ``dim`` of ``node``'s input: a softmax treats its other axes as a batch.

    Without a known axis (``dim=None``, the legacy implicit one, or a value computed in the graph) all of them.
    """
    x = node.args[0] if node.args else None
    if not isinstance(dim, int) or not an.is_tensor(x):
        return reads
    return reads & set(an.dims.leaves(an.axes(x)[dim]))


def _metadata(node: fx.Node) -> bool:
    """``node`` reads no channel's value: a gate changes nothing it sees (the analysis pins any size it reads)."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRIBUTES


def _leaves(an: Analysis, value) -> set[int]:
    # a tensor's layout is a list of axes; a tuple's, a tuple of them (None for an entry that is no tensor)
    layouts = value if isinstance(value, list) else [axis for axes in (value or ()) if axes is not None for axis in axes]
    return {g for layout in layouts for g in an.dims.leaves(layout)}


def gated_groups(part: fx.GraphModule, an: Analysis) -> tuple[list[int], list[tuple[str, int, Layout]], dict[int, str]]:
    """The channel groups that can carry gates, the weight axes the gates scale (see the module docstring), and why
    each other free group carries none."""
    free = set(an.free_groups())
    bad: dict[int, str] = {}  # a group -> the first use of it that a gate cannot act through
    points: dict[tuple[str, int], Layout] = {}
    for node in part.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or _metadata(node):
            continue
        reads: set[int] = set()
        fx.map_arg((node.args, node.kwargs), lambda a: reads.update(_leaves(an, an.layouts.get(a)) & free))
        if not reads:
            continue
        point = consumer(an, node)
        consumed = set()
        if point is not None:
            points.setdefault(point[:2], point[2])  # a module called twice: its weight is scaled once
            consumed = set(an.dims.leaves(point[2])) & free
        passed = _leaves(an, an.layouts.get(node))
        mixed = _mixed(an, node, reads)
        for g in sorted(reads - consumed):
            if g in mixed:
                bad.setdefault(g, f"it meets {an.where(node)}, taken to mix its channels (a norm over them, a softmax "
                                  "along their axis)")
            elif g not in passed:
                bad.setdefault(g, f"{an.where(node)} combines its channels without a weight a gate can scale (a "
                                  "product such as attention's q·kᵀ, a sum over them, a grouped convolution)")
    gated = [g for g in an.free_groups() if g not in bad
             and any(g in an.dims.leaves(layout) for layout in points.values())]
    used = [(name, axis, layout) for (name, axis), layout in points.items()
            if any(g in gated for g in an.dims.leaves(layout))]
    why = {g: bad.get(g, "no layer here takes its channels as inputs through a weight a gate can scale")
           for g in an.free_groups() if g not in gated}
    return gated, used, why


# ------------------------------------------------------------------- student


class GatedStudent(nn.Module):
    """The neighbourhood at teacher width (``full``) with one gate per channel of each gated group.

    ``net`` is a parameter-less copy that runs with ``full``'s weights, the
    gated consumers' weights scaled by the gates of their input channels.
    """

    def __init__(self, part: fx.GraphModule):
        super().__init__()
        self.an = an = analyse(part)
        self.groups, points, self.ungated = gated_groups(part, an)  # ungated: why each other free group isn't
        self.full = copy.deepcopy(part).requires_grad_(True)
        self.net = copy.deepcopy(part)
        self.names = parameter_names(self.full)
        borrow(self.net, self.names)
        sizes = [an.dims.sizes[g] for g in self.groups]
        self.log_alpha = nn.ParameterList([nn.Parameter(torch.full((n,), OPEN)) for n in sizes])
        slot = {g: 1 + sum(sizes[:k]) for k, g in enumerate(self.groups)}  # slot 0 holds the constant 1
        # A gather index per gated weight axis: which gate scales each element (a flattened C·H·W axis repeats it).
        # Index tensors are buffers (not saved): they move with the module, never copied to the device per step.
        self.points = []
        for k, (name, axis, layout) in enumerate(points):
            self.register_buffer(f"point{k}", self._index(layout, slot), persistent=False)
            self.points.append((name, axis, f"point{k}"))
        self.fixed: list[torch.Tensor] | None = None  # after the gate phase: the gates, fixed
        self.kept: list[torch.Tensor] = []  # and the channels each group keeps
        self._cost = self._cost_terms(dict(self.full.named_parameters()), slot, 1 + sum(sizes))

    def _index(self, layout: Layout, slot: dict[int, int]) -> torch.Tensor:
        parts = []
        for s in self.an.dims.resolve(layout):
            n = self.an.dims.sizes[s.atom]
            base = slot[s.atom] + torch.arange(n) if s.atom in slot else torch.zeros(n, dtype=torch.long)
            parts.append(base.repeat_interleave(s.inner))
        return torch.cat(parts)

    def _cost_terms(self, params: dict[str, torch.Tensor], slot: dict[int, int], slots: int) -> tuple:
        """Constant parameters, and per parameter with gated axes: its size and, per axis, a count of each gate slot."""
        constant, terms = 0, []
        for name, p in params.items():
            axes = self.an.params.get(name, {})
            counts = []
            for axis, layout in sorted(axes.items()):
                c = torch.zeros(slots)
                for s in self.an.dims.resolve(layout):
                    if s.atom in slot:
                        c[slot[s.atom]: slot[s.atom] + self.an.dims.sizes[s.atom]] += s.inner
                    else:
                        c[0] += self.an.dims.sizes[s.atom] * s.inner
                if c[1:].any():
                    counts.append(c / p.shape[axis])
            if counts:
                self.register_buffer(f"counts{len(terms)}", torch.stack(counts), persistent=False)
                terms.append((p.numel(), f"counts{len(terms)}"))
            else:
                constant += p.numel()
        return constant, terms, sum(p.numel() for p in params.values())

    # -------------------------------------------------------------- gates
    def gates(self) -> list[torch.Tensor]:
        """Each group's gates now: fixed, sampled (training), or deterministic (evaluation)."""
        if self.fixed is not None:
            return self.fixed
        out = []
        for la in self.log_alpha:
            if self.training:
                u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
                s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / BETA)
            else:
                s = torch.sigmoid(la)
            out.append((s * (ZETA - GAMMA) + GAMMA).clamp(0, 1))
        return out

    def openness(self) -> list[torch.Tensor]:
        """Each gate's openness in [0, 1]: log α on a linear ramp from closed (``-LIMIT``) to open (``LIMIT``)."""
        return [(la + LIMIT) / (2 * LIMIT) for la in self.log_alpha]

    @torch.no_grad()
    def project(self) -> None:
        """Keep log α on the ramp, where the penalty's pull is the same wherever a gate stands."""
        for la in self.log_alpha:
            la.clamp_(-LIMIT, LIMIT)

    def size_fraction(self) -> torch.Tensor | float:
        """The student's parameters, each channel counted by its openness, over the neighbourhood's (differentiable).

        A weight between two gated groups counts the product of their
        openness: the structure of the real size, not a sum over channels.
        """
        constant, terms, total = self._cost
        if not terms:
            return 0.0  # nothing gated: the size is fixed
        probs = self.openness()
        slots = torch.cat([torch.ones(1, device=probs[0].device, dtype=probs[0].dtype), *probs])
        size = sum(numel * (getattr(self, counts) @ slots).prod() for numel, counts in terms)
        return (size + constant) / total

    def _scaled(self, gates: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        params = dict(self.full.named_parameters(remove_duplicate=False))
        out = {n: params[n] for n in self.names}
        if not gates:
            return out
        values = torch.cat([torch.ones(1, device=gates[0].device, dtype=gates[0].dtype), *gates])
        for name, axis, index in self.points:
            w = out[name]
            shape = [1] * w.dim()
            shape[axis] = -1
            out[name] = w * values[getattr(self, index)].view(shape)
        return out

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        lend(self.net, self._scaled(self.gates()))
        return self.net(a)

    # ------------------------------------------------------------- the end
    @torch.no_grad()
    def fix(self, round_to: int = 1) -> None:
        """End the gate phase: the channels whose deterministic gate is open are kept, their gates at 1, the rest at 0.

        At least one channel per group (``round_to`` when that fits) is kept; a
        channel kept only for that has gate 0, so it changes nothing.
        """
        was = self.training
        self.eval()
        gates = self.gates()
        self.train(was)
        self.fixed, self.kept = [], []
        for z, la in zip(gates, self.log_alpha):
            keep = z > 0
            self.fixed.append(keep.to(z.dtype))
            want = min(len(z), max(1, -(-int(keep.sum()) // round_to) * round_to))
            if int(keep.sum()) < want:
                keep[torch.argsort(-la.detach(), stable=True)[:want]] = True
            self.kept.append(torch.nonzero(keep).flatten().cpu())
            la.requires_grad_(False)

    @torch.no_grad()
    def student(self, part: fx.GraphModule, spec: Spec, init: str, round_to: int, seed: int) -> tuple[fx.GraphModule, dict, list]:
        """After :meth:`fix`: the neighbourhood without its closed channels, open gates folded into the weights.

        Returns the module, its rewrite record and its report; on the same
        inputs it computes what this gated student computes with its gates fixed.
        """
        folded = copy.deepcopy(part).cpu()
        state = {n: v.detach().cpu() for n, v in self._scaled(self.fixed).items()}
        state.update({n: v.cpu() for n, v in self.net.state_dict().items()})
        folded.load_state_dict(state)
        kept = {g: idx for g, idx in zip(self.groups, self.kept) if len(idx) < self.an.dims.sizes[g]}
        rows = report(self.an, kept, spec)
        keys = self.an.keys()
        gated = {keys[g] for g in self.groups}
        ungated = {keys[g]: why for g, why in self.ungated.items() if g in keys}
        for row in rows:
            if not row["shrunk"] and row["dim"] in gated:
                row["why"] = "its gates kept every channel"
            elif not row["shrunk"] and row["dim"] in ungated:
                row["why"] = f"not gated: {ungated[row['dim']]}"
        return apply_width(folded, self.an, kept), make_record(self.an, kept, spec, init, round_to, seed), rows


class GatedTrainer(CandidateTrainer):
    """A gated job: one neighbourhood, its gates and weights (see the module docstring)."""

    @classmethod
    def build(cls, part: fx.GraphModule, name: str, index: int, spec: Spec, key: str, ahead: list[nn.Module],
              cfg: DistillConfig, total: int, device: str, seed: int) -> "GatedTrainer":
        gated = GatedStudent(part)
        if cfg.init == "random":
            reinitialise(gated.full, seed)
        return cls(name, index, spec, key, gated, part, ahead, cfg, total, device, seed)

    def __init__(self, name: str, index: int, spec: Spec, key: str, gated: GatedStudent, part: fx.GraphModule,
                 ahead: list[nn.Module], cfg: DistillConfig, total: int, device: str, seed: int):
        super().__init__(name, index, spec, key, Student(gated, spec, {}, []), ahead, cfg, total, device)
        self.part, self.penalty, self.round_to, self.init, self.seed = part, float(spec.gates), cfg.round_to, cfg.init, seed
        self.gate_steps = max(1, math.ceil(GATE_PHASE * total))
        gates = list(gated.log_alpha)
        if gates:  # gates learn at their own rate, without weight decay
            ids = {id(p) for p in gates}
            self.optimizer = torch.optim.Adam(
                [{"params": [p for p in self.params if id(p) not in ids]},
                 {"params": gates, "lr_scale": GATE_LR / cfg.lr, "weight_decay": 0.0}], lr=cfg.lr, weight_decay=cfg.weight_decay)
            self._schedule()

    def objective(self, a: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        loss = super().objective(a, targets)
        loss = loss / targets[0].float().pow(2).mean().clamp_min(1e-12)  # relative: the penalty's price is in these units
        if self.model.fixed is None:
            loss = loss + self.penalty * self.model.size_fraction()
        return loss

    def step(self, scaler=None) -> None:
        super().step(scaler)
        self.model.project()
        if self.model.fixed is None and self.steps >= self.gate_steps:
            self.model.fix(self.round_to)

    def _schedule(self) -> None:
        """The usual cosine, restarted when the gates are fixed: the weights re-fit them at a full learning rate."""
        if self.steps < self.gate_steps:
            factor = cosine(self.steps, self.total)
        else:
            factor = cosine(self.steps - self.gate_steps, self.total - self.gate_steps)
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = self.base_lr * group.get("lr_scale", 1.0) * factor

    def start(self, initial: dict) -> None:
        self.initial = initial
        # the teacher-width start is no valid gated student, unless nothing here can carry a gate (attention alone)
        self.best = BestWeights(self.model, None if self.model.groups else initial["mse"], self.patience)

    def comparable(self) -> bool:
        return self.model.fixed is not None

    def settle(self) -> None:
        if self.model.fixed is None:
            self.model.fix(self.round_to)
        super().settle()

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        if self.steps >= self.gate_steps:
            self.model.fix(self.round_to)

    def results(self, final: dict) -> list[Result]:
        module, record, rows = self.model.student(self.part, self.spec, self.init, self.round_to, self.seed)
        rebuilt = rebuild_student(self.part, self.spec, record)  # what stitch will rebuild, loaded strictly
        rebuilt.load_state_dict(module.state_dict())
        sizes = self.model.an.dims.sizes
        if (self.init == "teacher" and all(len(idx) == sizes[g] for g, idx in zip(self.model.groups, self.model.kept))
                and final["mse"] > self.initial["mse"]):
            rebuilt.load_state_dict(self.part.state_dict())  # no gate closed: the teacher's own weights are the better
            final = self.initial                             # student of this very size
        keys = self.model.an.keys()
        job = {"kind": "gates", "penalty": self.penalty, "gate_steps": self.gate_steps}
        info = {"penalty": self.penalty,
                "groups": {keys[g]: {"teacher": self.model.an.dims.sizes[g], "kept": len(idx)}
                           for g, idx in zip(self.model.groups, self.model.kept)},
                # the groups the width rewrite could shrink that carry no gate, and why (a "shrank nothing" says it)
                "ungated": {keys.get(g, self.model.an.name(g)): why for g, why in self.model.ungated.items()}}
        doc = {"neighbourhood": self.name, "spec": str(self.spec), "record": record, "key": self.key, "report": rows,
               "job": job}
        return [Result(self.spec, rebuilt, doc, self.initial, final, self.history, {"job": job, "gates": info})]

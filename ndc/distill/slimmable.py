"""Slimmable neighbourhoods: one job trains one weight-shared student for several widths.

``ndc distill --slimmable 0.25,0.5,0.75,1.0`` gives each neighbourhood one job
instead of four. The job holds the teacher-width parameters once; its width-k
student is the narrowed neighbourhood whose every shrinkable channel group
keeps its first k·C channels in the teacher's importance order -- exactly the
channels :func:`~ndc.passes.rewrite.make_student` keeps for ``width=k``, so
the widths are nested and each one's rewrite record is the record of a
separately made ``width=k`` student. Its parameters are slices of the shared
ones (:mod:`ndc.distill.views`), except its batch norms, which are its own
(switchable batch norms: scale, shift and running statistics per width).

Every step runs every width on the same batch and sums their losses (one
backward), in one of two ways:

* ``chain`` (in-place distillation with teacher assistants, IPKD-TA): the
  widest width learns from the teacher, each narrower one from the next wider
  one's outputs (detached), look-ahead outputs included;
* ``teacher`` (plain in-place distillation, ``--assistant none``): every width
  learns from the teacher.

The widths share their parameters (one Adam over them) for the first
``SHARED_FRACTION`` of the job's steps only; then each width goes on with its
own copy of its slices and a fresh Adam. Sharing to the end shaped the shared
channels for the narrowest width, whose loss is the largest and whose best
weights lie far from the teacher's (on ResNet-14, its separate job moves the
channels it keeps by 41-74% of their norm, a width-0.75 job moves the same
channels by 18-29%, in another direction): the wider the width, the worse
than its separate job (held-out error 1.05x, 1.20x, 1.65x at widths 0.25,
0.5, 0.75). Reweighting the widths' losses, one Adam per width, a smaller step
on the shared channels or training fewer widths per step only traded one
width for another; a short shared start (10% of the steps) and private
training after it puts every width at or below its separate job (0.97x,
0.97x, 0.99x; ResNet-20: 0.95x, 0.98x, 0.99x), mostly thanks to the restart
of Adam, which alone takes a single width to 0.96-0.98x.

Held-out errors are measured per width against the teacher; early stopping
and the best weights follow their mean. When the job finishes, every width is
published as a candidate of its own (spec ``width=k,slim=MODE``, folder
``jobs/<nb>/width-k_slim-MODE/``) with its sliced weights, its rewrite record
and the job that made it, so ``search``, ``stitch``, ``probe`` and ``eval``
use it like any other candidate, and it never replaces the separately
trained ``width=k``. All widths share one key, which covers every width and
the assistant mode: changing either retrains the job.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ndc.distill.config import Candidate, DistillConfig, job_key
from ndc.distill.trainer import CandidateTrainer, Result
from ndc.distill.views import borrow, cut, lend, parameter_names, slices
from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.passes.rewrite import Student, analyse, make_student, rebuild_student
from ndc.passes.rewrite.width import reinitialise
from ndc.workspace import sha256_json

ASSISTANTS = {"chain": "chain", "none": "teacher"}  # --assistant -> the spec's slim mode
# The share of a job's steps that trains the widths on the shared parameters; for the rest each width trains its
# own copy of its slices (see SlimmableTrainer). 1.0 shares to the end (held-out error over the separate job's,
# ResNet-14, --assistant none: 1.05 / 1.20 / 1.65 at widths 0.25 / 0.5 / 0.75; 0.1: 0.97 / 0.97 / 0.99).
SHARED_FRACTION = 0.1


@dataclass(frozen=True)
class Job:
    """What one job trains: one candidate, or (slimmable) every width of one assistant mode, widest first."""

    neighbourhood: str
    members: tuple[Spec, ...]

    @property
    def spec(self) -> Spec:
        return self.members[0]


def jobs_of(candidates: list[Candidate]) -> list[Job]:
    """Group candidates into jobs: a plain candidate is a job; the ``slim`` candidates of a neighbourhood, per mode, one job."""
    jobs: dict[tuple, list[Spec]] = {}
    for c in candidates:
        group = (c.neighbourhood, c.spec.slim) if c.spec.slim is not None else (c.neighbourhood, None, c.spec)
        jobs.setdefault(group, []).append(c.spec)
    out = [Job(group[0], tuple(sorted(specs, key=lambda s: -s.width))) for group, specs in jobs.items()]
    for job in out:
        if job.spec.slim is not None and job.spec.width == 1.0 and len(job.members) == 1:
            raise NdcError("a slimmable job needs a width below 1.0 (width 1.0 alone is the teacher's neighbourhood)")
    return out


def key_of(teacher_sha: str, neighbourhood: dict, job: Job, config: DistillConfig) -> str:
    """A job's key; a slimmable job's covers all its widths (and, through their specs, its assistant mode)."""
    key = job_key(teacher_sha, neighbourhood, job.spec, config)
    if job.spec.slim is None:
        return key
    return sha256_json({"slimmable": [str(s) for s in job.members], "job": key, "shared": SHARED_FRACTION})


class SlimmableStudent(nn.Module):
    """Teacher-width parameters (``full``) shared by one narrowed copy of the neighbourhood per width (``widths``).

    ``widths[k]`` holds only its batch norms' parameters and statistics;
    :meth:`run` lends it slices of ``full``'s other parameters for one forward
    pass, or, after :meth:`unshare`, its own copy of them (``own[k]``). With ``fixed_widest`` the widest width (a teacher-initialised
    ``width=1.0``, i.e. the teacher's own neighbourhood) keeps its own frozen
    parameters and shares nothing.
    """

    def __init__(self, part: fx.GraphModule, students: list[Student], fixed_widest: bool = False):
        super().__init__()
        an = analyse(part)
        groups = {key: g for g, key in an.keys().items()}
        self.full = copy.deepcopy(part).requires_grad_(True)
        # Batch norms are switchable (Yu et al., slimmable networks): each width trains its own scale and shift
        # and keeps its own statistics; every other parameter is shared.
        private = {f"{m_name}.{p_name}".lstrip(".") for m_name, m in self.full.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) for p_name, _ in m.named_parameters(recurse=False)}
        self.names = [n for n in parameter_names(self.full) if n not in private]
        self.fixed_widest = fixed_widest
        self.cuts = []
        wider: dict[int, set[int]] = {}  # a group not listed keeps every channel
        for k, student in enumerate(students):
            kept = {groups[key]: torch.tensor(entry["kept"], dtype=torch.long) for key, entry in student.record["dims"].items()}
            channels = {g: set(idx.tolist()) for g, idx in kept.items()}
            if any(g in wider and not c <= wider[g] for g, c in channels.items()) or not set(wider) <= set(channels):
                raise NdcError(f"slimmable: the channels of {student.spec} are not a subset of the next wider width's "
                               "(a bug in the channel order)")
            wider = channels
            self.cuts.append(slices(an, kept))
            if k == 0 and fixed_widest:
                student.module.requires_grad_(False)
            else:
                borrow(student.module, self.names)
        self.widths = nn.ModuleList([s.module for s in students])
        self._device_cuts: tuple[torch.device, list] | None = None
        # Each width's own copy of its slices, used once the job stops sharing (:meth:`unshare`); registered from
        # the start so that the state dict keeps one set of keys (best weights, checkpoints).
        self.own = nn.ModuleList([nn.ParameterList([nn.Parameter(v.detach().clone(), requires_grad=False)
                                                    for v in self._slices(k).values()]) for k in range(len(students))])
        self.shared = True

    def _cuts(self, device: torch.device) -> list:
        if self._device_cuts is None or self._device_cuts[0] != device:  # indices live where the weights are: no copy per step
            self._device_cuts = (device, [{n: [(axis, idx.to(device)) for axis, idx in axes] for n, axes in c.items()}
                                          for c in self.cuts])
        return self._device_cuts[1]

    def _slices(self, k: int) -> dict[str, torch.Tensor]:
        if k == 0 and self.fixed_widest:
            return {}
        params = dict(self.full.named_parameters(remove_duplicate=False))
        cuts = self._cuts(next(iter(params.values())).device)[k]
        return {n: cut(params[n], cuts.get(n, [])) for n in self.names}

    def parameters_of(self, k: int) -> dict[str, torch.Tensor]:
        """Width ``k``'s parameters: slices of ``full`` (in the autograd graph), or its own copy once unshared."""
        if self.shared or (k == 0 and self.fixed_widest):
            return self._slices(k)
        return dict(zip(self.names, self.own[k]))

    @torch.no_grad()
    def unshare(self, copy: bool = True) -> None:
        """From now on every trained width trains its own copy of its slices (``copy``: taken now; else as loaded)."""
        for k, own in enumerate(self.own):
            for p, v in zip(own, self._slices(k).values()):
                if copy:
                    p.copy_(v)
                p.requires_grad_(True)
        self.full.requires_grad_(False)
        self.shared = False

    def run(self, k: int, a: torch.Tensor) -> torch.Tensor:
        lend(self.widths[k], self.parameters_of(k))
        return self.widths[k](a)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.run(0, a)

    @torch.no_grad()
    def state_of(self, k: int) -> dict[str, torch.Tensor]:
        """The state dict of width ``k`` as a standalone student (a copy): sliced shared parameters and its own ones."""
        state = {**{n: v.detach() for n, v in self.parameters_of(k).items()}, **self.widths[k].state_dict()}
        return {n: v.clone() for n, v in state.items()}


class SlimmableTrainer(CandidateTrainer):
    """A slimmable job: every width of one neighbourhood, trained in place (see the module docstring).

    Each width keeps the weights of its own best held-out measurement (the
    published students need not share weights: sharing is how they train), so
    no width ends worse than it started. A teacher-initialised ``width=1.0``
    is the teacher's neighbourhood itself, with zero loss: it is published as
    it is and spends no forward or backward pass (in a chain, the next width
    learns from its outputs, which are the teacher's). After
    ``SHARED_FRACTION`` of the steps (``private_from``) the widths stop
    sharing (:meth:`_unshare`).
    """

    @classmethod
    def build(cls, part: fx.GraphModule, name: str, index: int, members: list[Spec], key: str, ahead: list[nn.Module],
              cfg: DistillConfig, total: int, device: str, seed: int) -> "SlimmableTrainer":
        students = [make_student(part, spec, init=cfg.init, round_to=cfg.round_to, seed=seed) for spec in members]
        shared = SlimmableStudent(part, students, fixed_widest=members[0].width == 1.0 and cfg.init == "teacher")
        if cfg.init == "random":
            reinitialise(shared.full, seed)
        return cls(name, index, members, key, shared, students, part, ahead, cfg, total, device)

    def __init__(self, name: str, index: int, members: list[Spec], key: str, shared: SlimmableStudent,
                 students: list[Student], part: fx.GraphModule, ahead: list[nn.Module], cfg: DistillConfig, total: int,
                 device: str):
        widest = Student(shared, members[0], students[0].record, students[0].report)
        super().__init__(name, index, members[0], key, widest, ahead, cfg, total, device)
        self.members, self.students, self.part = list(members), students, part
        self.mode = members[0].slim
        self.trained = range(1 if shared.fixed_widest else 0, len(members))
        self.member_history: list[list[dict]] = [[] for _ in members]
        self.width_best: list[tuple[dict, dict[str, torch.Tensor]]] = []  # per width: (held-out errors, weights)
        self.private_from = math.ceil(SHARED_FRACTION * total) if SHARED_FRACTION < 1 else None
        if self.private_from == 0:
            self._unshare()

    @property
    def label(self) -> str:
        return f"{self.name} slimmable {','.join(f'{s.width:g}' for s in self.members)} ({self.mode})"

    def objective(self, a: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        total, wider = None, None
        for k in self.trained:  # widest first: its outputs teach the next width in a chain
            goal = targets if wider is None or self.mode == "teacher" else [o.detach().float() for o in wider]
            loss, wider = self.against(self.model.run(k, a), goal)
            total = loss if total is None else total + loss
        return total

    def outputs(self, a: torch.Tensor) -> list[torch.Tensor]:
        return [self.model.run(k, a) for k in range(len(self.members))]

    def step(self, scaler=None) -> None:
        super().step(scaler)
        if self.steps == self.private_from:
            self._unshare()
            self._schedule()

    def _unshare(self, copy: bool = True) -> None:
        """Stop sharing: each trained width goes on with its own copy of its slices and a fresh Adam for them (the
        shared moments are the narrowest width's, whose gradients are the largest: sliced over, they shrank a
        wider width's steps for the rest of the job); the batch norms keep their moments."""
        model, old = self.model, self.optimizer
        model.unshare(copy)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=old.param_groups[0]["lr"], weight_decay=old.defaults["weight_decay"])
        if not copy:
            return  # resuming: load_state brings the moments
        for p in self.params:
            if p in old.state and p not in self.optimizer.state:  # the batch norms' own moments
                self.optimizer.state[p] = old.state[p]

    def start(self, initial: dict) -> None:
        super().start(initial)
        self.width_best = [(m, self.model.state_of(k)) for k, m in enumerate(initial["members"])]

    def evaluate(self, heldout: dict) -> None:
        super().evaluate(heldout)
        for k, (history, member) in enumerate(zip(self.member_history, heldout["members"])):
            history.append({**self.history[-1], "heldout_mse": member["mse"]})
            if member["mse"] < self.width_best[k][0]["mse"]:
                self.width_best[k] = (member, self.model.state_of(k))

    def results(self, final: dict) -> list[Result]:
        job = {"kind": "slimmable", "assistant": "none" if self.mode == "teacher" else self.mode,
               "widths": [s.width for s in self.members], "spec": str(self.spec),
               "trained_widths": [self.members[k].width for k in self.trained]}
        out = []
        for k, (spec, student) in enumerate(zip(self.members, self.students)):
            errors, state = self.width_best[k]  # measured on the same held-out set as ``final``
            module = rebuild_student(self.part, spec, student.record)  # what stitch will rebuild, loaded strictly
            module.load_state_dict({n: v.cpu() for n, v in state.items()})
            doc = {"neighbourhood": self.name, "spec": str(spec), "record": student.record, "key": self.key,
                   "report": student.report, "job": job}
            out.append(Result(spec, module, doc, self.initial["members"][k], errors, self.member_history[k], {"job": job}))
        return out

    def release(self) -> None:
        super().release()
        self.students, self.width_best = [], []

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        for k, (_, state) in enumerate(self.width_best):
            tensors.update({f"width{k}.{n}": v for n, v in state.items()})
        return tensors, {**meta, "member_history": self.member_history, "width_best": [e for e, _ in self.width_best]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if self.private_from is not None and meta["steps"] >= self.private_from and self.model.shared:
            self._unshare(copy=False)  # the checkpoint's optimiser is the unshared one's
        super().load_state({k: v for k, v in tensors.items() if not k.startswith("width")}, meta)
        self.member_history = meta["member_history"]
        device = next(self.model.full.parameters()).device
        self.width_best = [(errors, {n[len(f"width{k}."):]: v.to(device) for n, v in tensors.items() if n.startswith(f"width{k}.")})
                           for k, errors in enumerate(meta["width_best"])]

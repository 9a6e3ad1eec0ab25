"""Engines: how candidates are grouped into units of work, and the one loop that trains a unit.

A **unit** is what a backend places on a worker (a process, a Ray task, a
GPU). Its candidates train together in one loop: each step takes one batch of
teacher activations for all of them, every candidate computes its own loss,
the losses are summed and one backward runs, and each candidate's optimiser
steps. Because a candidate's loss depends only on its own parameters, this is
the same training as alone.

* ``jobs``: one unit per candidate, its batch order seeded by its own key: the
  classic independent job, best spread over a pool of CPU processes.
* ``fused``: one unit per device (or per worker), candidates sharded by
  estimated cost (FLOPs × steps), batches seeded by the run: on a GPU the
  per-job overhead (one process per job, a host copy and a host sync per step,
  kernels too small to fill the device) is what costs, and one unit removes it.

Either way the artefacts are the same files in the same folders, published by
:class:`~ndc.distill.store.JobStore` as each candidate finishes (a candidate
that stops early is published at once). A unit writes a checkpoint of every
unfinished candidate every ``checkpoint_seconds``; a rerun skips finished
candidates and resumes the others from their checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ndc.distill.config import DistillConfig, made_for
from ndc.distill.sources import (NOISE_EPOCH, CachedArrays, CacheFeed, Feed, NoiseFeed, RecomputeFeed, TeacherChain)
from ndc.distill.store import Fenced, JobStore
from ndc.distill.trainer import CandidateFailed, CandidateTrainer, heldout_errors
from ndc.errors import NdcError, one_line
from ndc.ir import Spec
from ndc.metrics import count_flops, count_params
from ndc.training import mark_step
from ndc.workspace import Workspace, fence_holds, sha256_json

ENGINES = ("jobs", "fused")
CHECKPOINT_SECONDS = 60.0
PROGRESS_SECONDS = 0.25


@dataclass
class Item:
    """One job of a unit: plain data, so units pickle to any backend.

    Usually one candidate; a slimmable job makes several (``extra["members"]``,
    one spec per width, widest first, ``spec`` the widest), all under one key.
    """

    neighbourhood: str
    spec: str
    key: str
    cost: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.key[:8], 16)


@dataclass
class Unit:
    """Candidates that train together in one loop on one device."""

    workspace: str
    config: dict
    engine: str
    items: list[Item]
    device: str = "cpu"
    cache_dir: str | None = None
    fence: str | None = None  # the workspace-lock token of the command that made this unit
    checkpoint_seconds: float = CHECKPOINT_SECONDS
    resident_budget: int = 0  # bytes of cache a unit may load into (device) memory

    @property
    def cost(self) -> float:
        return sum(i.cost for i in self.items)

    @property
    def seed(self) -> int:
        """The batch order: a job's own (as an independent job always had); a fused unit's is the run's."""
        return self.items[0].seed if self.engine == "jobs" else int(self.config["seed"])


def make_units(items: list[Item], engine: str, shards: int, devices: list[str], **common) -> list[Unit]:
    """Group candidates: one unit each (jobs), or ``shards`` units balanced by cost (fused, longest first)."""
    if engine not in ENGINES:
        raise NdcError(f"unknown --engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    ordered = sorted(items, key=lambda i: (-i.cost, i.neighbourhood, i.spec))
    if engine == "jobs":
        return [Unit(items=[item], engine=engine, device=devices[k % len(devices)], **common) for k, item in enumerate(ordered)]
    bins: list[list[Item]] = [[] for _ in range(max(1, min(shards, len(items))))]
    loads = [0.0] * len(bins)
    for item in ordered:
        k = loads.index(min(loads))
        bins[k].append(item)
        loads[k] += item.cost
    return [Unit(items=sorted(b, key=lambda i: (i.neighbourhood, i.spec)), engine=engine, device=devices[k % len(devices)], **common)
            for k, b in enumerate(bins) if b]


def planned_steps(cfg: DistillConfig, per_epoch: int) -> int:
    return cfg.steps or cfg.epochs * per_epoch


def steps_per_epoch(cfg: DistillConfig, data) -> int:
    """What a unit's feed will report: training examples (with the cache's extra passes, or noise) over the batch size."""
    if cfg.source == "noise":
        examples = cfg.limit or NOISE_EPOCH
    elif cfg.source == "cache":
        examples = data.train_size * (1 + cfg.augment_passes)
    else:
        examples = data.train_size
    return max(1, math.ceil(examples / cfg.batch_size))


# ------------------------------------------------------------------ per process

_TEACHERS: dict[tuple[str, int], object] = {}
_DATA: dict[tuple, object] = {}


def teacher_for(ws: Workspace):
    """The workspace's traced teacher, loaded once per process."""
    from ndc.plan import load_teacher

    key = (str(ws.root), ws.path("plan.json").stat().st_mtime_ns)
    if key not in _TEACHERS:
        _TEACHERS.clear()
        _TEACHERS[key] = load_teacher(ws)
    return _TEACHERS[key]


def data_for(ws: Workspace, cfg: DistillConfig, shape, fresh: bool = False):
    """The run's data source, opened once per process (``fresh``: opened again, as each command does, so files
    changed since the last opening are seen)."""
    from ndc.data import open_data

    key = (str(ws.root), cfg.data, tuple(shape), cfg.limit, cfg.normalize)
    if fresh or key not in _DATA:
        _DATA[key] = open_data(cfg.data, shape, limit=cfg.limit, workspace=ws, normalize=cfg.normalize)
    return _DATA[key]


# --------------------------------------------------------------------- run


def run_unit(unit: Unit, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Train every candidate of ``unit``; returns one metrics dict per candidate (``done`` or ``failed``).

    On a CPU it runs on one torch thread (processes, not threads, scale here).
    """
    threads, gpu = torch.get_num_threads(), None
    if unit.device == "cpu":
        torch.set_num_threads(1)
    elif unit.device.startswith("cuda:"):
        gpu = torch.cuda.current_device()
        torch.cuda.set_device(unit.device)  # kernels and caches of this worker on its own GPU, none on GPU 0
    try:
        return _Run(unit, progress).run()
    finally:
        torch.set_num_threads(threads)
        if gpu is not None:
            torch.cuda.set_device(gpu)


class _Run:
    def __init__(self, unit: Unit, progress):
        self.unit, self.progress = unit, progress
        self.ws = Workspace(unit.workspace)
        self.store = JobStore(self.ws)
        self.cfg = DistillConfig.from_dict(unit.config)
        self.started = time.perf_counter()
        self.precision = Precision(self.cfg.precision, unit.device)
        self.rows: list[dict] = []
        self._reported, self._advanced = time.perf_counter(), 0
        self._seconds = {item.key: 0.0 for item in unit.items}  # each candidate's share of the unit's wall time
        self._clock = self.started

    def run(self) -> list[dict]:
        ws, cfg, unit = self.ws, self.cfg, self.unit
        teacher = teacher_for(ws)
        self.plan = teacher.plan
        self.chain = TeacherChain(teacher, unit.device)
        trainers = []
        feed = self._feed([self.plan.index(i.neighbourhood) for i in unit.items])
        total = planned_steps(cfg, feed.steps_per_epoch)
        for item in unit.items:
            try:
                trainers.append(self._trainer(teacher, item, total))
            except Exception as e:  # a student that cannot be built fails alone
                self._failed(item, _reason(e))
        groups: dict[int, list[CandidateTrainer]] = {}
        for t in trainers:
            t.compile(cfg.compile)
            self._resume(t)
            groups.setdefault(t.steps, []).append(t)
        self._charge([t.key for t in trainers])
        for start in sorted(groups, reverse=True):  # resumed candidates first: they are closest to done
            self._train(groups[start], feed, total)
        return self.rows

    # ----------------------------------------------------------------- setup
    def _trainer(self, teacher, item: Item, total: int) -> CandidateTrainer:
        from ndc.distill.kinds import make_trainer

        plan, cfg = self.plan, self.cfg
        i = plan.index(item.neighbourhood)
        torch.manual_seed(item.seed)
        lookahead = min(cfg.lookahead, len(plan.neighbourhoods) - 1 - i)
        ahead = [self.chain.part(k) for k in range(i + 1, i + 1 + lookahead)]
        return make_trainer(teacher.part(item.neighbourhood), item, i, ahead, cfg, total, self.unit.device)

    def _feed(self, indices: list[int]) -> Feed:
        cfg, plan, unit = self.cfg, self.plan, self.unit
        nbs = plan.neighbourhoods
        inputs, outputs = [nb.input for nb in nbs], [nb.output for nb in nbs]
        names: list[str] = []
        for i in indices:
            lookahead = min(cfg.lookahead, len(nbs) - 1 - i)
            for name in [inputs[i]] + [outputs[i + j] for j in range(lookahead + 1)]:
                if name not in names:
                    names.append(name)
        if cfg.source == "cache":
            if unit.cache_dir is None:
                raise NdcError("no activation cache was built for this run")
            return CacheFeed(CachedArrays(self.ws.path(unit.cache_dir)), names, inputs, outputs, cfg.batch_size,
                             unit.seed, unit.device, unit.resident_budget)
        if cfg.source == "recompute":
            data = data_for(self.ws, cfg, plan.input_shape[1:])
            return RecomputeFeed(self.chain, data, names, inputs, outputs, cfg.batch_size, unit.seed,
                                 cfg.augment_passes > 0, cfg.val_size)
        # Data-free: trained and early-stopped on noise alone (real data, if any, only calibrated the moments).
        moments = {}
        for item in unit.items:
            if item.extra.get("moments"):
                moments[plan.index(item.neighbourhood)] = tuple(item.extra["moments"])
        shapes = {i: nbs[i].input_shape[1:] for i in indices}
        return NoiseFeed(self.chain, shapes, cfg.batch_size, unit.seed, cfg.limit or NOISE_EPOCH, moments, cfg.val_size)

    def _resume(self, t: CandidateTrainer) -> None:
        """Load ``t``'s checkpoint when it was written for the same key; a stale or unreadable one is dropped."""
        path = self.ws.path(self.store.checkpoint(t.name, t.spec))
        if not path.is_file():
            return
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt", device="cpu") as f:  # load_state moves them (Adam's step stays on the host)
                meta = json.loads(f.metadata()["ndc"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("key") == t.key and 0 < meta["steps"] < t.total:
                t.load_state(tensors, meta)
                return
        except Exception:  # a checkpoint is only a shortcut: anything wrong with it means start again
            pass
        path.unlink(missing_ok=True)

    # --------------------------------------------------------------- the loop
    def _train(self, trainers: list[CandidateTrainer], feed: Feed, total: int) -> None:
        cfg = self.cfg
        eval_every = max(1, total // cfg.evals)
        step = trainers[0].steps
        if step == 0:
            for t, e in zip(trainers, heldout_errors(trainers, feed.heldout())):
                t.start(e)
        epoch, skip = divmod(step, feed.steps_per_epoch)
        last_checkpoint = time.perf_counter()
        while any(t.active for t in trainers):
            for batch in feed.train(epoch, skip):
                active = [t for t in trainers if t.active]
                if not active:
                    break
                losses = []
                mark_step(cfg.compile)
                with self.precision.autocast():
                    for t in active:
                        t.zero_grad()
                        try:
                            losses.append(t.loss(batch))
                        except Exception as e:
                            t.fail(f"{t.label}: {_reason(e)}")
                if losses:
                    self.precision.backward(torch.stack(losses).sum() if len(losses) > 1 else losses[0])
                self.precision.step([t for t in active if t.failed is None])
                step += 1
                self._advance(len(losses), step, total)
                if step % eval_every == 0 or step == total:
                    self._evaluate([t for t in active if t.failed is None], feed)
                self._charge([t.key for t in active])
                self._finish([t for t in active if not t.active], feed)
                if time.perf_counter() - last_checkpoint > self.unit.checkpoint_seconds:
                    self._checkpoint([t for t in trainers if t.active])
                    last_checkpoint = time.perf_counter()
                if step >= total:
                    break
            epoch, skip = epoch + 1, 0

    def _evaluate(self, trainers: list[CandidateTrainer], feed: Feed) -> None:
        for t, e in zip(trainers, heldout_errors(trainers, feed.heldout())):
            try:
                t.evaluate(e)
            except CandidateFailed as failure:
                t.fail(_with_cause(str(failure), feed))

    def _checkpoint(self, trainers: list[CandidateTrainer]) -> None:
        if not fence_holds(self.ws.root, self.unit.fence):
            raise Fenced("the command that started this run is gone")
        for t in trainers:
            tensors, meta = t.state()
            self.ws.save_tensors(self.store.checkpoint(t.name, t.spec), tensors, metadata={"ndc": json.dumps(meta)})

    def _charge(self, keys: list[str]) -> None:
        """Share the time since the last charge among ``keys`` by cost (FLOPs x steps): a candidate's ``seconds`` is
        its part of the unit's wall time, so a unit's candidates add up to it, but for writing their files (a lone
        job's is the whole)."""
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now
        costs = {i.key: max(i.cost, 0.0) for i in self.unit.items if i.key in keys}
        total = sum(costs.values())
        for key, cost in costs.items():
            self._seconds[key] += elapsed * (cost / total if total > 0 else 1 / len(costs))

    def _advance(self, candidate_steps: int, step: int, total: int) -> None:
        self._advanced += candidate_steps
        now = time.perf_counter()
        if self.progress is not None and (now - self._reported > PROGRESS_SECONDS or step == total):
            self.progress({"event": "advance", "steps": self._advanced, "step": step, "total": total,
                           "label": self.unit.items[0].neighbourhood if len(self.unit.items) == 1 else f"{len(self.unit.items)} candidates"})
            self._advanced, self._reported = 0, now

    # -------------------------------------------------------------- results
    def _finish(self, trainers: list[CandidateTrainer], feed: Feed) -> None:
        """Publish the trainers that stopped this step (one held-out pass measures all of them)."""
        done = []
        for t in trainers:
            if t.failed is not None:
                self._failed(next(i for i in self.unit.items if i.key == t.key), t.failed)
            else:
                t.settle()
                done.append(t)
        finals = heldout_errors(done, feed.heldout())
        self._charge([t.key for t in done])
        for t, final in zip(done, finals):
            self._publish(t, final)

    def _publish(self, t: CandidateTrainer, final: dict) -> None:
        nb = self.plan.neighbourhoods[t.index]
        item = next(i for i in self.unit.items if i.key == t.key)
        results = t.results(final)  # one candidate, or one per width of a slimmable job
        sizes = [(count_params(r.model), count_flops(r.model, nb.input_shape)) for r in results]
        self._charge([t.key])  # measuring them too: what is left of the unit's time is writing the files
        for result, (params, flops) in zip(results, sizes):
            model = result.model
            metrics = {
                "key": t.key,
                "made_for": made_for(self.plan.teacher["sha256"], nb.to_json()),
                "data_files": item.extra.get("data_files"),
                "neighbourhood": t.name,
                "spec": str(result.spec),
                "status": "done",
                "initial_error": result.initial["relative"],
                "final_error": result.final["relative"],
                "initial_mse": result.initial["mse"],
                "final_mse": result.final["mse"],
                "steps": t.steps,
                "stopped_early": t.stopped_early,
                "resumed_from": t.resumed_from,
                "seconds": self._seconds[t.key],
                "engine": self.unit.engine,
                "teacher_params": nb.params,
                "student_params": params,
                "student_flops": flops,
                "sparsity": None,
                **result.metrics,
                "config": sha256_json(self.unit.config)[:16],
                "pid": os.getpid(),
                "history": result.history,
            }
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            self.rows.append(self.store.publish(t.name, result.spec, state, result.student, metrics, fence=self.unit.fence))
        t.release()  # free the device memory of a published trainer

    def _failed(self, item: Item, message: str) -> None:
        self._charge([item.key])
        for spec in item.extra.get("members", [item.spec]):  # a slimmable job fails every width it makes
            metrics = {"key": item.key, "neighbourhood": item.neighbourhood, "spec": spec, "status": "failed",
                       "error": " ".join(message.split()), "seconds": self._seconds[item.key],
                       "engine": self.unit.engine}
            self.rows.append(self.store.fail(item.neighbourhood, Spec.parse(spec), metrics, fence=self.unit.fence))


class Precision:
    """Mixed precision for a unit: autocast for the forward passes, and for fp16 one loss scaler for the summed loss.

    With fp16 the scaler checks each optimiser's gradients on its own, so a
    candidate whose gradients overflow skips its step alone.
    """

    DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, name: str, device: str):
        self.dtype = self.DTYPES[name]
        self.device_type = device.split(":")[0]
        self.scaler = torch.amp.GradScaler(self.device_type) if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, trainers: list[CandidateTrainer]) -> None:
        for t in trainers:
            t.step(self.scaler)
        if self.scaler is not None and any(t.optimizer is not None for t in trainers):  # update() needs one that stepped
            self.scaler.update()


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, NdcError) else f"{type(e).__name__}: {one_line(e)}"


def _with_cause(message: str, feed: Feed) -> str:
    """Blame the learning rate only when the inputs were finite: a corrupt cache or bad data is named instead."""
    for batch in feed.heldout():
        values = getattr(batch, "values", {})
        if any(not bool(torch.isfinite(v).all()) for v in values.values()):
            return message.replace("; try a lower --lr", "; the teacher's activations are not finite (bad data, or a corrupt "
                                   "activation cache: delete the workspace's cache/ folder and rerun)")
        break
    return message


def unit_config(cfg: DistillConfig) -> dict:
    d = asdict(cfg)
    d["alpha"] = list(cfg.alpha)
    return d

"""distill: train every candidate student independently (the paper's section 4).

The pipeline of ``ndc distill``::

    teacher    = load_teacher(ws)                        # plan + traced graph
    candidates = trainable neighbourhoods × specs
    jobs       = jobs_of(candidates)                     # a candidate each; a slimmable job: all widths of a neighbourhood
    pending    = jobs not finished for their key         # JobStore: finished ones are skipped
    cache      = build_cache(...)                        # --source cache: one teacher pass, verified on reuse
    units      = make_units(pending, engine, ...)        # jobs: one per candidate; fused: one per device/worker
    backend.run(units)                                   # local / pool / Ray; each unit: ndc.distill.engine.run_unit
    rows       = metrics of every candidate              # done, skipped (done before) or failed
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ndc.distill.config import Candidate, DistillConfig, expand_specs
from ndc.distill.engine import (CHECKPOINT_SECONDS, ENGINES, Item, data_for, make_units, planned_steps, steps_per_epoch,
                                unit_config)
from ndc.distill.sources import (CACHE_DIR, DISK_MARGIN, CacheLayout, TeacherChain, build_cache, cache_key, cache_size,
                                 channel_moments, free_bytes, verify_cache)
from ndc.distill.slimmable import jobs_of, key_of
from ndc.distill.store import JobStore, data_files, from_other_files
from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.workspace import Workspace

if TYPE_CHECKING:  # the backends import this package: no import at run time
    from ndc.backends.base import Backend

__all__ = ["DistillConfig", "Candidate", "expand_specs", "run_distill", "plan_candidates", "choose_source", "ENGINES"]

DEFAULT_CACHE_BUDGET = 16 * 2**30


def plan_candidates(plan, specs: list[Spec], only: tuple[str, ...] = ()) -> list[Candidate]:
    names = {nb.name for nb in plan.trainable}
    for name in only:
        if name not in names:
            plan[name]  # raises with the list of names when unknown
            raise NdcError(f"neighbourhood {name!r} is kept with the teacher; only these are distilled: {', '.join(sorted(names))}")
    return [Candidate(nb.name, spec) for nb in plan.trainable if not only or nb.name in only for spec in specs]


def cache_layout(plan, lookahead: int) -> CacheLayout:
    """Every boundary a cache-fed job of this plan needs: each trainable input, output and look-ahead target."""
    shapes = {nb.input: nb.input_shape[1:] for nb in plan.neighbourhoods}
    shapes.update({nb.output: nb.output_shape[1:] for nb in plan.neighbourhoods})
    needed: dict[str, list[int]] = {}
    names = plan.names
    for nb in plan.trainable:
        i = names.index(nb.name)
        needed[nb.input] = shapes[nb.input]
        for j in range(0, min(lookahead, len(names) - 1 - i) + 1):
            out = plan.neighbourhoods[i + j].output
            needed[out] = shapes[out]
    return CacheLayout(dict(sorted(needed.items(), key=lambda kv: names_order(plan, kv[0]))))


def names_order(plan, boundary: str) -> int:
    for k, nb in enumerate(plan.neighbourhoods):
        if nb.input == boundary:
            return 2 * k
        if nb.output == boundary:
            return 2 * k + 1
    return 10**9


def choose_source(cfg: DistillConfig, requested: str | None, data, layout: CacheLayout, ws: Workspace,
                  budget: int = DEFAULT_CACHE_BUDGET, on_disk: bool = False) -> tuple[str, str]:
    """The activation source to use and why: ``cache`` when it is ``on_disk`` already or fits the disk budget, else
    ``recompute``."""
    if requested:
        return requested, "requested"
    if not cfg.data:
        return "noise", "no data: distilling from Gaussian noise"
    size = cache_size(data, layout, cfg.augment_passes, cfg.val_size)
    if on_disk:  # the budget limits what is written, and nothing is
        return "cache", f"the activation cache ({_size(size)}) is on disk already"
    disk, older = free_bytes(ws), sum(b for _, b, _ in older_caches(ws))
    free = disk - DISK_MARGIN + older  # older caches are deleted to make room (_make_room)
    if size <= min(budget, free):
        return "cache", f"the activation cache takes {_size(size)}"
    if free < budget:
        return "recompute", (f"the activation cache would take {_size(size)} and the disk has {_size(max(disk, 0))} free"
                             f"{f' (and {_size(older)} of older caches)' if older else ''}: recomputing the teacher's "
                             "prefix per batch")
    return "recompute", (f"the activation cache would take {_size(size)}, over the --cache-budget "
                         f"({_size(budget)}): recomputing the teacher's prefix per batch")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def cache_folder(ws: Workspace, teacher, cfg: DistillConfig, data) -> Path:
    """The folder of the activation cache this run uses, written or not (its name is the cache's key)."""
    layout = cache_layout(teacher.plan, cfg.lookahead)
    return ws.path(f"cache/{cache_key(teacher.identity, data, layout, cfg.augment_passes, cfg.val_size, cfg.seed)}")


def older_caches(ws: Workspace, keep: Path | None = None) -> list[tuple[float, int, Path]]:
    """The workspace's activation caches but ``keep``: (last use, bytes, folder), least recently used first (a
    folder a killed build left incomplete first of all)."""
    root = ws.path(CACHE_DIR)
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and folder != keep:
            files = [p.stat() for p in folder.iterdir() if p.is_file()]
            meta = folder / "meta.json"
            used = meta.stat().st_mtime if meta.is_file() else float("-inf")  # meta.json is touched on each reuse
            found.append((used, sum(f.st_size for f in files), folder))
    return sorted(found, key=lambda t: t[0])


def _make_room(ws: Workspace, keep: Path, size: int, budget: int, log: Callable[[str], None]) -> None:
    """Delete the least recently used other caches until one of ``size`` bytes fits: the caches within ``budget`` in
    all, and on the disk."""
    older = older_caches(ws, keep)
    kept, free = sum(b for _, b, _ in older), free_bytes(ws)
    if size > budget or size + DISK_MARGIN > free + kept:
        return  # deleting them all would not make it fit (an explicit --source cache): keep them
    while older and (kept + size > budget or size + DISK_MARGIN > free):
        used, b, folder = older.pop(0)
        shutil.rmtree(folder, ignore_errors=True)
        kept, free = kept - b, free + b
        when = "an unfinished build" if used == float("-inf") else f"last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(used))}"
        log(f"removed activation cache {folder.name} ({_size(b)}, {when}) to make room within --cache-budget "
            f"({_size(budget)}) and the disk")


def cache_on_disk(ws: Workspace, teacher, cfg: DistillConfig, data) -> bool:
    """Whether the activation cache this run would use has been written (it is verified when used)."""
    return (cache_folder(ws, teacher, cfg, data) / "meta.json").is_file()


def run_distill(ws: Workspace, specs: list[Spec], cfg: DistillConfig, backend: "Backend", *, teacher=None,
                only: tuple[str, ...] = (), force: bool = False, log: Callable[[str], None] = lambda m: None,
                warn: Callable[[str], None] | None = None,
                on_progress: Callable[[dict], None] | None = None, on_done: Callable[[dict], None] | None = None,
                on_start: Callable[[int, int], None] | None = None, fence: str | None = None, checkpoint_seconds: float = CHECKPOINT_SECONDS,
                memory_budget: int | None = None, cache_budget: int = DEFAULT_CACHE_BUDGET) -> list[dict]:
    """Train every candidate of ``specs`` over the plan's trainable neighbourhoods; returns one row per candidate.

    ``log`` hears progress, ``warn`` what the user should hear even when quiet.
    ``fence`` is the token of the workspace lock the caller holds (workers
    publish nothing once it no longer holds); ``memory_budget`` bounds the
    activation cache a unit loads into (device) memory (default: half the free
    memory of a GPU, none on a CPU, where the memory map is as fast);
    ``cache_budget`` the workspace's activation caches on disk in all (a new
    one deletes the least recently used others to fit).
    """
    from ndc.plan import load_teacher

    teacher = teacher or load_teacher(ws)
    plan = teacher.plan
    store = JobStore(ws)
    store.recover()
    candidates = plan_candidates(plan, specs, only)
    nb_json = {nb.name: nb.to_json() for nb in plan.neighbourhoods}
    jobs = jobs_of(candidates)  # one per candidate; one per neighbourhood for all the widths of a slimmable job
    keys = {job: key_of(teacher.sha256, nb_json[job.neighbourhood], job, cfg) for job in jobs}
    rows: dict[Candidate, dict] = {}
    pending = []
    data = data_for(ws, cfg, plan.input_shape[1:]) if cfg.data else None
    files = data_files(data)
    other_files = other_settings = 0
    for job in jobs:
        done = [None if force else store.finished(job.neighbourhood, spec, keys[job]) for spec in job.members]
        if files is not None and any(from_other_files(d, files) for d in done):
            done, other_files = [None] * len(done), other_files + 1  # the same --data spec, other files under it
        elif not force and any(d is None and store.finished(job.neighbourhood, spec) is not None
                               for spec, d in zip(job.members, done)):
            other_settings += 1  # finished under another key: this run's student will replace it
        if all(d is not None for d in done):
            rows.update({Candidate(job.neighbourhood, spec): {**d, "status": "skipped"} for spec, d in zip(job.members, done)})
        else:
            pending.append(job)
    if other_files:
        (warn or log)(f"retraining {other_files} finished job(s): their students were distilled from other files of --data {cfg.data}")
    if other_settings:
        (warn or log)(f"replacing {other_settings} finished student(s) distilled with other settings (data, "
                      "training options or teacher) by this run's as they finish (a job that fails keeps its earlier one)")

    if pending:
        cache_dir, moments = None, {}
        if cfg.source == "cache":
            cache_dir = _cache(ws, teacher, cfg, data, log, warn or log, on_progress, cache_budget)
        elif cfg.source == "noise" and cfg.noise == "matched":
            indices = sorted({plan.names.index(job.neighbourhood) for job in pending})
            moments = channel_moments(TeacherChain(teacher, backend.devices[0]), data, indices, cfg.calibration)
        items = []
        for job in pending:
            nb = plan[job.neighbourhood]
            i = plan.names.index(job.neighbourhood)
            cost = float(nb.flops) * (1 + cfg.lookahead) * (cfg.steps or cfg.epochs) * sum(s.width ** 2 for s in job.members)
            extra = {"moments": moments[i]} if i in moments else {}
            extra["data_files"] = files
            if job.spec.slim is not None:
                extra["members"] = [str(s) for s in job.members]
            items.append(Item(job.neighbourhood, str(job.spec), keys[job], cost, extra))
        units = make_units(items, cfg.engine, backend.slots, backend.devices, workspace=str(ws.root), config=unit_config(cfg),
                           cache_dir=cache_dir, fence=fence, checkpoint_seconds=checkpoint_seconds,
                           resident_budget=_resident_budget(memory_budget, backend.devices, backend.slots))

        if on_start:
            on_start(len(items), planned_steps(cfg, steps_per_epoch(cfg, data)))

        def done(metrics: dict) -> None:
            rows[Candidate(metrics["neighbourhood"], Spec.parse(metrics["spec"]))] = metrics
            if on_done:
                on_done(metrics)

        backend.run(units, done, on_progress)
    _record(ws, rows)
    return [rows[c] for c in candidates if c in rows]


def _cache(ws: Workspace, teacher, cfg: DistillConfig, data, log, warn, on_progress, budget: int) -> str:
    """The activation cache's folder (workspace-relative): reused when it verifies, else (re)built, after deleting
    the least recently used other caches that it would not fit beside."""
    plan = teacher.plan
    layout = cache_layout(plan, cfg.lookahead)
    folder = cache_folder(ws, teacher, cfg, data)
    key = folder.name
    if (folder / "meta.json").is_file():
        problem = verify_cache(folder)
        if problem is None:
            with contextlib.suppress(OSError):
                os.utime(folder / "meta.json")  # used now: the last to be deleted for room
            return str(folder.relative_to(ws.root))
        warn(f"activation cache {folder.name}: {problem}; rebuilding it")
        shutil.rmtree(folder, ignore_errors=True)
    size = cache_size(data, layout, cfg.augment_passes, cfg.val_size)
    _make_room(ws, folder, size, budget, warn)
    log(f"activation cache: {len(layout.boundaries)} boundaries, "
        f"{data.train_size * (1 + cfg.augment_passes)} + {min(cfg.val_size, data.test_size)} examples, "
        f"{size / 2**20:.1f} MiB (fp16)")
    chain = TeacherChain(teacher, cfg.device)
    folder = build_cache(ws, chain, [nb.output for nb in plan.neighbourhoods], plan.neighbourhoods[0].input, data,
                         layout, key, cfg.augment_passes, cfg.val_size, cfg.seed,
                         progress=lambda d, t: on_progress and on_progress({"event": "teacher", "step": d, "total": t}))
    return str(folder.relative_to(ws.root))


def _resident_budget(budget: int | None, devices: list[str], slots: int) -> int:
    """Bytes of activation cache each unit may hold in (device) memory."""
    if budget is not None:
        return budget // max(1, slots)
    if not devices[0].startswith("cuda"):
        return 0
    import torch

    free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
    per_device = max(1, -(-slots // len(devices)))
    return int(free * 0.5) // per_device


def _record(ws: Workspace, rows: dict) -> None:
    """The manifest's view of every job: status and key, for tools and humans."""

    def change(manifest: dict) -> None:
        jobs = manifest.setdefault("jobs", {})
        for c, m in rows.items():
            status = "done" if m.get("status") in ("done", "skipped") else m.get("status")
            jobs[c.folder] = {"neighbourhood": c.neighbourhood, "spec": str(c.spec), "status": status,
                              "key": m.get("key"), **({"error": m["error"]} if "error" in m else {})}

    ws.update_manifest(change)

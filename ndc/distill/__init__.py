"""distill: train every candidate student independently (the paper's section 4).

The pipeline of ``ndc distill``::

    teacher    = load_teacher(ws)                        # plan + traced graph
    candidates = trainable neighbourhoods × specs
    jobs       = [Job(candidate, key) for those not already done]
    cache      = build_cache(...)                        # --source cache: one teacher pass
    backend.run(jobs)                                     # local / pool / Ray; each job: ndc.distill.job.run_job
    rows       = metrics of every candidate              # done, skipped (done before) or failed
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

from ndc.distill.config import Candidate, DistillConfig, Job, expand_specs, job_key
from ndc.distill.job import finished
from ndc.distill.sources import (CacheLayout, TeacherChain, build_cache, cache_key, cache_size, channel_moments,
                                 free_bytes, DISK_MARGIN)
from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.workspace import Workspace

if TYPE_CHECKING:  # the backends import this package: no import at run time
    from ndc.backends.base import Backend

__all__ = ["DistillConfig", "Candidate", "expand_specs", "run_distill", "plan_candidates", "choose_source"]

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
                  budget: int = DEFAULT_CACHE_BUDGET) -> tuple[str, str]:
    """The activation source to use and why: ``cache`` when it fits the disk budget, else ``recompute``."""
    if requested:
        return requested, "requested"
    if not cfg.data:
        return "noise", "no data: distilling from Gaussian noise"
    size = cache_size(data, layout, cfg.augment_passes, cfg.val_size)
    free = free_bytes(ws) - DISK_MARGIN
    if size <= min(budget, free):
        return "cache", f"the activation cache takes {size / 2**20:.1f} MiB"
    return "recompute", (f"the activation cache would take {size / 2**30:.2f} GiB, over the budget "
                         f"({min(budget, free) / 2**30:.2f} GiB): recomputing the teacher's prefix per batch")


def run_distill(ws: Workspace, specs: list[Spec], cfg: DistillConfig, backend: "Backend", *, teacher=None,
                only: tuple[str, ...] = (), force: bool = False, log: Callable[[str], None] = lambda m: None,
                on_progress: Callable[[dict], None] | None = None, on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Train every candidate of ``specs`` over the plan's trainable neighbourhoods; returns one row per candidate."""
    from ndc.plan import load_teacher

    teacher = teacher or load_teacher(ws)
    plan = teacher.plan
    candidates = plan_candidates(plan, specs, only)
    for stale in ws.root.glob("jobs/**/.*.tmp"):  # temporary files of writes a killed run never finished
        stale.unlink(missing_ok=True)
    nb_json = {nb.name: nb.to_json() for nb in plan.neighbourhoods}
    keys = {c: job_key(teacher.sha256, nb_json[c.neighbourhood], c.spec, cfg) for c in candidates}
    rows: dict[Candidate, dict] = {}
    pending = []
    for c in candidates:
        done = None if force else finished(ws, c.folder, keys[c])
        if done is not None:
            rows[c] = {**done, "status": "skipped"}
        else:
            pending.append(c)

    cache_dir, moments = None, {}
    if pending:
        data = None
        if cfg.data:
            from ndc.distill.job import data_for

            data = data_for(ws, cfg, plan.input_shape[1:])
        chain = None
        if cfg.source == "cache":
            layout = cache_layout(plan, cfg.lookahead)
            key = cache_key(teacher.sha256, data, layout, cfg.augment_passes, cfg.val_size, cfg.seed)
            size = cache_size(data, layout, cfg.augment_passes, cfg.val_size)
            log(f"activation cache: {len(layout.boundaries)} boundaries, "
                f"{data.train_size * (1 + cfg.augment_passes)} + {min(cfg.val_size, data.test_size)} examples, "
                f"{size / 2**20:.1f} MiB (fp16)")
            chain = TeacherChain(teacher, cfg.device)
            folder = build_cache(ws, chain, [nb.output for nb in plan.neighbourhoods], plan.neighbourhoods[0].input, data,
                                 layout, key, cfg.augment_passes, cfg.val_size, cfg.seed,
                                 progress=lambda d, t: on_progress and on_progress({"label": "teacher pass", "step": d, "total": t}))
            cache_dir = str(folder.relative_to(ws.root))
        elif cfg.source == "noise" and cfg.noise == "matched":
            chain = TeacherChain(teacher, cfg.device)
            indices = sorted({plan.names.index(c.neighbourhood) for c in pending})
            moments = channel_moments(chain, data, indices, cfg.calibration)
        jobs = []
        for c in pending:
            nb = plan[c.neighbourhood]
            i = plan.names.index(c.neighbourhood)
            extra = {"moments": moments[i]} if i in moments else {}
            steps = cfg.steps or cfg.epochs
            cost = float(nb.flops) * (1 + cfg.lookahead) * steps * (c.spec.width ** 2)
            jobs.append(Job(str(ws.root), c.neighbourhood, str(c.spec), keys[c], _config_dict(cfg), cost, cache_dir, extra))

        def done(metrics: dict) -> None:
            cand = Candidate(metrics["neighbourhood"], Spec.parse(metrics["spec"]))
            rows[cand] = metrics
            if on_done:
                on_done(metrics)

        backend.run(jobs, done, on_progress)
    _record(ws, rows)
    return [rows[c] for c in candidates]


def _config_dict(cfg: DistillConfig) -> dict:
    d = asdict(cfg)
    d["alpha"] = list(cfg.alpha)
    return d


def _record(ws: Workspace, rows: dict) -> None:
    """The manifest's view of every job: status and key, for tools and humans."""

    def change(manifest: dict) -> None:
        jobs = manifest.setdefault("jobs", {})
        for c, m in rows.items():
            status = "done" if m.get("status") in ("done", "skipped") else m.get("status")
            jobs[c.folder] = {"neighbourhood": c.neighbourhood, "spec": str(c.spec), "status": status,
                              "key": m.get("key"), **({"error": m["error"]} if "error" in m else {})}

    ws.update_manifest(change)

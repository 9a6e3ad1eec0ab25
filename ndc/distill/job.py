"""One job: train one candidate student to reproduce its teacher neighbourhood.

A job is independent and idempotent. It reads the workspace (plan, teacher
weights, activation cache), trains, and writes three files into its folder,
each atomically: ``weights.safetensors``, ``student.json`` (the spec and the
rewrite record that rebuild the architecture), and last ``metrics.json``,
which names the job's key and the sha256 of the other two. A job is done when
its ``metrics.json`` says so for the current key and both hashes still match;
anything else (missing, stale, corrupt, killed half-way) is redone.

Loss (the paper's eq. 4-5): ``L_i = L_{i,0} + Σ_j α_j L_{i,j}`` where
``L_{i,j}`` is the mean squared error, normalised by the feature size, between
``T_{i+j}∘…∘T_{i+1}(S_i(a))`` and the teacher's own activation there.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ndc.distill.config import DistillConfig, Job
from ndc.distill.sources import NOISE_EPOCH, CachedArrays, CacheFeed, Feed, NoiseFeed, RecomputeFeed, TeacherChain
from ndc.errors import NdcError
from ndc.metrics import count_flops, count_params
from ndc.workspace import Workspace, read_json, sha256_file

METRICS, WEIGHTS, STUDENT = "metrics.json", "weights.safetensors", "student.json"
SPARSITY_RAMP = 0.5  # fraction of a job's steps over which sparsity ramps up (the paper: 20k of 40k)


class JobFailed(Exception):
    """Training of one candidate failed in a way the user should hear about; the other jobs go on."""


# --------------------------------------------------------------- per process


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


def data_for(ws: Workspace, cfg: DistillConfig, shape):
    """The run's data source, opened once per process."""
    from ndc.data import open_data

    key = (str(ws.root), cfg.data, tuple(shape), cfg.limit, cfg.normalize)
    if key not in _DATA:
        _DATA[key] = open_data(cfg.data, shape, limit=cfg.limit, workspace=ws, normalize=cfg.normalize)
    return _DATA[key]


# ------------------------------------------------------------------- done?


def finished(ws: Workspace, folder: str, key: str) -> dict | None:
    """The metrics of a finished job whose artefacts verify, else None."""
    path = ws.path(f"{folder}/{METRICS}")
    if not path.is_file():
        return None
    try:
        metrics = read_json(path)
    except NdcError:
        return None
    if metrics.get("status") != "done" or metrics.get("key") != key:
        return None
    for name, field in ((WEIGHTS, "weights_sha256"), (STUDENT, "student_sha256")):
        p = ws.path(f"{folder}/{name}")
        if not p.is_file() or sha256_file(p) != metrics.get(field):
            return None
    return metrics


# --------------------------------------------------------------------- run


def run_job(job: Job, progress: Callable[[dict], None] | None = None) -> dict:
    """Train one candidate; returns its metrics (status ``done`` or ``failed``). Runs on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        return _run(job, progress, started)
    except (JobFailed, NdcError) as e:
        return _write_failure(job, str(e), started)
    except Exception as e:  # a bug or an unusual model: record it and let the other jobs go on
        return _write_failure(job, f"{type(e).__name__}: {e}", started)
    finally:
        torch.set_num_threads(threads)


def _write_failure(job: Job, message: str, started: float) -> dict:
    ws = Workspace(job.workspace)
    metrics = {"key": job.key, "neighbourhood": job.neighbourhood, "spec": job.spec, "status": "failed",
               "error": " ".join(message.split()), "seconds": time.perf_counter() - started}
    ws.write_json(f"{job.candidate.folder}/{METRICS}", metrics)
    return metrics


def _run(job: Job, progress, started: float) -> dict:
    from ndc.passes.rewrite import make_student, sparsity_schedule

    ws = Workspace(job.workspace)
    cfg = DistillConfig.from_dict(job.config)
    cand = job.candidate
    teacher = teacher_for(ws)
    plan = teacher.plan
    i = plan.index(cand.neighbourhood)
    nb = plan.neighbourhoods[i]
    device = cfg.device
    seed = int(job.key[:8], 16)
    torch.manual_seed(seed)

    part = teacher.part(nb.name)
    student = make_student(part, cand.spec, init=cfg.init, round_to=cfg.round_to, seed=seed)
    model = student.module.to(device)
    lookahead = min(cfg.lookahead, len(plan.neighbourhoods) - 1 - i)
    alphas = cfg.alphas()[:lookahead]
    chain = TeacherChain(teacher, device)
    ahead = [chain.part(k) for k in range(i + 1, i + 1 + lookahead)]
    feed = _feed(job, cfg, ws, plan, chain, i, lookahead, seed)

    total = cfg.steps or cfg.epochs * feed.steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    pruner = student.pruner
    target_sparsity = cand.spec.sparsity
    ramp_end = int(total * SPARSITY_RAMP) if pruner is not None else 0
    prune_every = max(1, ramp_end // 50)
    if pruner is not None:
        pruner.update(sparsity_schedule(0, total, target_sparsity, ramp=SPARSITY_RAMP) if target_sparsity else 0.0)

    initial = heldout_error(model, feed)
    best_state = copy.deepcopy(model.state_dict()) if pruner is None else None
    best_mse = initial["mse"] if pruner is None else math.inf
    eval_every = max(1, total // cfg.evals)
    history, bad, step, epoch, stopped_early, last_loss = [], 0, 0, 0, False, float("nan")

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if cfg.frozen_bn else []
    while step < total and not stopped_early:
        for a, targets in feed.train(epoch):
            model.train()
            for m in norms:  # --bn-stats frozen: normalise with the teacher's running statistics
                m.eval()
            out = model(a)
            loss = F.mse_loss(out, targets[0])
            h = out
            for j, part_j in enumerate(ahead):
                h = part_j(h)
                loss = loss + alphas[j] * F.mse_loss(h, targets[j + 1])
            if not torch.isfinite(loss):
                raise JobFailed(f"{cand.label()}: the loss became {loss.item()} at step {step}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if pruner is not None:
                if step <= ramp_end and (step % prune_every == 0 or step == ramp_end):
                    pruner.update(sparsity_schedule(step, total, target_sparsity, ramp=SPARSITY_RAMP))
                pruner.apply()
            last_loss = loss.item()
            if progress is not None and (step % max(1, total // 100) == 0 or step == total):
                progress({"job": job.key, "label": cand.label(), "step": step, "total": total, "loss": last_loss})
            if step % eval_every == 0 or step == total:
                val = heldout_error(model, feed)
                history.append({"step": step, "train_loss": last_loss, "heldout_mse": val["mse"]})
                if step >= ramp_end:
                    if val["mse"] < best_mse:
                        best_mse, best_state, bad = val["mse"], copy.deepcopy(model.state_dict()), 0
                    else:
                        bad += 1
                        stopped_early = bad >= cfg.patience and step < total
            if step >= total or stopped_early:
                break
        epoch += 1

    if best_state is not None:
        model.load_state_dict(best_state)
    if pruner is not None:
        pruner.update(target_sparsity)
        pruner.apply()
    final = heldout_error(model, feed)
    return _write_success(ws, job, student, model, nb, initial, final, history, step, stopped_early, started)


def _feed(job: Job, cfg: DistillConfig, ws: Workspace, plan, chain: TeacherChain, i: int, lookahead: int, seed: int) -> Feed:
    nb = plan.neighbourhoods[i]
    if cfg.source == "cache":
        if job.cache_dir is None:
            raise JobFailed("no activation cache was built for this job")
        targets = [plan.neighbourhoods[i + j].output for j in range(lookahead + 1)]
        return CacheFeed(CachedArrays(ws.path(job.cache_dir)), nb.input, targets, cfg.batch_size, seed, cfg.device)
    if cfg.source == "recompute":
        data = data_for(ws, cfg, plan.input_shape[1:])
        return RecomputeFeed(chain, i, lookahead, data, cfg.batch_size, seed, cfg.augment_passes > 0, cfg.val_size)
    # Data-free: trained and early-stopped on noise alone (real data, if any, only calibrated the moments).
    moments = job.extra.get("moments")
    examples = cfg.limit or NOISE_EPOCH
    return NoiseFeed(chain, i, lookahead, nb.input_shape[1:], cfg.batch_size, seed, examples,
                     tuple(moments) if moments else None, cfg.val_size)


@torch.no_grad()
def heldout_error(model: nn.Module, feed: Feed) -> dict:
    """Mean squared error and relative error ‖S(a) − T(a)‖ / ‖T(a)‖ on the held-out inputs (eval mode)."""
    was = model.training
    model.eval()
    sq_diff = sq_target = count = 0.0
    for a, targets in feed.heldout():
        out = model(a)
        sq_diff += float(((out - targets[0]) ** 2).sum())
        sq_target += float((targets[0] ** 2).sum())
        count += targets[0].numel()
    model.train(was)
    if not count:
        return {"mse": math.nan, "relative": math.nan}
    return {"mse": sq_diff / count, "relative": math.sqrt(sq_diff / sq_target) if sq_target else math.nan}


def _write_success(ws, job, student, model, nb, initial, final, history, steps, stopped_early, started) -> dict:
    from ndc.workspace import sha256_json

    folder = job.candidate.folder
    model = model.cpu()
    # No safetensors metadata: its entries are written in random order, and the
    # same job must give byte-identical files (the key is in metrics.json).
    ws.save_tensors(f"{folder}/{WEIGHTS}", model.state_dict())
    ws.write_json(f"{folder}/{STUDENT}", {"neighbourhood": job.neighbourhood, "spec": job.spec, "record": student.record,
                                          "key": job.key, "report": student.report})
    sparsity = None
    if student.pruner is not None:
        achieved = student.pruner.sparsity()
        sparsity = sum(achieved.values()) / len(achieved) if achieved else 0.0
    metrics = {
        "key": job.key,
        "neighbourhood": job.neighbourhood,
        "spec": job.spec,
        "status": "done",
        "initial_error": initial["relative"],
        "final_error": final["relative"],
        "initial_mse": initial["mse"],
        "final_mse": final["mse"],
        "steps": steps,
        "stopped_early": stopped_early,
        "seconds": time.perf_counter() - started,
        "teacher_params": nb.params,
        "student_params": count_params(model),
        "student_flops": count_flops(model, nb.input_shape),
        "sparsity": sparsity,
        "config": sha256_json(job.config)[:16],
        "pid": os.getpid(),
        "history": history,
        "weights_sha256": sha256_file(ws.path(f"{folder}/{WEIGHTS}")),
        "student_sha256": sha256_file(ws.path(f"{folder}/{STUDENT}")),
    }
    ws.write_json(f"{folder}/{METRICS}", metrics)
    return metrics

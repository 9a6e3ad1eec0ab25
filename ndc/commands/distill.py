"""``ndc distill``: rewrite and train a student for every (neighbourhood, spec) candidate."""

from __future__ import annotations

import math

import click

from ndc.commands.common import (common_options, compile_option, data_options, device_option, emit, given, human, normalize_option,
                                 table, user_errors, warn)
from ndc.errors import NdcError
from ndc.ir import Spec


def parse_floats(text: str | None, what: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NdcError(f"bad {what} {text!r}: expected numbers separated by commas, e.g. 0.5,0.75") from None


def parse_size(text: str) -> int:
    """'16G' -> bytes."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        size = float(t[: len(t) - len(unit)])
    except ValueError:
        raise NdcError(f"bad size {text!r}: expected e.g. 500M or 16G") from None
    if not (math.isfinite(size) and size >= 0):
        raise NdcError(f"bad size {text!r}: a size is 0 or more, e.g. 500M or 16G")
    return int(size * units[unit])


@click.command("distill")
@click.option("--width", "widths", default=None, metavar="K[,K...]", help="Width multipliers: every internal channel dimension times K.")
@click.option("--sparsity", "sparsities", default=None, metavar="S[,S...]", help="Fractions of conv/linear weights pruned (combined with every --width).")
@click.option("--spec", "specs", multiple=True, metavar="SPEC", help="An explicit spec such as width=0.5,sparsity=0.3 or nm=2:4 (repeatable).")
@click.option("--slimmable", "slim_widths", default=None, metavar="K[,K...]",
              help="One job per neighbourhood trains all these widths at once, sharing their weights for its first 10% "
                   "of steps; each width is a candidate of its own (spec width=K,slim=chain or slim=teacher).")
@click.option("--assistant", type=click.Choice(["chain", "none"]), default=None,
              help="--slimmable: each width learns from the next wider one (chain: teacher assistants, IPKD-TA), "
                   "or every width from the teacher (none) [default: chain].")
@click.option("--gates", is_flag=True, help="Learn per-channel gates with a sparsity penalty; the open gates give each "
                                            "neighbourhood's width (one candidate per --gate-penalty, spec gates=L).")
@click.option("--gate-penalty", "gate_penalties", default=None, metavar="L[,L...]",
              help="--gates: price of the whole neighbourhood's parameters in relative squared error; larger gives "
                   "smaller students [default: 0.3].")
@data_options
@normalize_option
@click.option("--data-free", is_flag=True, help="Train on Gaussian noise inputs (the paper's section 6); same as --source noise.")
@click.option("--source", type=click.Choice(["cache", "recompute", "noise"]), default=None,
              help="Where inputs come from [default: cache when it fits --cache-budget, else recompute; noise with --data-free].")
@click.option("--noise", type=click.Choice(["gaussian", "matched"]), default="gaussian", show_default=True,
              help="--source noise: N(0,1), or per-channel moments measured on --calibration real examples.")
@click.option("--calibration", type=int, default=256, show_default=True, help="Examples used to measure moments for --noise matched.")
@click.option("--lookahead", type=int, default=0, show_default=True, help="Look-ahead terms through the next J teacher neighbourhoods.")
@click.option("--alpha", default=None, metavar="A[,A...]", help="Weights of the look-ahead terms (one, or one per step) [default: 1].")
@click.option("--epochs", type=int, default=10, show_default=True, help="Passes over the training inputs per job.")
@click.option("--steps", type=int, default=None, help="Optimiser steps per job (overrides --epochs).")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Inputs per training step of each job.")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Adam learning rate (cosine decay to 0).")
@click.option("--init", type=click.Choice(["teacher", "random"]), default="teacher", show_default=True,
              help="Start students from the teacher's most important channels, or from scratch.")
@click.option("--round-to", type=int, default=1, show_default=True, help="Round shrunk channel counts to a multiple of N.")
@click.option("--augment-passes", type=int, default=0, show_default=True,
              help="Extra randomly translated passes of the training set (cached, or fresh per epoch with recompute).")
@click.option("--val-size", type=int, default=1000, show_default=True, help="Held-out examples for errors and early stopping.")
@click.option("--evals", type=int, default=10, show_default=True, help="Held-out evaluations per job (for early stopping).")
@click.option("--patience", type=int, default=3, show_default=True, help="Held-out evaluations without improvement before a job stops (0: at the first that is no better).")
@click.option("--bn-stats", type=click.Choice(["auto", "batch", "frozen"]), default="auto", show_default=True,
              help="Students' batch norms learn batch statistics, or keep the teacher's (auto: frozen with noise inputs).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds each job (with its key): initialisation, batch order, noise.")
@click.option("--only", multiple=True, metavar="NAME", help="Distil only this neighbourhood (repeatable).")
@click.option("--engine", type=click.Choice(["auto", "jobs", "fused"]), default="auto", show_default=True,
              help="jobs: one job per candidate; fused: every candidate of a device in one loop, one backward per step "
                   "(auto: fused on a GPU, jobs on a CPU).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Autocast the students' forward passes (fp16 with loss scaling); fp32 was faster for small blocks (measured).")
@compile_option
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Units at a time: processes, one torch thread each (fused: one process per GPU by default).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where jobs run: processes on this machine, or Ray tasks (a local or --address cluster).")
@click.option("--address", default=None, help="--backend ray: join this cluster instead of starting a local one.")
@device_option
@click.option("--devices", default=None, metavar="N[,N...]", help="--device cuda: these GPUs only [default: every visible GPU].")
@click.option("--cache-budget", default="16G", show_default=True, metavar="SIZE", help="Disk for the workspace's activation caches: the default source writes none larger, and a new one "
              "deletes the least recently used others to fit.")
@click.option("--checkpoint-every", type=click.FloatRange(min=1), default=60, show_default=True, metavar="SECONDS",
              help="Checkpoint unfinished candidates this often; a killed run resumes from there.")
@click.option("--force", is_flag=True, help="Redo every job, even those already done.")
@click.option("--dry-run", is_flag=True, help="Show each student's size and what shrank, without training.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
@common_options
@user_errors
def command(widths, sparsities, specs, slim_widths, assistant, gates, gate_penalties, data_spec, limit, normalize, data_free, source, noise, calibration, lookahead, alpha, epochs, steps,
            batch_size, lr, init, round_to, augment_passes, val_size, evals, patience, bn_stats, seed, only, engine, precision, compile_mode, workers, backend,
            address, device, devices, cache_budget, checkpoint_every, force, dry_run, quiet, workspace, fmt):
    """Rewrite and train a student for every neighbourhood and spec.

    Each (neighbourhood, spec) candidate is an independent job: its student is
    trained to reproduce the teacher neighbourhood's output from the teacher's
    input. Finished jobs are skipped on a rerun.

    \b
      ndc distill --width 0.5 --data fashion-mnist
      ndc distill --width 0.5,0.75 --data fashion-mnist --workers 2
      ndc distill --sparsity 0.5 --data-free --steps 2000
      ndc distill --slimmable 0.25,0.5,0.75,1.0 --assistant chain --data fashion-mnist
      ndc distill --gates --gate-penalty 0.1,0.3,1 --data fashion-mnist
      ndc distill --width 0.5 --dry-run
    """
    from ndc import stages
    from ndc.distill import DistillConfig, expand_specs, plan_candidates
    from ndc.plan import load_teacher
    from ndc.progress import Progress
    from ndc.workspace import Workspace

    ws = Workspace(workspace)
    extra = _slimmable_specs(parse_floats(slim_widths, "--slimmable"), assistant) + _gate_specs(gates, gate_penalties)
    spec_list = expand_specs(parse_floats(widths, "--width"), parse_floats(sparsities, "--sparsity"), list(specs) + extra)
    if data_free:
        if source not in (None, "noise"):
            raise NdcError(f"--data-free trains on noise; it cannot be combined with --source {source}")
        source = "noise"
    if source is None and not data_spec and not dry_run:
        from ndc.tokens import data_example, reads_token_ids

        raise NdcError(f"give --data SPEC ({data_example(reads_token_ids(ws))}) or --data-free")
    # Validated before any work, a dry run's included: a bad option costs nothing.
    cfg = DistillConfig(data=data_spec, limit=limit, normalize=normalize, source=source or ("recompute" if data_spec else "noise"),
                        noise=noise, calibration=calibration, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr,
                        lookahead=lookahead, alpha=tuple(parse_floats(alpha, "--alpha")), init=init, round_to=round_to,
                        augment_passes=augment_passes, val_size=val_size, evals=evals, patience=patience, bn_stats=bn_stats,
                        seed=seed, engine="jobs" if engine == "auto" else engine, precision=precision,
                        compile=compile_mode)
    budget = parse_size(cache_budget)
    if dry_run:
        from ndc.distill.slimmable import jobs_of

        with ws.reading():
            teacher = load_teacher(ws)
            candidates = plan_candidates(teacher.plan, spec_list, tuple(only))
            if not candidates:
                raise NdcError("the plan has no neighbourhood to distil (all are kept); try ndc partition --by module or --by layers")
            jobs_of(candidates)  # refuses what the run would (a slimmable width 1.0 alone)
            return _dry_run(teacher, candidates, round_to, fmt)
    for message in cfg.ignored():
        warn(f"{message}; ignored")
    if source in ("recompute", "noise") and given("cache_budget"):
        warn(f"--cache-budget sizes the activation cache, which --source {source} does not use; ignored")
    progress = Progress(0, "distill", quiet=quiet, bar=fmt != "json")
    planned = {}

    def start(candidates: int, steps: int) -> None:
        planned["steps"] = steps
        progress.grow(candidates * steps)

    def update(u: dict) -> None:
        if u.get("event") == "advance":
            progress.advance(u["steps"])

    def finished(m: dict) -> None:
        if m.get("key") not in planned.setdefault("finished", set()):  # a slimmable job's widths finish together
            planned["finished"].add(m.get("key"))
            progress.advance(max(0, planned.get("steps", 0) - m.get("steps", planned.get("steps", 0))))
        if m.get("status") == "failed":
            progress.log(f"{m['neighbourhood']} {m['spec']}: FAILED: {_reason(m)}")
        else:
            resumed = f", resumed from its checkpoint at step {m['resumed_from']}" if m.get("resumed_from") else ""
            progress.log(f"{m['neighbourhood']} {m['spec']}: error {m['initial_error']:.3g} -> {m['final_error']:.3g} "
                         f"({m['steps']} steps{resumed})")

    with progress:
        result = stages.distill(ws, spec_list, cfg, source=source, engine=engine, backend=backend, workers=workers,
                                address=address, device=device, devices=devices, only=tuple(only), force=force,
                                cache_budget=budget, checkpoint_seconds=checkpoint_every, log=progress.log, warn=progress.warn,
                                on_start=start,
                                on_progress=update, on_done=finished)
    rows, failed, seconds = result.rows, result.failed, result.seconds
    payload = {
        "source": result.source,
        "engine": result.engine,
        "backend": result.backend,
        "workers": result.workers,
        "devices": result.devices,
        "seconds": seconds,
        "candidates": [_row_json(r) for r in rows],
    }

    def text() -> str:
        body = [[r["neighbourhood"], r["spec"], r["status"], human(r.get("student_params", 0)) if r.get("student_params") else "",
                 _err(r.get("initial_error")), _err(r.get("final_error")), f"{r.get('seconds', 0):.1f}"] for r in rows]
        out = table(["neighbourhood", "spec", "status", "params", "error before", "error after", "seconds"], body, "lllrrrr")
        done = sum(r["status"] == "done" for r in rows)
        skipped = sum(r["status"] == "skipped" for r in rows)
        where = f"{result.engine} engine, {result.backend} x{result.workers}, {','.join(result.devices)}"
        specs = [Spec.parse(r["spec"]) for r in rows]
        starts = [what for what, used in (("for sparsity=S, the dense start: the pruning ramps in during training",
                                           any(s.sparsity > 0 for s in specs)),
                                          ("for gates=L, the teacher's size: the gates close during training",
                                           any(s.gates is not None for s in specs))) if used]
        note = f"\n(error before {'; '.join(starts)})" if starts else ""
        return (out + note + f"\n\n{done} trained, {skipped} already done, {len(failed)} failed in {seconds:.1f}s "
                f"({result.source}; {where})")

    emit(fmt, payload, text)
    if failed:
        first = failed[0]
        kept = " (the earlier student is kept)" if first.get("kept") else ""
        raise NdcError(f"{len(failed)} of {len(rows)} jobs failed; first: {first['neighbourhood']} {first['spec']}: "
                       f"{_reason(first)}{kept}")


def _reason(metrics: dict) -> str:
    """A failed job's error without the candidate's name in front (the line names it already)."""
    error, name = str(metrics.get("error")), f"{metrics['neighbourhood']} {metrics['spec']}: "
    return error[len(name):] if error.startswith(name) else error


def _slimmable_specs(widths: list[float], assistant: str | None) -> list[str]:
    from ndc.distill.slimmable import ASSISTANTS

    if assistant is not None and not widths:
        raise NdcError("--assistant goes with --slimmable K[,K...]")
    return [str(Spec(width=k, slim=ASSISTANTS[assistant or "chain"])) for k in widths]


def _gate_specs(gates: bool, penalties: str | None) -> list[str]:
    from ndc.distill.gates import DEFAULT_PENALTY

    if penalties is not None and not gates:
        raise NdcError("--gate-penalty goes with --gates")
    if not gates:
        return []
    return [str(Spec(gates=p)) for p in parse_floats(penalties, "--gate-penalty") or [DEFAULT_PENALTY]]


def _row_json(r: dict) -> dict:
    """One candidate for --format json: the issue's keys always (null when unknown), the rest when present."""
    always = ("neighbourhood", "spec", "status", "initial_error", "final_error", "seconds")
    optional = ("student_params", "teacher_params", "student_flops", "steps", "stopped_early", "sparsity", "engine", "error", "kept",
                "job", "gates")
    return {**{k: r.get(k) for k in always}, **{k: r[k] for k in optional if k in r}}


def _err(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _dry_run(teacher, candidates, round_to: int, fmt: str) -> None:
    from ndc.passes.rewrite import format_preview, preview

    plan = teacher.plan
    rows = [preview(teacher.part(c.neighbourhood), c.spec, c.neighbourhood, plan[c.neighbourhood].input_shape, round_to=round_to)
            for c in candidates]
    emit(fmt, {"candidates": rows}, lambda: format_preview(rows))

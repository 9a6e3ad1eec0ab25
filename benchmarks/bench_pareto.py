"""Pareto fronts of Student Search (the paper's Figure 3, extended): parameters against test accuracy, five routes.

    python benchmarks/bench_pareto.py                      # ResNet-20 and ResNet-14 on Fashion-MNIST, then the plot
    python benchmarks/bench_pareto.py --models resnet20    # one model
    python benchmarks/bench_pareto.py --plot-only          # redraw benchmarks/results/pareto.png from the JSON

Models: ResNet-20 (3 x 32 x 32), trained here once on the first 10,000
images for 8 epochs; and ``ndc demo``'s teacher, a ResNet-14 with 8 base
channels on 1 x 28 x 28 images, trained here once on the first 10,000 images
for 10 epochs. Teachers are cached under ``benchmarks/results/cache/``.

Routes, every one on the same teacher, data, activation cache, epochs and
workers, in one run:

(a) ``uniform``: separately trained ``width=K`` candidates, the same K in every block;
(b) ``search``: Student Search (``--budget params=…``, exact) over those separate candidates;
(c) ``slim-chain``: one slimmable job per block (``--slimmable``, ``--assistant chain``), then search;
(d) ``slim-none``: the same with every width taught by the teacher (``--assistant none``), then search;
(e) ``gates``: one gated job per block and penalty (``--gates --gate-penalty``); the same penalty everywhere
    (the Lagrangian route), and search over the penalties' candidates.

Every student is stitched, its batch norms recalibrated on 20 training
batches, and measured on the full 10,000-image test set; no fine-tuning.
Search scores candidates on the first 1,000 test images and minimises the
summed KL divergence from the teacher under each budget, as ``ndc search``
does (``bench_search.py`` compares that with the summed accuracy drop). Training time is each route's ``run_distill`` over every block (2
worker processes of one thread each); the activation cache, shared by every
route, is built once and timed on its own. ``--timing-repeats`` also times
one block's slimmable job against its four separate jobs, interleaved, on
one worker.

Results: ``benchmarks/results/pareto-<model>.json`` and ``benchmarks/results/pareto.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from common import (DATA, RESULTS, SMALL_TEACHER_EPOCHS, cached_teacher, log, median, open_data, small_teacher_name,
                    teacher_info, workspace, write)

from ndc.backends import make_backend
from ndc.distill import DistillConfig, run_distill
from ndc.errors import NdcError
from ndc.finetune import accuracy
from ndc.heads import teacher_head
from ndc.ir import Spec
from ndc.plan import load_teacher
from ndc.scoring import Divergence
from ndc.search import Budget, HeldOut, load_candidates, quality_table, solve_budget
from ndc.stitch import build_student, recalibrate_batchnorm, uniform_selection

MODELS = {
    # name: (factory, teacher name, teacher epochs, teacher training images, input shape)
    "resnet20": ("ndc.zoo:resnet20", small_teacher_name(10_000), SMALL_TEACHER_EPOCHS, 10_000, (1, 3, 32, 32)),
    "resnet14": ("ndc.zoo:demo_teacher", "resnet14-w8-fmnist-10k", 10, 10_000, (1, 1, 28, 28)),
}
WIDTHS = (0.25, 0.5, 0.75, 1.0)
PENALTIES = (0.1, 0.3, 1.0)
BUDGETS = (0.35, 0.5, 0.65, 0.8)  # fractions of the teacher's parameters
ROUTES = {
    "separate": [Spec(width=k) for k in WIDTHS],
    "slim-chain": [Spec(width=k, slim="chain") for k in WIDTHS],
    "slim-none": [Spec(width=k, slim="teacher") for k in WIDTHS],
    "gates": [Spec(gates=p) for p in PENALTIES],
}
CALIBRATION_BATCHES = 20
EVAL_SIZE = 1000


def teacher_of(model: str):
    factory, name, epochs, examples, shape = MODELS[model]
    weights = cached_teacher(name, factory, epochs, examples, input_shape=shape)
    return workspace(f"bench-pareto-{name}", factory=factory, weights=weights, input_shape=shape), name, shape


def measure(ws, teacher, data, selection: dict) -> dict:
    student, _ = build_student(ws, teacher, selection)
    recalibrate_batchnorm(student, data, CALIBRATION_BATCHES)
    return {"params": sum(p.numel() for p in student.parameters()), "accuracy": accuracy(student, data),
            "heldout_accuracy": accuracy(student, data, batch_size=EVAL_SIZE, max_batches=1),  # search's held-out set
            "selection": {k: str(v) for k, v in selection.items()}}


def subtable(table, specs: list[Spec]):
    """The quality table restricted to one route's candidates (the teacher's own block stays an option)."""
    return replace(table, options={n: [o for o in opts if o.teacher or o.spec in specs] for n, opts in table.options.items()})


def route_points(ws, teacher, data, table, specs: list[Spec], uniform: bool, search: bool) -> list[dict]:
    """Measured students of one route: the same spec everywhere (``uniform``), and search under each budget."""
    points, seen = [], {}
    plan = teacher.plan
    if uniform:
        for spec in specs:
            if spec.width < 1.0 or spec.gates is not None:
                selection = uniform_selection(plan, spec)
                seen[tuple(sorted(selection.items()))] = point = {"kind": "uniform", "label": str(spec), **measure(ws, teacher, data, selection)}
                points.append(point)
                log(f"  uniform {spec}: {point['params']} params, {point['accuracy']:.2%}")
    sub = subtable(table, specs)
    for fraction in BUDGETS if search else ():
        try:
            result = solve_budget(sub, Budget("params", int(fraction * plan.teacher["params"])))
        except NdcError as e:
            log(f"  budget {fraction:.0%}: {e}")
            continue
        selection = result.selection()
        key = tuple(sorted(selection.items()))
        if key not in seen:
            seen[key] = measure(ws, teacher, data, selection)
        point = {"kind": "search", "label": f"params<={fraction:.0%}", "predicted": result.predicted_accuracy,
                 **{k: seen[key][k] for k in ("params", "accuracy", "selection")}}
        points.append(point)
        log(f"  search {point['label']}: {point['params']} params, {point['accuracy']:.2%} (predicted {point['predicted']:.2%})")
    return points


def held_out_errors(rows: dict[str, list[dict]]) -> dict:
    """Per width: each block's final held-out error of a slimmable route over the separate job's (median, max)."""
    separate = {(r["neighbourhood"], Spec.parse(r["spec"]).width): r["final_error"] for r in rows["separate"]}
    out = {}
    for route in ("slim-chain", "slim-none"):
        for k in WIDTHS:
            ratios = [r["final_error"] / separate[r["neighbourhood"], k] for r in rows[route]
                      if Spec.parse(r["spec"]).width == k and separate.get((r["neighbourhood"], k))]
            if ratios:
                out.setdefault(route, {})[str(k)] = {"median": median(ratios), "max": max(ratios), "blocks": len(ratios)}
    return out


def timing(ws, teacher, cfg: DistillConfig, repeats: int) -> dict:
    """One block: its four separate jobs against its slimmable job (chain), interleaved, one worker."""
    block = teacher.plan.trainable[len(teacher.plan.trainable) // 2].name
    times: dict[str, list[float]] = {"separate": [], "slim-chain": []}
    for _ in range(repeats):
        for route in times:
            t = time.perf_counter()
            run_distill(ws, ROUTES[route], cfg, make_backend("local", 1), teacher=teacher, only=(block,), force=True)
            times[route].append(time.perf_counter() - t)
            log(f"  timing {route}: {times[route][-1]:.1f}s")
    return {"block": block, "seconds": times,
            "ratio": median(times["slim-chain"]) / median(times["separate"])}


def prepare(model: str, args):
    """The model's workspace, teacher name, teacher, data, the teacher's test accuracy, and the distill configuration
    every route uses."""
    ws, teacher_name, shape = teacher_of(model)
    teacher = load_teacher(ws)
    torch.set_num_threads(2)
    data = open_data(DATA, shape[1:], limit=args.examples, workspace=ws)
    cfg = DistillConfig(data=DATA, limit=args.examples, source="cache", epochs=args.epochs, batch_size=128)
    return ws, teacher_name, teacher, data, accuracy(teacher.gm, data), cfg


def run(model: str, args) -> dict:
    from ndc.distill import DEFAULT_CACHE_BUDGET, _cache

    ws, teacher_name, teacher, data, teacher_acc, cfg = prepare(model, args)
    log(f"{model}: teacher {teacher_acc:.2%}, {teacher.plan.teacher['params']} params, "
        f"{len(teacher.plan.trainable)} blocks")
    t = time.perf_counter()
    _cache(ws, teacher, cfg, data, log, log, None, DEFAULT_CACHE_BUDGET)
    cache_seconds = time.perf_counter() - t
    rows, seconds = {}, {}
    for route, specs in ROUTES.items():
        t = time.perf_counter()
        rows[route] = run_distill(ws, specs, cfg, make_backend("local", args.workers), teacher=teacher, force=True)
        seconds[route] = time.perf_counter() - t
        failed = [r for r in rows[route] if r["status"] != "done"]
        assert not failed, failed
        log(f"{model} {route}: {len(rows[route])} candidates in {seconds[route]:.0f}s")
    candidates = load_candidates(ws, teacher)
    divergence = Divergence.of(teacher_head(teacher), data)
    table, _ = quality_table(ws, teacher, candidates, HeldOut.first(data, EVAL_SIZE), "accuracy", divergence, reuse=False)
    points = {"teacher": [{"kind": "teacher", "label": "teacher", "params": teacher.plan.teacher["params"], "accuracy": teacher_acc}]}
    for route, specs in ROUTES.items():
        if route == "separate":
            log(f"{model} uniform")
            points["uniform"] = route_points(ws, teacher, data, table, specs, uniform=True, search=False)
            log(f"{model} search")
            points["search"] = route_points(ws, teacher, data, table, specs, uniform=False, search=True)
        else:
            log(f"{model} {route}")
            points[route] = route_points(ws, teacher, data, table, specs, uniform=route == "gates", search=True)
    result = {
        "model": model, "teacher": {**teacher_info(teacher_name), "test_accuracy": teacher_acc,
                                    "params": teacher.plan.teacher["params"]},
        "examples": args.examples, "epochs": args.epochs, "workers": args.workers, "widths": WIDTHS,
        "penalties": PENALTIES, "budgets": BUDGETS, "cache_seconds": cache_seconds, "train_seconds": seconds,
        "points": points, "held_out_error_ratio": held_out_errors(rows),
        "candidates": {route: [{k: r.get(k) for k in ("neighbourhood", "spec", "final_error", "initial_error", "student_params",
                                                      "teacher_params", "steps", "stopped_early", "gates")}
                               for r in route_rows] for route, route_rows in rows.items()},
        "quality": table.to_json(),
    }
    if args.timing_repeats:
        result["timing"] = timing(ws, teacher, cfg, args.timing_repeats)
    write(f"pareto-{model}.json", result)
    return result


STYLE = {  # route: (label, marker, colour)
    "uniform": ("(a) uniform width, separate jobs", "o-", "tab:blue"),
    "search": ("(b) search over separate jobs", "s-", "tab:green"),
    "slim-chain": ("(c) slimmable, chain (IPKD-TA) + search", "^-", "tab:red"),
    "slim-none": ("(d) slimmable, no assistant + search", "v-", "tab:orange"),
    "gates": ("(e) gates", "D-", "tab:purple"),
}


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), dpi=120, squeeze=False)
    for ax, r in zip(axes[0], results):
        for route, (label, style, colour) in STYLE.items():
            kind = "uniform" if route in ("uniform", "gates") else "search"
            pts = [p for p in r["points"].get(route, []) if p["kind"] == kind]
            pts = sorted(pts, key=lambda p: p["params"])
            if pts:
                secs = r["train_seconds"]["separate" if route in ("uniform", "search") else route]
                ax.plot([p["params"] for p in pts], [100 * p["accuracy"] for p in pts], style, color=colour, markersize=4,
                        label=f"{label} ({secs / 60:.1f} min)")
        searched = sorted((p for p in r["points"].get("gates", []) if p["kind"] == "search"), key=lambda p: p["params"])
        if searched:
            ax.plot([p["params"] for p in searched], [100 * p["accuracy"] for p in searched], "D:", color="tab:purple",
                    markersize=3, alpha=0.6, label="(e') search over the gated candidates")
        t = r["points"]["teacher"][0]
        ax.scatter([t["params"]], [100 * t["accuracy"]], marker="*", s=140, color="black", zorder=4, label="teacher")
        ax.set_title(f"{r['model']} on Fashion-MNIST ({r['examples']} training images, {r['epochs']} epochs per job)", fontsize=10)
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy (%), no fine-tuning")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = RESULTS / "pareto.png"
    fig.savefig(path)
    log(f"wrote {path}")


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark on these models shares: models, training images, epochs per job, workers."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--models", default="resnet20,resnet14")
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    return ap


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    models = args.models.split(",")
    results = []
    for model in models:
        path = RESULTS / f"pareto-{model}.json"
        results.append(json.loads(path.read_text()) if args.plot_only else run(model, args))
    plot(results)


if __name__ == "__main__":
    main()

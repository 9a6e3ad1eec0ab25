"""What a budget search should minimise: summed drops (the paper's) against summed divergences, side by side.

    python benchmarks/bench_search.py                      # ResNet-20 and ResNet-14 on Fashion-MNIST
    python benchmarks/bench_search.py --models resnet14    # one model

The teachers, data, and separately trained ``width=0.25/0.5/0.75/1.0``
candidates are those of ``bench_pareto.py`` (the same cached workspaces;
candidates missing there are distilled first: 3 epochs, 10,000 images, 2
workers). For each model the candidates are scored inside the teacher once
per held-out size, which gives each candidate both its accuracy drop and its
KL divergence from the teacher's outputs in one pass, and ``solve_budget``
picks a student at each parameter budget (35, 50, 65, 80% of the teacher's)
by each objective:

* ``drop``: least summed accuracy drop on the first 1,000 test images (the paper's rule, ndc before);
* ``divergence``: least summed KL divergence on the same 1,000 images (``ndc search``'s default now);
* ``drop@5000``: least summed drop on the first 5,000 test images (five times the held-out set).

Every chosen student is stitched, its batch norms recalibrated on 20
training batches, and measured on the full 10,000-image test set (no
fine-tuning), exactly as in ``bench_pareto.py``. Each distinct student's
drop is also predicted two ways from its quality table and compared with
its drop measured on the full test set: ``ndc search``'s prediction (the
summed KL times the table's fitted drop per unit of KL) and the paper's
(the summed drops). Results: ``benchmarks/results/search-objective.json``.
"""

from __future__ import annotations

import time

from bench_pareto import BUDGETS, EVAL_SIZE, ROUTES, measure, parser, prepare, subtable
from common import log, median, write

from ndc.backends import make_backend
from ndc.distill import run_distill
from ndc.heads import teacher_head
from ndc.scoring import Divergence
from ndc.search import Budget, HeldOut, load_candidates, quality_table, selection_key, solve_budget

OBJECTIVES = {  # label: (held-out examples, objective)
    "drop": (EVAL_SIZE, "drop"),
    "divergence": (EVAL_SIZE, "divergence"),
    "drop@5000": (5 * EVAL_SIZE, "drop"),
}


def run(model: str, args) -> dict:
    ws, teacher_name, teacher, data, teacher_acc, cfg = prepare(model, args)
    specs = ROUTES["separate"]
    rows = run_distill(ws, specs, cfg, make_backend("local", args.workers), teacher=teacher)  # skips finished ones
    assert all(r["status"] in ("done", "skipped") for r in rows), [r["status"] for r in rows]
    candidates = {name: [c for c in opts if c[0] in specs] for name, opts in load_candidates(ws, teacher).items()}
    divergence = Divergence.of(teacher_head(teacher), data)
    tables, quality_seconds = {}, {}
    for examples in sorted({n for n, _ in OBJECTIVES.values()}):
        t = time.perf_counter()
        table, _ = quality_table(ws, teacher, candidates, HeldOut.first(data, examples), "accuracy", divergence, reuse=False)
        quality_seconds[examples] = time.perf_counter() - t
        tables[examples] = subtable(table, specs)
    params = teacher.plan.teacher["params"]
    measured: dict[tuple, dict] = {}
    points = {}
    for label, (examples, objective) in OBJECTIVES.items():
        points[label] = []
        for fraction in BUDGETS:
            result = solve_budget(tables[examples], Budget("params", int(fraction * params)), objective)
            key = selection_key(result)
            if key not in measured:
                measured[key] = measure(ws, teacher, data, result.selection())
            point = {"budget": fraction, "params": measured[key]["params"], "accuracy": measured[key]["accuracy"],
                     "predicted": result.predicted_accuracy, "summed_divergence": result.summed_divergence,
                     "measured_drop": 100 * (teacher_acc - measured[key]["accuracy"]),
                     "heldout_measured_drop": tables[EVAL_SIZE].drop_of(measured[key]["heldout_accuracy"]),
                     "predicted_drop": result.predicted_drop, "additive_drop": result.additive_drop,
                     "selection": measured[key]["selection"]}
            points[label].append(point)
            log(f"{model} {label} params<={fraction:.0%}: {point['params'] / params:.0%} of the teacher, "
                f"{point['accuracy']:.2%} (predicted {point['predicted']:.2%})")
    gains = [d["accuracy"] - p["accuracy"] for d, p in zip(points["divergence"], points["drop"])]
    return {"model": model, "teacher": {"name": teacher_name, "test_accuracy": teacher_acc, "params": params},
            "examples": args.examples, "epochs": args.epochs, "budgets": BUDGETS, "divergence": str(divergence),
            "quality_seconds": quality_seconds, "points": points,
            "drop_per_divergence": {examples: t.drop_per_divergence for examples, t in tables.items()},
            "divergence_minus_drop_points": [100 * g for g in gains], "median_gain_points": 100 * median(gains),
            "prediction_errors": prediction_errors(points)}


def prediction_errors(points: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Predicted minus measured drop (points), per prediction, once per distinct student: against the drop on the full
    test set, and on the 1,000 held-out images the candidates were scored on (what ``ndc search`` reports)."""
    out: dict[str, list[float]] = {}
    seen = set()
    for p in (p for label in points for p in points[label]):
        key = tuple(sorted(p["selection"].items()))
        if key in seen:
            continue
        seen.add(key)
        for prediction, field in (("calibrated divergence", "predicted_drop"), ("summed drops", "additive_drop")):
            out.setdefault(prediction, []).append(p[field] - p["measured_drop"])
            out.setdefault(f"{prediction}, held-out", []).append(p[field] - p["heldout_measured_drop"])
    return out


def main() -> None:
    args = parser(__doc__).parse_args()
    results = [run(model, args) for model in args.models.split(",")]
    gains = [g for r in results for g in r["divergence_minus_drop_points"]]
    errors = {name: [abs(e) for r in results for e in r["prediction_errors"][name]] for name in results[0]["prediction_errors"]}
    for name, values in errors.items():
        log(f"predicted drop from {name}: median error {median(values):.2f} points, largest {max(values):.2f} ({len(values)} students)")
    write("search-objective.json", {"models": results, "median_gain_points": median(gains),
                                    "wins": sum(g > 0 for g in gains), "ties": sum(g == 0 for g in gains),
                                    "losses": sum(g < 0 for g in gains),
                                    "prediction_median_abs_error_points": {name: median(v) for name, v in errors.items()},
                                    "prediction_max_abs_error_points": {name: max(v) for name, v in errors.items()}})


if __name__ == "__main__":
    main()

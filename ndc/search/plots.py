"""The Pareto sweep: stitch and measure uniform and searched students, and plot parameters against the score."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ndc.search.measure import HeldOut, measure_selection
from ndc.search.solvers import sweep_results
from ndc.search.table import QualityTable, SearchResult, selection_key, uniform_specs
from ndc.workspace import Workspace


@dataclass
class SweepPoint:
    kind: str  # teacher, uniform, max-drop, budget, selected
    label: str
    params: int
    flops: int
    predicted_accuracy: float
    measured_accuracy: float | None
    selection: dict[str, str]



def run_sweep(ws: Workspace, teacher, table: QualityTable, data, heldout: HeldOut, calibrate: int,
              selected: SearchResult | None = None, selected_measured: dict | None = None,
              log: Callable[[str], None] = lambda message: None, objective: str | None = None) -> list[SweepPoint]:
    """Measure the sweep's students by stitching each one (each distinct selection once); the teacher and the selected student come along."""
    points = [SweepPoint("teacher", "teacher", table.teacher_size["params"], table.teacher_size["flops"],
                         table.teacher_accuracy, table.teacher_accuracy, {})]
    entries = sweep_results(table, uniform_specs(table), objective=objective)
    cache: dict[tuple, dict] = {}
    if selected is not None:
        entries.append(("selected", "selected", selected))
        if selected_measured is not None:
            cache[selection_key(selected)] = selected_measured
    distinct, done = len({selection_key(r) for _, _, r in entries} - set(cache)), 0
    for kind, label, result in entries:
        key = selection_key(result)
        if key not in cache:
            done += 1
            log(f"[{done}/{distinct}] measuring {kind} {label}")
            cache[key] = measure_selection(ws, teacher, result.selection(), data, heldout, table.as_metric(),
                                           calibrate)
        measured = cache[key]
        points.append(SweepPoint(kind, label, result.size("params"), result.size("flops"), result.predicted_accuracy,
                                 measured["accuracy"], {n: o.label for n, o in result.choice.items()}))
    return points


def plot_pareto(points: Sequence[SweepPoint], frontier: Sequence[SearchResult], table: QualityTable, path,
                title: str = "") -> None:
    """Parameters (x) against the score (y; in % for fractions): uniform students as a line, searched students as
    markers, the predicted frontier as a dashed step line, the teacher as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ndc.workspace import atomic_write

    measure = table.as_metric()
    metric, unit = measure.title, (100 if measure.fraction else 1)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    if frontier:
        xs = [r.size("params") for r in frontier] + [table.teacher_size["params"]]
        ys = [unit * r.predicted_accuracy for r in frontier]
        ys.append(ys[-1])
        basis = "summed divergence" if frontier[0].prediction == "divergence" else "summed drops"
        ax.step(xs, ys, where="post", linestyle="--", color="0.6", linewidth=1, label=f"search, predicted from {basis} (exact frontier)")
    uniform = sorted((p for p in points if p.kind == "uniform"), key=lambda p: p.params)
    if uniform:
        ax.plot([p.params for p in uniform], [unit * p.measured_accuracy for p in uniform], "o-", color="tab:blue",
                label="uniform spec, measured")
        for p in uniform:
            ax.annotate(p.label, (p.params, unit * p.measured_accuracy), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color="tab:blue")
    styles = {"budget": ("s", "tab:green", "search --budget, measured"),
              "max-drop": ("^", "tab:orange", "search --max-drop, measured"),
              "selected": ("*", "tab:red", "this search, measured")}
    for kind, (marker, color, label) in styles.items():
        chosen = [p for p in points if p.kind == kind and p.measured_accuracy is not None]
        if chosen:
            ax.scatter([p.params for p in chosen], [unit * p.measured_accuracy for p in chosen], marker=marker,
                       color=color, s=110 if kind == "selected" else 40, zorder=3, label=label)
    teacher = next((p for p in points if p.kind == "teacher"), None)
    if teacher is not None:
        ax.scatter([teacher.params], [unit * teacher.measured_accuracy], marker="*", color="black", s=140, zorder=4,
                   label="teacher")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{metric} (%)" if measure.fraction else metric)
    ax.set_title(title or f"Student Search: parameters against {metric} ({table.examples} held-out examples)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)

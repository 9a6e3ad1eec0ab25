"""What search writes: ``selection.json`` (read by ``ndc stitch``) and the Pareto sweep's ``search/pareto.csv``."""

from __future__ import annotations

from collections.abc import Sequence

from ndc.search.measure import SEARCH_DIR
from ndc.search.plots import SweepPoint, plot_pareto
from ndc.search.solvers import pareto_choices
from ndc.search.table import QualityTable, SearchResult
from ndc.workspace import Workspace

PARETO_CSV = f"{SEARCH_DIR}/pareto.csv"
PARETO_PNG = f"{SEARCH_DIR}/pareto.png"
# What a search without a rule prints as null: the keys of selection.json that say what was chosen and how it measured.
OUTCOME_KEYS = ("rule", "teacher", "predicted_drop", "prediction", "predicted_accuracy", "measured_accuracy", "unseen",
                "params", "flops", "teacher_params", "teacher_flops", "candidates", "made_for", "weights", "notes")


def selection_document(result: SearchResult, measured: dict | None, data_spec: str | None) -> dict:
    """The JSON of ``selection.json``: what stitch needs (``selection``) and what search knew and found."""
    table = result.table
    doc = {
        "selection": {name: str(spec) for name, spec in result.selection().items()},
        "teacher": result.teacher_parts,
        **result.rule,
        "metric": table.metric,
        "eval_size": table.examples,
        "data": data_spec,
        "teacher_accuracy": table.teacher_accuracy,
        "divergence": table.divergence,
        "predicted_drop": result.predicted_drop,
        "prediction": result.prediction,
        "drop_per_divergence": table.drop_per_divergence,
        "summed_divergence": result.summed_divergence,
        "additive_drop": result.additive_drop,
        "predicted_accuracy": result.predicted_accuracy,
        "measured_accuracy": None if measured is None else measured["accuracy"],
        "measured_uncalibrated_accuracy": None if measured is None else measured["uncalibrated_accuracy"],
        "calibrated_norms": None if measured is None else measured["calibrated_norms"],
        "measured_drop": None if measured is None else round(table.drop_of(measured["accuracy"]), 6),
        "unseen": None if measured is None else measured.get("unseen"),
        "params": result.size("params"),
        "flops": result.size("flops"),
        "teacher_params": table.teacher_size["params"],
        "teacher_flops": table.teacher_size["flops"],
        "candidates": {name: {"spec": str(o.spec), "teacher": o.teacher, "params": o.params, "flops": o.flops,
                              "accuracy": o.accuracy, "drop": o.drop, "divergence": o.divergence}
                       for name, o in result.choice.items()},
        "notes": result.notes,
    }
    return doc


def write_selection(ws: Workspace, result: SearchResult, measured: dict | None, data_spec: str | None,
                    made_for: dict[str, str] | None = None) -> dict:
    """Write ``selection.json`` (the file ``ndc stitch`` uses by default) and record it in the manifest; ``made_for``
    (per neighbourhood, as each candidate records it) lets stitch refuse the file after the teacher or partition
    changed, and ``weights`` (the sha256 of each chosen student's weights) after a chosen student was trained again."""
    from ndc.distill.store import JobStore
    from ndc.stitch import SELECTION

    store = JobStore(ws)
    weights = {name: store.weights_sha(name, spec) for name, spec in result.selection().items()
               if not result.choice[name].teacher}
    doc = {**selection_document(result, measured, data_spec), "made_for": made_for, "weights": weights}
    ws.write_json(SELECTION, doc)
    ws.record(SELECTION, made_from={"quality": result.table.key, "rule": result.rule})
    return doc


def write_pareto(ws: Workspace, points: Sequence[SweepPoint], table: QualityTable, title: str = "") -> dict[str, str]:
    """Write ``search/pareto.csv`` and ``search/pareto.png`` (parameters against accuracy); returns their paths."""
    import csv
    import io
    import json

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["kind", "label", "params", "flops", "predicted_accuracy", "measured_accuracy", "selection"])
    for p in points:
        writer.writerow([p.kind, p.label, p.params, p.flops, f"{p.predicted_accuracy:.6f}",
                         "" if p.measured_accuracy is None else f"{p.measured_accuracy:.6f}",
                         json.dumps(p.selection, sort_keys=True)])
    csv_path = ws.write_text(PARETO_CSV, buf.getvalue())
    png_path = ws.path(PARETO_PNG)
    plot_pareto(points, pareto_choices(table, "params"), table, png_path, title)
    return {"csv": str(csv_path), "png": str(png_path)}



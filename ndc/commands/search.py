"""``ndc search``: Student Search over the trained candidates; writes the selection ``ndc stitch`` uses."""

from __future__ import annotations

import click

from ndc.commands.common import (common_options, data_options, device_option, emit, finite_float, given, human, metric_option,
                                 normalize_option, remembered_data, table, user_errors, warn)
from ndc.errors import NdcError


@click.command("search")
@click.option("--max-drop", type=finite_float("a finite number of points"), default=None, metavar="X",
              help="Greedy rule: per neighbourhood, the smallest candidate whose drop is below X points.")
@click.option("--budget", "budget_text", default=None, metavar="params=N|flops=N",
              help="Exact rule: the best student within N parameters or FLOPs, by --objective "
                   "(suffixes K, M, G; or a percentage of the teacher, e.g. params=50%).")
@click.option("--objective", type=click.Choice(["divergence", "drop"]), default=None,
              help="What --budget minimises over the neighbourhoods: the summed divergence of the output from the "
                   "teacher's (KL for class scores; continuous, so a larger budget keeps paying) or the summed "
                   "--metric drop (the paper's).  [default: divergence]")
@data_options
@click.option("--eval-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Held-out set: the first N examples of the test split.")
@metric_option("Score of each candidate inside the teacher")
@click.option("--fallback", type=click.Choice(["teacher", "widest"]), default="teacher", show_default=True,
              help="--max-drop: what a neighbourhood keeps when no candidate qualifies.")
@click.option("--calibrate", type=click.IntRange(min=0), default=20, show_default=True,
              help="Training batches to recalibrate the stitched student's batch norms before measuring it (0: off).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Stitch the selected student and measure it on the held-out set.")
@click.option("--plot", is_flag=True,
              help="Also measure uniform and searched students and write search/pareto.png and search/pareto.csv.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Examples per forward pass.")
@normalize_option
@device_option
@common_options
@user_errors
@remembered_data()
def command(max_drop, budget_text, objective, data_spec, limit, eval_size, metric, fallback, calibrate, verify, plot,
            batch_size, normalize, device, workspace, fmt):
    """Pick one trained candidate per neighbourhood and write WORKSPACE/selection.json.

    Each candidate is scored inside the teacher (only its neighbourhood
    replaced) on the held-out set (by --metric, accuracy by default); its drop is
    how much worse than the teacher's score that is, in percentage points;
    its divergence is how far the output moved from the teacher's (KL
    divergence for class scores). --max-drop X takes, per neighbourhood, the
    smallest candidate (parameters, then FLOPs) whose drop is below X;
    --budget finds the choice with the least summed divergence (or with
    --objective drop, summed drop) whose whole student fits the budget (solved
    exactly; the teacher's own neighbourhood is always an option).
    Without a rule, the table of candidates is printed and nothing is chosen.
    The selected student is stitched, its batch norms recalibrated, and its
    measured score reported beside the predicted one: the teacher's minus
    the summed divergence times the drop per unit of divergence fitted on
    all candidates (the summed drops when no divergence was measured), and
    again on test examples after the held-out set, which chose nothing.
    `ndc stitch` then uses selection.json by default.

    \b
      ndc search --max-drop 1 --data fashion-mnist
      ndc search --budget params=150K --data fashion-mnist --plot
      ndc stitch -o student.onnx --data fashion-mnist
    """
    from ndc import stages
    from ndc.scoring import DIVERGENCE_TITLES
    from ndc.workspace import Workspace

    if max_drop is not None and budget_text is not None:
        raise NdcError("give one of --max-drop and --budget")
    if not verify and not plot and given("calibrate"):
        warn("--calibrate recalibrates the students search measures, and --no-verify measures none; ignored")
    out = stages.search(Workspace(workspace), data=data_spec, limit=limit, normalize=normalize, max_drop=max_drop,
                        budget=budget_text, objective=objective, eval_size=eval_size, metric=metric, fallback=fallback,
                        calibrate=calibrate, verify=verify, plot=plot, batch_size=batch_size, device=device, warn=warn,
                        log=lambda m: click.echo(m, err=True))
    quality, result, measured, doc, files, payload = out.quality, out.result, out.measured, out.doc, out.files, out.payload
    metric, reused, budget = out.metric, out.reused, out.budget

    def text() -> str:
        chosen = {name: o for name, o in (result.choice.items() if result else [])}
        rows = []
        for name, opts in quality.options.items():
            for o in opts:
                mark = "<-" if chosen.get(name) == o else ""
                divergence = "" if o.divergence is None else f"{o.divergence:.3g}"
                rows.append([name, o.label, human(o.params), human(o.flops), metric.format(o.accuracy), f"{o.drop:+.2f}",
                             divergence, mark])
        divergence_title = DIVERGENCE_TITLES.get(quality.divergence, "divergence")
        headers = ["neighbourhood", "candidate", "params", "FLOPs", metric.title, "drop", divergence_title, ""]
        lines = [table(headers, rows, "llrrrrrl"), ""]
        lines.append(f"teacher {metric.format(quality.teacher_accuracy)} {metric.title} on {quality.examples} held-out examples"
                     + (" (measurements reused from search/quality.json)" if reused else ""))
        if doc is not None:
            rule = (f"--max-drop {max_drop:g}" if max_drop is not None else
                    f"--budget {budget.kind}<={human(budget.limit)} (least summed {doc['objective']})")
            lines.append(f"{rule}: student {human(doc['params'])} params ({doc['params'] / doc['teacher_params']:.0%} of the teacher), "
                         f"{human(doc['flops'])} FLOPs ({doc['flops'] / max(doc['teacher_flops'], 1):.0%})")
            if measured is None:
                measured_text = "not measured (--no-verify)"
            elif measured["calibrated_norms"]:
                measured_text = (f"measured {metric.format(measured['uncalibrated_accuracy'])} as stitched, "
                                 f"{metric.format(measured['accuracy'])} after recalibrating {measured['calibrated_norms']} batch norms")
            else:
                measured_text = f"measured {metric.format(measured['accuracy'])}"
            points = " points" if metric.fraction else ""
            if doc["prediction"] == "divergence":
                basis = (f"{doc['drop_per_divergence']:.3g} x summed {DIVERGENCE_TITLES[doc['divergence']]} "
                         f"{doc['summed_divergence']:.3g}; summed drops {doc['additive_drop']:+.2f}")
            else:
                basis = "summed drops"
            lines.append(f"predicted {metric.format(doc['predicted_accuracy'])} (drop {doc['predicted_drop']:.2f}{points} "
                         f"= {basis}), {measured_text}")
            unseen = doc.get("unseen")
            if unseen:
                lines.append(f"on {unseen['examples']} test examples that chose nothing: {metric.format(unseen['accuracy'])} "
                             f"against the teacher's {metric.format(unseen['teacher_accuracy'])} (drop {unseen['drop']:.2f}{points})")
            lines.append(f"wrote {payload['selection_file']}; `ndc stitch -o FILE` uses it")
        else:
            lines.append("no rule given: pass --max-drop X or --budget params=N to choose a student")
        if files:
            lines.append(f"wrote {files['png']} and {files['csv']}")
        return "\n".join(lines)

    emit(fmt, payload, text)

"""``ndc stitch -o FILE``: recombine trained students, recalibrate, export and verify."""

from __future__ import annotations

import click

from ndc.commands.common import (common_options, data_options, device_option, emit, given, human, normalize_option,
                                 remembered_data, selection_options, table, user_errors, warn)
from ndc.errors import count


@click.command("stitch")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file: .onnx, .pt2 or .pt (trusted-only pickle).")
@selection_options
@data_options
@normalize_option
@click.option("--calibrate", type=click.IntRange(min=0), default=20, show_default=True, help="Batches used to recalibrate batch-norm statistics (needs --data; 0: off).")
@click.option("--fold-bn", is_flag=True, help="Fold batch norms into the convolutions before export.")
@device_option
@common_options
@user_errors
@remembered_data()
def command(output, width, spec_text, selection_file, data_spec, limit, normalize, calibrate, fold_bn, device, workspace, fmt):
    """Replace each neighbourhood by its trained student and export the model.

    The format follows the suffix of -o: .onnx (checked with onnx.checker and
    compared with onnxruntime at batch sizes 1, 7 and 64), .pt2
    (torch.export, loads with torch.export.load), .pt (a pickled module:
    trusted-only). With --data, batch-norm statistics are recalibrated and
    the teacher's and the student's scores are reported.

    \b
      ndc stitch -o student.onnx
      ndc stitch -o student.onnx --width 0.5 --data fashion-mnist
      ndc stitch -o student.pt2 --selection ndc-work/selection.json
    """
    from ndc import stages
    from ndc.workspace import Workspace

    if given("calibrate") and calibrate and not data_spec:
        warn("--calibrate recalibrates batch norms on --data; without --data it is ignored")
    result = stages.stitch(Workspace(workspace), output, width=width, spec=spec_text, selection_file=selection_file,
                           data=data_spec, limit=limit, normalize=normalize, calibrate=calibrate, fold_bn=fold_bn,
                           device=device, warn=warn)
    summary, metric = result.summary, result.metric

    def text() -> str:
        sparse = summary["nonzero_params"] < 0.99 * summary["params"]  # pruned students: what a sparse runtime stores
        rows = [["parameters", human(summary["teacher_params"]),
                 human(summary["params"]) + (f" ({human(summary['nonzero_params'])} non-zero)" if sparse else "")],
                ["FLOPs", human(summary["teacher_flops"]), human(summary["flops"])]]
        if summary["score"] is not None:
            rows.append([metric.title, metric.format(summary["teacher_score"]), metric.format(summary["score"])])
        lat = summary.get("latency_ms") or {}
        theirs = summary.get("teacher_latency_ms") or {}
        if summary.get("teacher_bytes"):
            rows.append([f"{summary['format']} file", f"{human(summary['teacher_bytes'])}B", f"{human(summary['bytes'] or 0)}B"])
        for batch in ("1", "32"):
            if batch in lat and batch in theirs:
                rows.append([f"latency, batch {batch}", f"{theirs[batch]:.2f} ms", f"{lat[batch]:.2f} ms"])
        lines = [table(["", "teacher", "student"], rows, "lrr"), ""]
        if summary["selection_file"]:
            lines.append(f"students chosen by {summary['selection_file']}")
        lines.append(f"wrote {summary['output']} (max |diff| vs PyTorch {summary['max_abs_diff']:.2g}"
                     f"{'' if theirs else ', ' + human(summary['bytes'] or 0) + 'B'}; latency: "
                     f"{'onnxruntime' if summary['format'] == 'onnx' else 'torch'}, one thread, median of 20)" if lat else
                     f"wrote {summary['output']} ({human(summary['bytes'] or 0)}B, max |diff| vs PyTorch {summary['max_abs_diff']:.2g})")
        if summary["calibrated_norms"]:
            batches = count(summary["calibration_batches"], "batch", "batches")
            lines.append(f"recalibrated {summary['calibrated_norms']} batch norms on {batches} of {data_spec}")
        if summary.get("folded_bn"):
            lines.append(f"folded {summary['folded_bn']} batch norms into their convolutions in the exported file")
        return "\n".join(lines)

    emit(fmt, summary, text)

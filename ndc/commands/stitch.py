"""``ndc stitch -o FILE``: recombine trained students, recalibrate, export and verify."""

from __future__ import annotations

import click

from ndc.commands.common import (common_options, data_options, emit, human, normalize_option, resolve_selection,
                                 selection_options, table, user_errors)
from ndc.errors import NdcError


@click.command("stitch")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file: .onnx, .pt2 or .pt (trusted-only pickle).")
@selection_options
@data_options
@normalize_option
@click.option("--calibrate", type=int, default=20, show_default=True, help="Batches used to recalibrate batch-norm statistics (needs --data; 0: off).")
@click.option("--fold-bn", is_flag=True, help="Fold batch norms into the convolutions before export.")
@common_options
@user_errors
def command(output, width, spec_text, selection_file, data_spec, limit, normalize, calibrate, fold_bn, workspace, fmt):
    """Replace each neighbourhood by its trained student and export the model.

    The format follows the suffix of -o: .onnx (checked with onnx.checker and
    compared with onnxruntime at batch sizes 1, 7 and 64), .pt2
    (torch.export, loads with torch.export.load), .pt (a pickled module:
    trusted-only). With --data, batch-norm statistics are recalibrated and
    teacher and student accuracy are reported.

    \b
      ndc stitch -o student.onnx
      ndc stitch -o student.onnx --width 0.5 --data fashion-mnist
      ndc stitch -o student.pt2 --selection ndc-work/selection.json
    """
    from ndc.metrics import count_flops, count_params
    from ndc.passes.export import check_output_path, export_model
    from ndc.plan import load_teacher
    from ndc.stitch import build_student, recalibrate_batchnorm, save_student
    from ndc.workspace import Workspace

    check_output_path(output)
    if calibrate < 0:
        raise NdcError("--calibrate must be 0 or more")
    ws = Workspace(workspace)
    teacher = load_teacher(ws)
    plan = teacher.plan
    selection = resolve_selection(ws, plan, width, spec_text, selection_file)
    model, made_from = build_student(ws, teacher, selection)

    data, calibrated = None, 0
    if data_spec:
        from ndc.data import open_data

        data = open_data(data_spec, plan.input_shape[1:], limit=limit, workspace=ws, normalize=normalize)
        calibrated = recalibrate_batchnorm(model, data, calibrate)
    save_student(ws, model, selection, made_from, {"calibrated_batches": calibrate if calibrated else 0, "data": data_spec})

    report = export_model(model, output, plan.input_shape, fold_bn=fold_bn, report_dir=ws.path("student/export-failure"),
                          inputs=plan.inputs)
    summary = {
        "output": report["output"],
        "format": report.get("format"),
        "params": count_params(model),
        "teacher_params": plan.teacher["params"],
        "flops": count_flops(model, plan.input_shape, plan.inputs),
        "teacher_flops": plan.teacher["flops"],
        "bytes": report.get("bytes"),
        "max_abs_diff": report.get("max_abs_diff"),
        "latency_ms": report.get("latency_ms"),
        "selection": {k: str(v) for k, v in selection.items()},
        "calibrated_norms": calibrated,
    }
    if data is not None:
        from ndc.evaluate import evaluate

        scores = evaluate(model, data, teacher=teacher.gm)
        summary.update({k: scores.get(k) for k in ("accuracy", "teacher_accuracy", "agreement")})
    ws.write_json("student/report.json", summary)

    def text() -> str:
        rows = [["parameters", human(summary["teacher_params"]), human(summary["params"])],
                ["FLOPs", human(summary["teacher_flops"]), human(summary["flops"])]]
        if "accuracy" in summary:
            rows.append(["accuracy", f"{summary['teacher_accuracy']:.2%}", f"{summary['accuracy']:.2%}"])
        lat = summary.get("latency_ms") or {}
        lines = [table(["", "teacher", "student"], rows, "lrr"), ""]
        lines.append(f"wrote {summary['output']} ({human(summary['bytes'] or 0)}B, max |diff| vs PyTorch {summary['max_abs_diff']:.2g}"
                     + (f", latency {lat.get('1', 0):.2f} ms at batch 1, {lat.get('32', 0):.2f} ms at batch 32" if lat else "") + ")")
        if calibrated:
            lines.append(f"recalibrated {calibrated} batch norms on {calibrate} batches of {data_spec}")
        return "\n".join(lines)

    emit(fmt, summary, text)

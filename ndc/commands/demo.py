"""``ndc demo``: the whole pipeline on an embedded default, ending in one table."""

from __future__ import annotations

import click

from ndc.commands.common import common_options, device_option, emit, human, table, user_errors


@click.command("demo")
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Data set [default: fashion-mnist if Debian's dataset-fashion-mnist is installed, else digits].")
@click.option("--limit", type=click.IntRange(min=1), default=10_000, show_default=True, help="Training (and test) examples used.")
@click.option("--width", type=float, default=0.5, show_default=True, help="Width of the student's neighbourhoods.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Distillation jobs in parallel.")
@click.option("--quick", is_flag=True, help="Tiny settings to check that everything runs: at most 600 examples, a 2-epoch "
                                           "teacher, one epoch per other stage.")
@device_option
@common_options
@user_errors
def command(data_spec, limit, width, workers, quick, device, workspace, fmt):
    """Run the whole pipeline on a small residual teacher and real data.

    Trains a ResNet-14 teacher (kept in the workspace for the next run),
    partitions it, distils every residual block at --width in parallel,
    stitches the students, fine-tunes briefly, exports ONNX and checks it with
    onnxruntime, then trains the same student from scratch by end-to-end KD
    for the same wall time, and prints both side by side.
    """
    from ndc.demo import DemoConfig, run_demo
    from ndc.workspace import Workspace

    cfg = DemoConfig(data=data_spec, limit=limit, width=width, workers=workers, device=device)
    if quick:
        cfg = DemoConfig(data=data_spec, limit=min(limit, 600), width=width, workers=workers, teacher_epochs=2,
                         distill_epochs=1, finetune_epochs=1, device=device)
    result = run_demo(Workspace(workspace), cfg, log=lambda m: click.echo(m, err=True))
    emit(fmt, result, lambda: render(result))


def render(r: dict) -> str:
    t, ft = r["teacher"], r["finetuned"]
    rows = [
        ["teacher", f"{t['accuracy']:.2%}", human(t["params"]), human(t["flops"]), f"{human(t['onnx_bytes'])}B", _ms(t["latency_ms"])],
        [f"student, neighbourhood-distilled (width {r['width']})", f"{r['distilled']['accuracy']:.2%}", human(ft["params"]),
         human(ft["flops"]), "", ""],
        ["student, + fine-tuned", f"{ft['accuracy']:.2%}", human(ft["params"]), human(ft["flops"]), f"{human(ft['onnx_bytes'])}B",
         _ms(ft["latency_ms"])],
        [f"student, end-to-end KD for the same {r['nd_seconds']:.0f}s", f"{r['kd_baseline']['accuracy']:.2%}", human(ft["params"]),
         human(ft["flops"]), "", ""],
    ]
    out = [f"ndc demo on {r['data']} ({r['train_examples']} training / {r['test_examples']} test examples), "
           f"{r['workers']} workers on {r['device']}, activations from {r['source']}", ""]
    out.append(table(["model", "accuracy", "params", "FLOPs", "ONNX", "latency b1 / b32"], rows, "lrrrrr"))
    out.append("")
    out.append(table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in r["seconds"].items()], "lr"))
    out.append(f"\nONNX student: {ft['onnx']} (onnxruntime matches PyTorch to {ft['max_abs_diff']:.1e})")
    return "\n".join(out)


def _ms(lat: dict | None) -> str:
    if not lat:
        return ""
    return f"{lat.get('1', 0):.2f} / {lat.get('32', 0):.1f} ms"

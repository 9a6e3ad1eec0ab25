"""``ndc finetune``: end-to-end knowledge distillation of the stitched student."""

from __future__ import annotations

import click

from ndc.commands.common import common_options, data_options, emit, normalize_option, table, user_errors
from ndc.errors import NdcError


FINETUNE_LR = 1e-2  # the paper's appendix


def training_options(lr_default: float):
    """Options of every end-to-end training command (finetune, kd)."""

    def wrap(f):
        for option in reversed([
            click.option("--epochs", type=int, default=10, show_default=True),
            click.option("--lr", type=float, default=None,
                         help=f"SGD learning rate (momentum 0.9, cosine decay) [default: {lr_default:g}; a tenth of it with --data-free]."),
            click.option("--batch-size", type=int, default=128, show_default=True),
            click.option("--tau", type=float, default=2.5, show_default=True, help="Distillation temperature."),
            click.option("--lambda", "lam", type=float, default=1.0, show_default=True, help="Weight of the label cross entropy."),
            click.option("--patience", type=int, default=None, help="Stop after N epochs without better accuracy [default: never]."),
            click.option("--time-budget", type=float, default=None, metavar="SECONDS", help="Stop training after this much wall time."),
            click.option("--no-augment", is_flag=True, help="No random translations."),
            click.option("--data-free", is_flag=True, help="Train on Gaussian-noise images with the teacher's soft targets only (--data still measures accuracy and picks the epoch kept)."),
            click.option("--restart", is_flag=True, help="Ignore an earlier checkpoint and start again."),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Also export the result (.onnx, .pt2, .pt)."),
        ]):
            f = option(f)
        return f

    return wrap


def learning_rate(lr: float | None, default: float, data_free: bool) -> float:
    """The given rate, or the default: a tenth of it on noise, which frozen batch norms do not renormalise."""
    if lr is not None:
        return lr
    return default / 10 if data_free else default


def open_training_data(ws, plan, data_spec, limit, data_free, normalize=True):
    from ndc.data import open_data
    from ndc.finetune import NoiseImages

    if not data_spec:
        raise NdcError("give --data SPEC: training and accuracy need data (with --data-free it only measures accuracy)")
    data = open_data(data_spec, plan.input_shape[1:], limit=limit, workspace=ws, normalize=normalize)
    return NoiseImages(plan.input_shape[1:], limit or 10_000, data, plan.inputs) if data_free else data


def progress_log(fmt: str):
    def log(event: dict) -> None:
        if event.get("event") == "epoch":
            click.echo(f"epoch {event['epoch']}: loss {event['train_loss']:.4f}, accuracy {event['accuracy']:.2%} "
                       f"({event['seconds']:.0f}s)", err=True)
        elif event.get("event") == "resumed":
            click.echo(f"resuming after epoch {event['epoch']}", err=True)
    return log


@click.command("finetune")
@data_options
@normalize_option
@training_options(lr_default=FINETUNE_LR)
@common_options
@user_errors
def command(data_spec, limit, normalize, epochs, lr, batch_size, tau, lam, patience, time_budget, no_augment, data_free, restart, seed,
            output, workspace, fmt):
    """Fine-tune the stitched student end to end by knowledge distillation.

    Loss: τ²·CE(softmax(T/τ), softmax(S/τ)) + λ·CE(y, softmax(S)) (the paper's
    eq. 3 with Hinton's τ² scaling). Checkpoints after every epoch; a killed
    run resumes where it stopped. The best epoch's student is saved in the
    workspace (finetune/) and exported with -o.

    \b
      ndc finetune --data fashion-mnist --epochs 5 -o student.onnx
    """
    from ndc.finetune import TrainConfig, accuracy, train
    from ndc.ir import Spec
    from ndc.plan import load_teacher
    from ndc.stitch import STUDENT_DIR, load_student, save_student
    from ndc.workspace import Workspace

    if output:
        from ndc.passes.export import check_output_path

        check_output_path(output)
    ws = Workspace(workspace)
    teacher = load_teacher(ws)
    plan = teacher.plan
    model = load_student(ws, teacher=teacher)
    data = open_training_data(ws, plan, data_spec, limit, data_free, normalize)
    cfg = TrainConfig(loss="kd", epochs=epochs, lr=learning_rate(lr, FINETUNE_LR, data_free), batch_size=batch_size, tau=tau,
                      lam=0.0 if data_free else lam, patience=patience, time_budget=time_budget, augment=not no_augment and not data_free, seed=seed,
                      freeze_bn=data_free, keep_initial=True)
    result = train(model, data, cfg, teacher=teacher.gm, ws=ws, folder="finetune", log=progress_log(fmt), resume=not restart)
    before = result["initial_accuracy"]  # measured by train() before its first epoch, kept in its checkpoint
    doc = ws.read_json(f"{STUDENT_DIR}/student.json")
    save_student(ws, model, {k: Spec.parse(v) for k, v in doc["selection"].items()}, doc["candidates"], {"finetuned": {"epochs": result["epochs"], "best_epoch": result["best_epoch"]}}, folder="finetune")
    teacher_acc = accuracy(teacher.gm, data)
    payload = {"accuracy": result["best_accuracy"], "initial_accuracy": before, "teacher_accuracy": teacher_acc, "lr": cfg.lr,
               "epochs": result["epochs"], "best_epoch": result["best_epoch"], "seconds": result["seconds"],
               "history": result["history"]}
    if output:
        from ndc.passes.export import export_model

        payload["export"] = export_model(model, output, plan.input_shape, report_dir=ws.path("finetune/export-failure"),
                                         inputs=plan.inputs)
        payload["output"] = payload["export"]["output"]
    ws.write_json("finetune/report.json", payload)

    def text() -> str:
        rows = [["teacher", f"{teacher_acc:.2%}"], ["stitched student", f"{before:.2%}"]]
        if result["best_epoch"]:
            rows.append([f"fine-tuned (epoch {result['best_epoch']})", f"{result['best_accuracy']:.2%}"])
        tail = "" if result["best_epoch"] else "\nno epoch beat the stitched student: it is kept unchanged"
        tail += f"\nwrote {payload['output']}" if output else ""
        return table(["model", "accuracy"], rows, "lr") + f"\n\n{result['epochs']} epochs in {result['seconds']:.0f}s" + tail

    emit(fmt, payload, text)

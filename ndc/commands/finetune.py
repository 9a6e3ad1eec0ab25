"""``ndc finetune``: end-to-end knowledge distillation of the stitched student."""

from __future__ import annotations

import click

from ndc.commands.common import (common_options, data_options, emit, finite_float, metric_option, normalize_option,
                                 pick_metric, table, teacher_head, user_errors)
from ndc.errors import NdcError
from ndc.losses import LOSS_CHOICES


FINETUNE_LR = 1e-2  # the paper's appendix


def training_options(lr_default: float):
    """Options of every end-to-end training command (finetune, kd)."""

    def wrap(f):
        for option in reversed([
            click.option("--loss", type=click.Choice(LOSS_CHOICES), default="auto", show_default=True,
                         help="kd: softened logits + λ·label cross entropy (classifiers); ce: labels alone, no teacher; "
                              "mse: match the teacher's outputs (any head, regression); bce: the teacher's sigmoid "
                              "probabilities (multi-label heads); auto picks from the teacher's output and the data "
                              "and says which."),
            metric_option("Score after every epoch, which picks the epoch kept"),
            click.option("--epochs", type=int, default=10, show_default=True),
            click.option("--lr", type=finite_float("a positive learning rate", positive=True), default=None,
                         help=f"SGD learning rate (momentum 0.9, cosine decay) [default: {lr_default:g}; a tenth of it with --data-free]."),
            click.option("--batch-size", type=int, default=128, show_default=True),
            click.option("--tau", type=finite_float("a positive temperature", positive=True), default=2.5,
                         show_default=True, help="Distillation temperature (--loss kd)."),
            click.option("--lambda", "lam", type=finite_float("a finite weight"), default=1.0, show_default=True,
                         help="Weight of the label term (cross entropy, or the loss's own form against the targets)."),
            click.option("--patience", type=int, default=None, help="Stop after N epochs without a better score [default: never]."),
            click.option("--time-budget", type=finite_float("a positive number of seconds", positive=True), default=None,
                         metavar="SECONDS", help="Stop training after this much wall time."),
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
    return NoiseImages(plan.input_shape[1:], limit or 10_000, data) if data_free else data


def training_setup(teacher, data, loss: str, metric: str, lam: float, data_free: bool) -> dict:
    """The :class:`~ndc.finetune.TrainConfig` fields that depend on the teacher and the data: the loss (auto's
    choice said on stderr), whether its label term applies, the per-epoch metric; labels the teacher has no
    output for are refused here, naming the example, before any training."""
    from ndc.losses import choose_loss

    head = teacher_head(teacher)
    name, labels, why = choose_loss(loss, head, data)
    labels = labels and not data_free and lam > 0
    if name == "ce" or labels and data.labels == "classes":
        hint = "train on the teacher's outputs alone with --lambda 0" if name == "kd" else "use --loss kd --lambda 0"
        data.check_classes(head.scores, hint)
    if loss == "auto" or ";" in why:  # say what auto chose, and when the labels go unused
        click.echo(why, err=True)
    return {"loss": name, "labels": labels, "probabilities": head.sigmoid and name == "bce",
            "metric": pick_metric(metric, data, head)}


def progress_log(metric):
    def log(event: dict) -> None:
        if event.get("event") == "epoch":
            click.echo(f"epoch {event['epoch']}: loss {event['train_loss']:.4f}, {metric.title} "
                       f"{metric.format(event['accuracy'])} ({event['seconds']:.0f}s)", err=True)
        elif event.get("event") == "resumed":
            click.echo(f"resuming after epoch {event['epoch']}", err=True)
    return log


def score_keys(metric, **scores) -> dict:
    """``score``-style keys of a payload, and under their old ``accuracy`` names too when the metric is accuracy."""
    out = {"metric": metric.name, "higher_is_better": metric.higher_is_better}
    for key, value in scores.items():
        out[key] = value
        if metric.kind == "accuracy":
            out[key.replace("score", "accuracy")] = value
    return out


@click.command("finetune")
@data_options
@normalize_option
@training_options(lr_default=FINETUNE_LR)
@common_options
@user_errors
def command(data_spec, limit, normalize, loss, metric, epochs, lr, batch_size, tau, lam, patience, time_budget, no_augment,
            data_free, restart, seed, output, workspace, fmt):
    """Fine-tune the stitched student end to end against the teacher.

    The loss fits the teacher's head (--loss, auto by default): for
    classifiers τ²·CE(softmax(T/τ), softmax(S/τ)) + λ·CE(y, softmax(S)) (the
    paper's eq. 3 with Hinton's τ² scaling); for regression and other heads
    the mean squared error to the teacher's outputs; for sigmoid heads the
    binary cross entropy with its probabilities. Checkpoints after every
    epoch; a killed run resumes where it stopped. The best epoch's student
    (by --metric) is saved in the workspace (finetune/) and exported with -o.

    \b
      ndc finetune --data fashion-mnist --epochs 5 -o student.onnx
      ndc finetune --data targets.npz --loss mse --metric output-error
    """
    from ndc.finetune import TrainConfig, epoch_score, train
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
    setup = training_setup(teacher, getattr(data, "real", data), loss, metric, lam, data_free)
    cfg = TrainConfig(epochs=epochs, lr=learning_rate(lr, FINETUNE_LR, data_free), batch_size=batch_size, tau=tau,
                      lam=0.0 if data_free else lam, patience=patience, time_budget=time_budget,
                      augment=not no_augment and not data_free, seed=seed, freeze_bn=data_free, keep_initial=True, **setup)
    metric = cfg.metric
    result = train(model, data, cfg, teacher=teacher.gm, ws=ws, folder="finetune", log=progress_log(metric),
                   resume=not restart)
    before = result["initial_accuracy"]  # measured by train() before its first epoch, kept in its checkpoint
    doc = ws.read_json(f"{STUDENT_DIR}/student.json")
    save_student(ws, model, {k: Spec.parse(v) for k, v in doc["selection"].items()}, doc["candidates"], {"finetuned": {"epochs": result["epochs"], "best_epoch": result["best_epoch"]}}, folder="finetune")
    teacher_score = epoch_score(teacher.gm, data, metric, teacher.gm)
    payload = {**score_keys(metric, score=result["best_accuracy"], initial_score=before, teacher_score=teacher_score),
               "loss": cfg.loss, "lr": cfg.lr, "epochs": result["epochs"], "best_epoch": result["best_epoch"],
               "seconds": result["seconds"], "history": result["history"]}
    if output:
        from ndc.passes.export import export_model

        payload["export"] = export_model(model, output, plan.input_shape, report_dir=ws.path("finetune/export-failure"))
        payload["output"] = payload["export"]["output"]
    ws.write_json("finetune/report.json", payload)

    def text() -> str:
        rows = [["teacher", metric.format(teacher_score)], ["stitched student", metric.format(before)]]
        if result["best_epoch"]:
            rows.append([f"fine-tuned (epoch {result['best_epoch']})", metric.format(result["best_accuracy"])])
        tail = "" if result["best_epoch"] else "\nno epoch beat the stitched student: it is kept unchanged"
        tail += f"\nwrote {payload['output']}" if output else ""
        return (table(["model", metric.title], rows, "lr") + f"\n\n{result['epochs']} epochs of --loss {cfg.loss} in "
                f"{result['seconds']:.0f}s" + tail)

    emit(fmt, payload, text)

"""``ndc finetune``: end-to-end knowledge distillation of the stitched student."""

from __future__ import annotations

import click

from ndc.commands.common import (common_options, compile_option, data_options, device_option, emit, finite_float,
                                 metric_option, normalize_option, remembered_data, table, user_errors)
from ndc.errors import count
from ndc.losses import LOSS_CHOICES
from ndc.training import DEFAULT_LR, OPTIMIZERS


def training_options(route: str):
    """Options of every end-to-end training command (finetune, kd)."""

    def wrap(f):
        for option in reversed([
            click.option("--loss", type=click.Choice(LOSS_CHOICES), default="auto", show_default=True,
                         help="kd: softened logits + λ·label cross entropy (classifiers); ce: labels alone, no teacher; "
                              "mse: match the teacher's outputs (any head, regression); bce: the teacher's sigmoid "
                              "probabilities (multi-label heads); auto picks from the teacher's output and the data "
                              "and says which."),
            metric_option("Score after every epoch, which picks the epoch kept"),
            click.option("--epochs", type=int, default=10, show_default=True, help="Passes over the training set."),
            click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="auto", show_default=True,
                         help="sgd: SGD with Nesterov momentum 0.9 (the paper's recipe for CNNs); adamw: AdamW "
                              "(transformers); auto: adamw for a model with attention or layer norms and no batch "
                              "norm, else sgd, and says so."),
            click.option("--lr", type=finite_float("a positive learning rate", positive=True), default=None,
                         help=f"Learning rate, with cosine decay [default: {DEFAULT_LR['sgd', route]:g} for sgd, "
                              f"{DEFAULT_LR['adamw', route]:g} for adamw; a tenth of it with --data-free]."),
            click.option("--batch-size", type=int, default=128, show_default=True, help="Examples per training step."),
            click.option("--tau", type=finite_float("a positive temperature", positive=True), default=2.5,
                         show_default=True, help="Distillation temperature (--loss kd)."),
            click.option("--lambda", "lam", type=finite_float("a finite weight"), default=1.0, show_default=True,
                         help="Weight of the label term (cross entropy, or the loss's own form against the targets)."),
            click.option("--patience", type=int, default=None, help="Stop after N epochs without a better score [default: never]."),
            click.option("--time-budget", type=finite_float("a positive number of seconds", positive=True), default=None,
                         metavar="SECONDS", help="Stop training after this much wall time."),
            click.option("--no-augment", is_flag=True, help="No random translations."),
            click.option("--data-free", is_flag=True, help="Train on Gaussian-noise images with the teacher's soft targets only (--data still measures accuracy and picks the epoch kept)."),
            click.option("--restart", is_flag=True, help="Discard an earlier checkpoint and start again."),
            click.option("--seed", type=int, default=0, show_default=True, help="Seeds batch order and augmentation (and, for kd, the initialisation)."),
            click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Also export the result (.onnx, .pt2, .pt)."),
            device_option,
            compile_option,
            click.option("--quiet", is_flag=True, help="No progress on stderr."),
        ]):
            f = option(f)
        return f

    return wrap


def epoch_progress(epochs: int, what: str, quiet: bool, fmt: str):
    """A progress bar over epochs and the callback that advances it."""
    from ndc.progress import Progress

    progress = Progress(epochs, what, quiet=quiet, bar=fmt != "json")

    def on_epoch(e: dict) -> None:
        progress.advance(1)

    return progress, on_epoch


def base_config(epochs, lr, batch_size, tau, lam, patience, time_budget, no_augment, data_free, seed, compile_mode, **extra):
    """The teacher-independent settings of an end-to-end run, checked before any work (loss, metric, optimizer and a
    default learning rate come later, from the teacher and the student)."""
    from ndc.finetune import TrainConfig

    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, tau=tau, lam=lam, patience=patience,
                       time_budget=time_budget, augment=not no_augment and not data_free, seed=seed, compile=compile_mode,
                       **extra)


@click.command("finetune")
@data_options
@normalize_option
@training_options("finetune")
@common_options
@user_errors
@remembered_data()
def command(data_spec, limit, normalize, loss, metric, optimizer, epochs, lr, batch_size, tau, lam, patience, time_budget,
            no_augment, data_free, restart, seed, output, device, compile_mode, quiet, workspace, fmt):
    """Fine-tune the stitched student end to end against the teacher.

    The loss fits the teacher's head (--loss, auto by default): for
    classifiers τ²·CE(softmax(T/τ), softmax(S/τ)) + λ·CE(y, softmax(S)) (the
    paper's eq. 3 with Hinton's τ² scaling); for regression and other heads
    the mean squared error to the teacher's outputs; for sigmoid heads the
    binary cross entropy with its probabilities. Checkpoints after every
    epoch; a killed run resumes where it stopped, and only a checkpoint of the
    same teacher, stitched student, data and settings is ever resumed. The
    best epoch's student (by --metric) is saved in the workspace (finetune/)
    and exported with -o.

    \b
      ndc finetune --data fashion-mnist --epochs 5 -o student.onnx
      ndc finetune --data targets.npz --loss mse --metric rmse
    """
    from ndc import stages
    from ndc.stitch import selection_phrase
    from ndc.workspace import Workspace

    cfg = base_config(epochs, lr, batch_size, tau, lam, patience, time_budget, no_augment, data_free, seed, compile_mode,
                      freeze_bn=data_free, keep_initial=True)
    progress, on_epoch = epoch_progress(epochs, "finetune", quiet, fmt)
    with progress:
        result = stages.finetune(Workspace(workspace), cfg, loss=loss, metric=metric, optimizer=optimizer, data=data_spec,
                                 limit=limit, normalize=normalize, data_free=data_free, output=output, restart=restart,
                                 device=device, log=progress.log, warn=progress.warn, on_epoch=on_epoch)
    payload, metric = result.payload, result.metric

    def text() -> str:
        stitched = f"stitched student ({selection_phrase(payload['selection'])})"
        rows = [["teacher", metric.format(payload["teacher_score"])], [stitched, metric.format(payload["initial_score"])]]
        if payload["best_epoch"]:
            rows.append([f"fine-tuned (epoch {payload['best_epoch']})", metric.format(payload["score"])])
        perfect = payload["initial_score"] == (0.0 if metric.kind == "output-error" else 1.0) and metric.fraction
        tail = "" if payload["best_epoch"] else (
            f"\nno epoch beat the stitched student, which already scores {metric.format(payload['initial_score'])}: "
            "it is kept unchanged" if perfect else
            "\nno epoch beat the stitched student: it is kept unchanged (a lower learning rate, "
            f"--lr {payload['lr'] / 10:g}{', or --no-augment,' if payload['augment'] else ''} may help: the first epochs can "
            "undo what distillation found)")
        tail += f"\nwrote {payload['output']}" if output else ""
        return (table(["model", metric.title], rows, "lr") + f"\n\n{count(payload['epochs'], 'epoch')} of --loss {payload['loss']} in "
                f"{payload['seconds']:.0f}s" + tail)

    emit(fmt, payload, text)

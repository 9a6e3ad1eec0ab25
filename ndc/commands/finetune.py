"""``ndc finetune``: end-to-end knowledge distillation of the stitched student."""

from __future__ import annotations

import click

from ndc.commands.common import common_options, data_options, device_option, emit, normalize_option, table, user_errors


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
            click.option("--restart", is_flag=True, help="Discard an earlier checkpoint and start again."),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Also export the result (.onnx, .pt2, .pt)."),
            device_option,
            click.option("--quiet", is_flag=True, help="No progress on stderr."),
        ]):
            f = option(f)
        return f

    return wrap


def epoch_progress(epochs: int, what: str, quiet: bool, fmt: str):
    """A progress bar over epochs and the log that feeds it."""
    from ndc.progress import Progress

    progress = Progress(epochs, what, quiet=quiet, bar=fmt != "json")

    def on_epoch(e: dict) -> None:
        progress.advance(1, accuracy=f"{e['accuracy']:.2%}")

    return progress, on_epoch


@click.command("finetune")
@data_options
@normalize_option
@training_options(lr_default=1e-2)
@common_options
@user_errors
def command(data_spec, limit, normalize, epochs, lr, batch_size, tau, lam, patience, time_budget, no_augment, data_free, restart, seed,
            output, device, quiet, workspace, fmt):
    """Fine-tune the stitched student end to end by knowledge distillation.

    Loss: τ²·CE(softmax(T/τ), softmax(S/τ)) + λ·CE(y, softmax(S)) (the paper's
    eq. 3 with Hinton's τ² scaling). Checkpoints after every epoch; a killed
    run resumes where it stopped, and only a checkpoint of the same teacher,
    stitched student, data and settings is ever resumed. The best epoch's
    student is saved in the workspace (finetune/) and exported with -o.

    \b
      ndc finetune --data fashion-mnist --epochs 5 -o student.onnx
    """
    from ndc import stages
    from ndc.finetune import TrainConfig
    from ndc.workspace import Workspace

    cfg = TrainConfig(loss="kd", epochs=epochs, lr=stages.learning_rate(lr, stages.FINETUNE_LR, data_free), batch_size=batch_size,
                      tau=tau, lam=0.0 if data_free else lam, patience=patience, time_budget=time_budget,
                      augment=not no_augment and not data_free, seed=seed, freeze_bn=data_free, keep_initial=True)
    progress, on_epoch = epoch_progress(epochs, "finetune", quiet, fmt)
    with progress:
        result = stages.finetune(Workspace(workspace), cfg, data=data_spec, limit=limit, normalize=normalize, data_free=data_free,
                                 output=output, restart=restart, device=device, log=progress.log, on_epoch=on_epoch)
    payload = result.payload

    def text() -> str:
        rows = [["teacher", f"{payload['teacher_accuracy']:.2%}"], ["stitched student", f"{payload['initial_accuracy']:.2%}"]]
        if payload["best_epoch"]:
            rows.append([f"fine-tuned (epoch {payload['best_epoch']})", f"{payload['accuracy']:.2%}"])
        tail = "" if payload["best_epoch"] else "\nno epoch beat the stitched student: it is kept unchanged"
        tail += f"\nwrote {payload['output']}" if output else ""
        return table(["model", "accuracy"], rows, "lr") + f"\n\n{payload['epochs']} epochs in {payload['seconds']:.0f}s" + tail

    emit(fmt, payload, text)

"""``ndc kd``: the end-to-end baselines, the same student architecture trained from scratch."""

from __future__ import annotations

import click

from ndc.commands.common import common_options, data_options, emit, human, normalize_option, selection_options, table, user_errors
from ndc.commands.finetune import epoch_progress, training_options


@click.command("kd")
@selection_options
@data_options
@normalize_option
@click.option("--loss", type=click.Choice(["kd", "ce"]), default="kd", show_default=True,
              help="Knowledge distillation from the teacher, or cross entropy with the labels alone.")
@training_options(lr_default=0.1)
@common_options
@user_errors
def command(width, spec_text, selection_file, data_spec, limit, normalize, loss, epochs, lr, batch_size, tau, lam, patience, time_budget,
            no_augment, data_free, restart, seed, output, device, quiet, workspace, fmt):
    """Train the student architecture from scratch end to end (the baselines).

    The student is the stitched student's architecture (--width, --spec or
    --selection, as for ndc stitch) with every weight freshly initialised.
    Test accuracy and wall time are logged after every epoch, so the
    time-to-accuracy of this route can be compared with neighbourhood
    distillation + fine-tuning (kd/<loss>-<student>/report.json).

    \b
      ndc kd --width 0.5 --data fashion-mnist --epochs 30
      ndc kd --width 0.5 --data fashion-mnist --loss ce --time-budget 600
    """
    from ndc import stages
    from ndc.finetune import TrainConfig
    from ndc.workspace import Workspace

    cfg = TrainConfig(loss=loss, epochs=epochs, lr=stages.learning_rate(lr, stages.SCRATCH_LR, data_free), batch_size=batch_size,
                      tau=tau, lam=0.0 if data_free else lam, patience=patience, time_budget=time_budget,
                      augment=not no_augment and not data_free, seed=seed)
    progress, on_epoch = epoch_progress(epochs, "kd", quiet, fmt)
    with progress:
        result = stages.kd(Workspace(workspace), cfg, width=width, spec=spec_text, selection_file=selection_file, data=data_spec,
                           limit=limit, normalize=normalize, data_free=data_free, output=output, restart=restart, device=device,
                           log=progress.log, on_epoch=on_epoch)
    payload = result.payload

    def text() -> str:
        rows = [["teacher", human(payload["teacher_params"]), f"{payload['teacher_accuracy']:.2%}"],
                [f"student ({loss}, from scratch)", human(payload["params"]), f"{payload['accuracy']:.2%}"]]
        return table(["model", "params", "accuracy"], rows, "lrr") + f"\n\n{payload['epochs']} epochs in {payload['seconds']:.0f}s"

    emit(fmt, payload, text)

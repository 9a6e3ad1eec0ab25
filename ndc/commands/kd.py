"""``ndc kd``: the end-to-end baselines, the same student architecture trained from scratch."""

from __future__ import annotations

import click

from ndc.commands.common import (common_options, data_options, emit, human, normalize_option, remembered_data,
                                 selection_options, table, user_errors)
from ndc.commands.finetune import base_config, epoch_progress, training_options
from ndc.errors import count


@click.command("kd")
@selection_options
@data_options
@normalize_option
@training_options("scratch")
@common_options
@user_errors
@remembered_data()
def command(width, spec_text, selection_file, data_spec, limit, normalize, loss, metric, optimizer, epochs, lr, batch_size, tau,
            lam, patience, time_budget, no_augment, data_free, restart, seed, output, device, compile_mode, quiet, workspace, fmt):
    """Train the student architecture from scratch end to end (the baselines).

    The student is the stitched student's architecture (--width, --spec or
    --selection, as for ndc stitch) with every weight freshly initialised,
    trained by --loss (auto: KD for classifiers, the teacher's outputs by mean
    squared error or binary cross entropy for other heads; ce: the labels
    alone). The test score (--metric) and wall time are logged after every
    epoch, so the time-to-accuracy of this route can be compared with
    neighbourhood distillation + fine-tuning (kd/<loss>-<student>/report.json).

    \b
      ndc kd --width 0.5 --data fashion-mnist --epochs 30
      ndc kd --width 0.5 --data fashion-mnist --loss ce --time-budget 600
    """
    from ndc import stages
    from ndc.workspace import Workspace

    cfg = base_config(epochs, lr, batch_size, tau, lam, patience, time_budget, no_augment, data_free, seed, compile_mode)
    progress, on_epoch = epoch_progress(epochs, "kd", quiet, fmt)
    with progress:
        result = stages.kd(Workspace(workspace), cfg, loss=loss, metric=metric, optimizer=optimizer, width=width, spec=spec_text,
                           selection_file=selection_file, data=data_spec, limit=limit, normalize=normalize, data_free=data_free,
                           output=output, restart=restart, device=device, log=progress.log, warn=progress.warn,
                           on_epoch=on_epoch)
    payload, metric = result.payload, result.metric

    def text() -> str:
        rows = [["teacher", human(payload["teacher_params"]), metric.format(payload["teacher_score"])],
                [f"student ({payload['loss']}, from scratch)", human(payload["params"]), metric.format(payload["score"])]]
        return table(["model", "params", metric.title], rows, "lrr") + f"\n\n{count(payload['epochs'], 'epoch')} in {payload['seconds']:.0f}s"

    emit(fmt, payload, text)

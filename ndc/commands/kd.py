"""``ndc kd``: the end-to-end baselines, the same student architecture trained from scratch."""

from __future__ import annotations

import click

from ndc.commands.common import (common_options, data_options, emit, human, normalize_option, resolve_selection,
                                 selection_options, table, user_errors)
from ndc.commands.finetune import (learning_rate, open_training_data, progress_log, score_keys, training_options,
                                   training_setup)


SCRATCH_LR = 0.1  # SGD from scratch, the usual rate for CIFAR ResNets


@click.command("kd")
@selection_options
@data_options
@normalize_option
@training_options(lr_default=SCRATCH_LR)
@common_options
@user_errors
def command(width, spec_text, selection_file, data_spec, limit, normalize, loss, metric, epochs, lr, batch_size, tau, lam,
            patience, time_budget, no_augment, data_free, restart, seed, output, workspace, fmt):
    """Train the student architecture from scratch end to end (the baselines).

    The student is the stitched student's architecture (--width, --spec or
    --selection, as for ndc stitch) with every weight freshly initialised,
    trained by --loss (auto: KD for classifiers, the teacher's outputs by mean
    squared error or binary cross entropy for other heads; ce: the labels
    alone). The test score (--metric) and wall time are logged after every
    epoch, so the time-to-accuracy of this route can be compared with
    neighbourhood distillation + fine-tuning (kd/<loss>-<student>/checkpoint.json).

    \b
      ndc kd --width 0.5 --data fashion-mnist --epochs 30
      ndc kd --width 0.5 --data fashion-mnist --loss ce --time-budget 600
    """
    from ndc.finetune import TrainConfig, epoch_score, train
    from ndc.metrics import count_params
    from ndc.plan import load_teacher
    from ndc.stitch import describe_selection, fresh_student, save_student
    from ndc.workspace import Workspace
    from ndc.distill.config import safe_name

    if output:
        from ndc.passes.export import check_output_path

        check_output_path(output)
    ws = Workspace(workspace)
    teacher = load_teacher(ws)
    plan = teacher.plan
    selection = resolve_selection(ws, plan, width, spec_text, selection_file)
    model = fresh_student(teacher, selection, seed)
    data = open_training_data(ws, plan, data_spec, limit, data_free, normalize)
    setup = training_setup(teacher, getattr(data, "real", data), loss, metric, lam, data_free)
    cfg = TrainConfig(epochs=epochs, lr=learning_rate(lr, SCRATCH_LR, data_free), batch_size=batch_size, tau=tau,
                      lam=0.0 if data_free else lam, patience=patience, time_budget=time_budget,
                      augment=not no_augment and not data_free, seed=seed, **setup)
    loss, metric = cfg.loss, cfg.metric
    label = describe_selection(selection)
    folder = f"kd/{loss}{'-noise' if data_free else ''}-{safe_name(label)[:60]}"
    needs_teacher = cfg.loss_fn().needs_teacher or metric.needs_teacher
    result = train(model, data, cfg, teacher=teacher.gm if needs_teacher else None, ws=ws, folder=folder,
                   log=progress_log(metric), resume=not restart)
    save_student(ws, model, selection, {}, {"baseline": loss, "data_free": data_free}, folder=folder)
    teacher_score = epoch_score(teacher.gm, data, metric, teacher.gm)
    payload = {"loss": loss, "student": label, "params": count_params(model),
               **score_keys(metric, score=result["best_accuracy"], teacher_score=teacher_score),
               "epochs": result["epochs"], "best_epoch": result["best_epoch"],
               "seconds": result["seconds"], "history": result["history"], "folder": folder, "lr": cfg.lr}
    if output:
        from ndc.passes.export import export_model

        payload["export"] = export_model(model, output, plan.input_shape, report_dir=ws.path(f"{folder}/export-failure"))
        payload["output"] = payload["export"]["output"]
    ws.write_json(f"{folder}/report.json", payload)

    def text() -> str:
        rows = [["teacher", human(plan.teacher["params"]), metric.format(teacher_score)],
                [f"student ({loss}, from scratch)", human(payload["params"]), metric.format(result["best_accuracy"])]]
        return table(["model", "params", metric.title], rows, "lrr") + f"\n\n{result['epochs']} epochs in {result['seconds']:.0f}s"

    emit(fmt, payload, text)

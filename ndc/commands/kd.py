"""``ndc kd``: the end-to-end baselines, the same student architecture trained from scratch."""

from __future__ import annotations

import click

from ndc.commands.common import (common_options, data_options, emit, human, normalize_option, resolve_selection,
                                 selection_options, table, user_errors)
from ndc.commands.finetune import learning_rate, open_training_data, progress_log, training_options


SCRATCH_LR = 0.1  # SGD from scratch, the usual rate for CIFAR ResNets


@click.command("kd")
@selection_options
@data_options
@normalize_option
@click.option("--loss", type=click.Choice(["kd", "ce"]), default="kd", show_default=True,
              help="Knowledge distillation from the teacher, or cross entropy with the labels alone.")
@training_options(lr_default=SCRATCH_LR)
@common_options
@user_errors
def command(width, spec_text, selection_file, data_spec, limit, normalize, loss, epochs, lr, batch_size, tau, lam, patience, time_budget,
            no_augment, data_free, restart, seed, output, workspace, fmt):
    """Train the student architecture from scratch end to end (the baselines).

    The student is the stitched student's architecture (--width, --spec or
    --selection, as for ndc stitch) with every weight freshly initialised.
    Test accuracy and wall time are logged after every epoch, so the
    time-to-accuracy of this route can be compared with neighbourhood
    distillation + fine-tuning (kd/<loss>-<student>/checkpoint.json).

    \b
      ndc kd --width 0.5 --data fashion-mnist --epochs 30
      ndc kd --width 0.5 --data fashion-mnist --loss ce --time-budget 600
    """
    from ndc.finetune import TrainConfig, accuracy, train
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
    cfg = TrainConfig(loss=loss, epochs=epochs, lr=learning_rate(lr, SCRATCH_LR, data_free), batch_size=batch_size, tau=tau,
                      lam=0.0 if data_free else lam, patience=patience, time_budget=time_budget,
                      augment=not no_augment and not data_free, seed=seed)
    label = describe_selection(selection)
    folder = f"kd/{loss}{'-noise' if data_free else ''}-{safe_name(label)[:60]}"
    result = train(model, data, cfg, teacher=teacher.gm if loss == "kd" else None, ws=ws, folder=folder,
                   log=progress_log(fmt), resume=not restart)
    save_student(ws, model, selection, {}, {"baseline": loss, "data_free": data_free}, folder=folder)
    teacher_acc = accuracy(teacher.gm, data)
    payload = {"loss": loss, "student": label, "params": count_params(model), "accuracy": result["best_accuracy"],
               "teacher_accuracy": teacher_acc, "epochs": result["epochs"], "best_epoch": result["best_epoch"],
               "seconds": result["seconds"], "history": result["history"], "folder": folder, "lr": cfg.lr}
    if output:
        from ndc.passes.export import export_model

        payload["export"] = export_model(model, output, plan.input_shape, report_dir=ws.path(f"{folder}/export-failure"),
                                         inputs=plan.inputs)
        payload["output"] = payload["export"]["output"]
    ws.write_json(f"{folder}/report.json", payload)

    def text() -> str:
        rows = [["teacher", human(plan.teacher["params"]), f"{teacher_acc:.2%}"],
                [f"student ({loss}, from scratch)", human(payload["params"]), f"{result['best_accuracy']:.2%}"]]
        return table(["model", "params", "accuracy"], rows, "lrr") + f"\n\n{result['epochs']} epochs in {result['seconds']:.0f}s"

    emit(fmt, payload, text)

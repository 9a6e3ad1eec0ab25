"""``ndc eval [MODEL]``: a model's score on a data set, and its agreement with the workspace's teacher."""

from __future__ import annotations

from pathlib import Path

import click

from ndc.commands.common import (common_options, data_options, device_option, emit, given, metric_option, normalize_option,
                                 pick_metric, remembered_data, table, teacher_head, user_errors, warn)
from ndc.errors import NdcError, fmt_shape


@click.command("eval")
@click.argument("model", metavar="[MODEL]", required=False)
@data_options
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Examples per forward pass.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow unpickling a .pt MODEL (a pickled module can run code when loaded).")
@device_option
@metric_option()
@normalize_option
@common_options
@user_errors
@remembered_data()
def command(model, data_spec, limit, batch_size, trust_pickle, device, metric, normalize, workspace, fmt):
    """Score of MODEL on the test split of --data (accuracy by default), and its agreement with the teacher.

    MODEL is an exported .onnx or .pt2 file, a .pt (pickled, needs
    --trust-pickle) or a workspace directory. Without MODEL, the workspace
    -w is evaluated: its stitched student against its teacher, or the teacher
    alone before `ndc stitch` has run. For a MODEL file, agreement is measured
    against the teacher of the workspace -w when it has a plan; otherwise only
    accuracy is reported. A regression head is scored by R² against its
    targets. --metric scores by another measure (top-5, rmse, output-error
    against the teacher, your own function); the teacher's own score is
    reported beside it when the metric uses the labels.

    \b
      ndc eval --data fashion-mnist
      ndc eval student.onnx --data fashion-mnist -w ndc-work
      ndc eval student.pt2 --data digits --limit 200 --format json
    """
    from ndc.stages import one_device
    from ndc.workspace import PLAN, Workspace

    device = one_device(device)

    if not data_spec:
        raise NdcError("ndc eval needs --data SPEC" + _data_example(model, workspace, trust_pickle))
    if trust_pickle and (model is None or Path(model).suffix.lower() not in (".pt", ".pth", ".pt2")):
        warn("--trust-pickle lets ndc unpickle a .pt or .pt2 MODEL; there is none here; ignored")
    workspace_given = given("workspace")

    if model is None or Path(model).is_dir():
        ws = Workspace(model if model is not None else workspace)
        if not ws.root.is_dir():
            raise NdcError(f"no workspace at {ws.root}; run `ndc partition MODEL -w {ws.root}` first, or give a MODEL file")
        with ws.reading():
            payload = _evaluate_workspace(ws, data_spec, limit, normalize, batch_size, device, metric)
    else:
        ws = Workspace(workspace)
        has_plan = ws.exists(PLAN)
        if workspace_given and not has_plan:
            warn(f"no plan in workspace {ws.root}: reporting accuracy only (no teacher to compare with)")
        payload = _evaluate_file(model, ws if has_plan else None, data_spec, limit, normalize, batch_size, device,
                                 trust_pickle, metric)
    for message in (payload.pop("shape_doubt", None), payload.get("note"), payload.pop("doubt", None)):
        if message:
            warn(message)
    emit(fmt, payload, lambda: _text(payload))


# ------------------------------------------------------------------ workspace


def _evaluate_workspace(ws, data_spec, limit, normalize, batch_size, device, metric) -> dict:
    from ndc.data import open_data
    from ndc.evaluate import evaluate
    from ndc.plan import load_teacher
    from ndc.stitch import latest_student, load_student, selection_phrase, student_document

    teacher = load_teacher(ws)
    data = open_data(data_spec, teacher.plan.input_shape[1:], limit=limit, workspace=ws, normalize=normalize)
    metric = pick_metric(metric, data, teacher_head(teacher), labels_must_fit=True)
    folder = latest_student(ws, teacher)
    if folder is None:
        reference = teacher.gm if metric.needs_teacher else None  # the teacher against itself, trivially
        result = evaluate(teacher.gm, data, metric=metric, teacher=reference, batch_size=batch_size, device=device)
        stale = ws.exists("student/student.json")
        note = ("the stitched student in the workspace was made from another teacher or partition, or is unreadable "
                "(rerun ndc stitch); evaluated the teacher only" if stale else
                "no stitched student in the workspace yet (run ndc stitch); evaluated the teacher only")
        return _payload("teacher", "teacher", metric, {**result, "agreement": None}, data, ws, note, teacher.plan)
    student = load_student(ws, folder, teacher=teacher)
    result = evaluate(student, data, metric=metric, teacher=teacher.gm, batch_size=batch_size, device=device)
    doc = student_document(ws, folder)
    kept = folder == "finetune" and (doc.get("finetuned") or {}).get("best_epoch") == 0  # no epoch beat it
    label = "fine-tuned student" if folder == "finetune" and not kept else "stitched student"
    spec = selection_phrase(doc["selection"]) + ("; ndc finetune kept it: no epoch beat it" if kept else "")
    return {**_payload("student", label, metric, result, data, ws, None, teacher.plan), "selection": spec}


# ----------------------------------------------------------------------- file


def _evaluate_file(model, ws, data_spec, limit, normalize, batch_size, device, trust_pickle, metric) -> dict:
    from ndc.data import open_data
    from ndc.evaluate import evaluate, file_inputs, load_for_eval
    from ndc.heads import head_of
    from ndc.scoring import runner

    predictor = load_for_eval(model, trust_pickle=trust_pickle)
    teacher = inputs = None
    if ws is not None:
        from ndc.plan import load_teacher

        teacher = load_teacher(ws)  # its plan's input spec checks the data (token ids below its vocabulary)
    else:
        inputs = file_inputs(predictor)  # the file's own: token ids below the vocabulary of its embedding
    shape = _input_shape(predictor, teacher, model, inputs)
    data = open_data(data_spec, shape, limit=limit, workspace=ws, normalize=normalize, inputs=inputs)
    if teacher is not None:
        head = teacher_head(teacher)
    else:
        vocabulary = getattr(getattr(predictor.module, "config", None), "vocab_size", None)
        if data.kind == "tokens" and inputs is None and isinstance(vocabulary, int):
            data.check_vocabulary(vocabulary)  # a pickled Hugging Face model
        with runner(predictor, device, str(model), data.name) as run:
            head = head_of(predictor, run(next(data.batches("test", 2))[0]).shape)
        if data.kind == "tokens" and inputs is None and getattr(data, "next_tokens", False) and len(head.shape) == 2:
            data.check_vocabulary(head.shape[-1])  # vocabulary unknown: a language model predicts every id it reads
    metric = pick_metric(metric, data, head, labels_must_fit=True,
                         without_teacher="" if teacher else f"pass -w with the workspace {model} was made from")
    if teacher is not None and metric.kind != "function" and predictor.sigmoid_output != head.sigmoid:
        predictor = _as_teacher_outputs(predictor, head.sigmoid)
    result = evaluate(predictor, data, metric=metric, teacher=teacher.gm if teacher is not None else None,
                      batch_size=batch_size, device=device)
    return _payload("model", str(model), metric, result, data, ws, None, teacher.plan if teacher is not None else None)


def _as_teacher_outputs(predictor, probabilities: bool):
    """``predictor`` with outputs as the teacher's are: a file that ends in a sigmoid scored against a teacher giving
    logits has its probabilities turned back into logits, and the other way round, so that one threshold (and the
    output error) fits both. A user's metric sees the file's own outputs."""
    import torch

    def run(x):
        out = predictor(x).float()
        return torch.sigmoid(out) if probabilities else torch.logit(out.clamp(1e-7, 1 - 1e-7))

    return run


def _input_shape(predictor, teacher, model: str, inputs=None) -> tuple[int, ...] | None:
    """The per-example input shape: the file's own, checked against the teacher's; else the teacher's; else, for a
    model reading token ids, None (the data's sequence length); else guessed."""
    teacher_shape = tuple(teacher.plan.input_shape[1:]) if teacher is not None else None
    own = predictor.input_shape
    if own is not None and teacher_shape is not None and own != teacher_shape:
        raise NdcError(f"{model} takes inputs of shape {fmt_shape(own)} but the workspace's teacher takes {fmt_shape(teacher_shape)}; "
                       "pass -w with the workspace this model was made from")
    shape = own or teacher_shape
    if shape is None and inputs is not None and inputs.is_integer:
        return None
    if shape is None:
        from ndc.load import guess_input_shape

        guessed = guess_input_shape(predictor.module) if predictor.module is not None else None
        if guessed is None:
            raise NdcError(f"cannot tell the input shape of {model}; pass -w with the workspace it was made from")
        shape = tuple(guessed[1:])
        warn(f"{model} does not record its input shape; using {fmt_shape(shape)} from its first layer")
    return shape


# ----------------------------------------------------------- what a model reads

def _data_example(model, workspace, trust_pickle: bool) -> str:
    """How to finish "needs --data SPEC": token data for a model reading token ids, else images."""
    from ndc.tokens import data_example, reads_token_ids
    from ndc.workspace import Workspace

    integer = reads_token_ids(Workspace(model if model is not None and Path(model).is_dir() else workspace))
    try:
        if integer is None and model is not None and Path(model).is_file():
            from ndc.evaluate import file_inputs, load_for_eval

            spec = file_inputs(load_for_eval(model, trust_pickle=trust_pickle))
            integer = spec is not None and spec.is_integer
    except (NdcError, OSError):
        pass  # the missing --data is the error to report
    return ("; " if integer else ", ") + data_example(integer)


# --------------------------------------------------------------------- output


def _payload(evaluated: str, label: str, metric, result: dict, data, ws, note, plan=None) -> dict:
    """The JSON of ``ndc eval``; ``accuracy`` and ``teacher_accuracy`` are the scores when the metric is accuracy."""
    from ndc.scoring import teacher_doubt
    from ndc.stages import shape_doubt

    accuracy = metric.kind == "accuracy"
    teacher_score = result["score"] if evaluated == "teacher" else result.get("teacher_score")
    return {
        "accuracy": result["score"] if accuracy else None,
        "teacher_accuracy": teacher_score if accuracy else None,
        "agreement": result.get("agreement"),
        "examples": result["examples"],
        "metric": metric.name,
        "score": result["score"],
        "teacher_score": teacher_score,
        "higher_is_better": metric.higher_is_better,
        "evaluated": evaluated,
        "model": label,
        "selection": None,  # a workspace student's specs ("width=0.5"), set by the caller
        "data": data.name,
        "split": "test",
        "split_source": data.split,
        "classes": data.classes,
        "labels": data.labels,
        "workspace": str(ws.root) if ws is not None else None,
        "note": note,
        "doubt": teacher_doubt(metric, teacher_score, data),  # warned, not part of the JSON
        "shape_doubt": shape_doubt(plan, data) if plan is not None else None,  # warned, not part of the JSON
    }


def _text(p: dict) -> str:
    from ndc.scoring import Metric

    metric = Metric(p["metric"])
    rows = []
    if p["evaluated"] == "teacher":
        rows.append(["teacher", metric.format(p["score"]), ""])
    else:
        if p["teacher_score"] is not None:
            rows.append(["teacher", metric.format(p["teacher_score"]), ""])
        agreement = "" if p["agreement"] is None else f"{100 * p['agreement']:.2f}%"
        name = f"{p['model']} ({p['selection']})" if p.get("selection") else p["model"]
        rows.append([name, metric.format(p["score"]), agreement])
    agreed = metric.kind != "agreement" and not all(row[2] == "" for row in rows)  # (the score is it, or none was measured)
    if not agreed:
        rows = [row[:2] for row in rows]
    headers = ["model", metric.title] + (["agreement with teacher"] if agreed else [])
    out = table(headers, rows, "lrr")
    return f"{out}\n\n{p['examples']} test examples of {p['data']} ({p['split_source']})"

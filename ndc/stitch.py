"""stitch: recombine the selected students with the teacher's kept neighbourhoods into one model.

Invariant: ``stitch(teacher, {})`` computes exactly what the teacher computes,
and so does a selection of ``width=1.0`` students that were never changed;
every student is rebuilt from its spec and rewrite record and then gets its
trained weights (safetensors) -- nothing is unpickled.

The result is one flat ``torch.fx.GraphModule``: each neighbourhood's graph
is inlined in order, and modules keep the teacher's qualified names
(``layer1.0.conv1``), so state dicts, exported ONNX graphs and error messages
read like the teacher's.

A stitched student is stored in the workspace as ``student/student.json``
(the selection, each candidate's record, calibration) and
``student/weights.safetensors``; :func:`load_student` rebuilds it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from ndc.distill.config import made_for
from ndc.distill.store import STUDENT, WEIGHTS, JobStore
from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.load import check_and_load_state_dict
from ndc.workspace import Workspace, read_json, sha256_file

STUDENT_DIR = "student"
SELECTION = "selection.json"


# ------------------------------------------------------------------- selection


def uniform_selection(plan, spec: Spec) -> dict[str, Spec]:
    """The same spec for every neighbourhood that is not kept."""
    return {nb.name: spec for nb in plan.trainable}


def read_selection(path: str | Path, plan) -> dict[str, Spec]:
    """A selection file: ``{"selection": {name: spec}}`` (as ``ndc search`` writes it) or a plain ``{name: spec}``;
    ``"teacher"`` for a spec keeps the teacher's part."""
    path = Path(path)
    doc = read_json(path)
    mapping = doc.get("selection", doc) if isinstance(doc, dict) else None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise NdcError(f"{path}: expected a JSON object mapping neighbourhood names to specs")
    selection = {}
    for name, text in mapping.items():
        nb = plan[name]  # unknown names are one clear error
        if text == "teacher":
            continue  # the teacher's own part (as search's pareto.csv writes it): a neighbourhood not selected keeps it
        if nb.kept:
            raise NdcError(f"{path}: neighbourhood {name} is kept with the teacher and has no students")
        selection[name] = Spec.parse(text)
    return selection


def trained_specs(ws: Workspace, plan) -> dict[str, list[Spec]]:
    """Specs with a finished student, per neighbourhood of the plan."""
    names = set(plan.names)
    return {k: v for k, v in JobStore(ws).trained().items() if k in names}


def resolve_selection(ws: Workspace, plan, width: float | None = None, spec_text: str | None = None,
                      selection_file: str | None = None, teacher=None) -> dict[str, Spec]:
    """The student per neighbourhood from one of ``--width``, ``--spec``, ``--selection`` (else :func:`default_selection`)."""
    given = [x is not None for x in (width, spec_text, selection_file)]
    if sum(given) > 1:
        raise NdcError("give one of --width, --spec and --selection")
    if width is not None:
        return uniform_selection(plan, Spec(width=width))
    if spec_text is not None:
        return uniform_selection(plan, Spec.parse(spec_text))
    if selection_file is not None:
        return read_selection(selection_file, plan)
    return default_selection(ws, plan, teacher)


def default_selection(ws: Workspace, plan, teacher=None) -> dict[str, Spec]:
    """``selection.json`` from ``ndc search`` if present, else the one spec every neighbourhood was trained with.

    A selection search made for another teacher or partition (its ``made_for``
    differs from ``teacher``'s now), or among students trained again since
    (a chosen student's weights differ from those it recorded), is refused:
    its choice was measured on other neighbourhoods or students."""
    if ws.exists(SELECTION):
        doc = read_json(ws.path(SELECTION))
        recorded = doc.get("made_for") if isinstance(doc, dict) and teacher is not None else None
        if isinstance(recorded, dict) and any(recorded.get(nb.name) != made_for_now(teacher, nb.name) for nb in plan.trainable):
            raise NdcError(f"{ws.path(SELECTION)} was chosen by ndc search for another teacher or partition; rerun ndc "
                           "search, or pass --width, --spec or --selection")
        selection = read_selection(ws.path(SELECTION), plan)
        store = JobStore(ws)
        retrained = [name for name, sha in (doc.get("weights") or {}).items()
                     if name in selection and store.weights_sha(name, selection[name]) != sha]
        if retrained:
            raise NdcError(f"{ws.path(SELECTION)} was chosen by ndc search before the students of "
                           f"{', '.join(retrained)} were trained again; rerun ndc search, or pass --width, --spec or "
                           "--selection")
        return selection
    trained = trained_specs(ws, plan)
    common = None
    for nb in plan.trainable:
        specs = set(trained.get(nb.name, []))
        common = specs if common is None else common & specs
    if common and len(common) == 1:
        return uniform_selection(plan, next(iter(common)))
    if not trained:
        raise NdcError("no trained students in the workspace; run ndc distill first (or pass --width 1.0 to stitch the teacher)")
    options = ", ".join(str(s) for s in sorted(common or set())) or "none shared by every neighbourhood"
    raise NdcError(f"which students? pass --width K, --spec SPEC or --selection FILE (specs trained everywhere: {options})")


# -------------------------------------------------------------------- students


def load_candidate(ws: Workspace, teacher, name: str, spec: Spec) -> tuple[nn.Module, dict]:
    """The trained student for (name, spec), rebuilt from its record with its weights; identity specs fall back to the teacher."""
    from ndc.passes.rewrite import rebuild_student

    store = JobStore(ws)
    if store.metrics(name, spec) is None and spec.is_identity:
        return teacher.part(name), {"teacher": True}
    record, state, metrics = store.load(name, spec, made_for_now(teacher, name))
    module = rebuild_student(teacher.part(name), spec, record)
    check_and_load_state_dict(module, state, str(ws.path(f"{store.folder(name, spec)}/{WEIGHTS}")))
    return module.eval(), {"record": record, "key": metrics["key"], "weights_sha256": metrics["weights_sha256"],
                           "final_error": metrics.get("final_error")}


def made_for_now(teacher, name: str) -> str:
    """What a student of neighbourhood ``name`` must have been distilled from to fit this teacher now."""
    return made_for(teacher.sha256, teacher.plan[name].to_json())


def stitch(teacher, replacements: dict[str, nn.Module]) -> fx.GraphModule:
    """One GraphModule: the teacher's neighbourhoods in order, each replaced by ``replacements[name]`` if given."""
    graph = fx.Graph()
    plan = teacher.plan
    current = graph.placeholder(plan.neighbourhoods[0].input)
    owners: dict[str, object] = {}
    for nb in plan.neighbourhoods:
        part = replacements.get(nb.name)
        if part is None:
            part = teacher.part(nb.name)
        if not isinstance(part, fx.GraphModule):
            raise NdcError(f"the replacement for {nb.name} is not a torch.fx GraphModule")
        for node in part.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                target = str(node.target)
                obj = part.get_submodule(target) if node.op == "call_module" else _get_attr(part, target)
                if target in owners and owners[target] is not obj and not _same_constant(owners[target], obj):
                    raise NdcError(f"neighbourhoods {nb.name} and another both own {target}; stitching shared modules is not supported")
                owners[target] = obj
        placeholder = next(n for n in part.graph.nodes if n.op == "placeholder")
        val_map = {placeholder: current}
        current = graph.graph_copy(part.graph, val_map)
    graph.output(current)
    graph.lint()
    student = fx.GraphModule(owners, graph, class_name="Student")
    return student.eval()


def _same_constant(a, b) -> bool:
    """Equal copies of one tensor that several neighbourhoods read: a buffer they recompute from (rotary
    frequencies, position ids), or a tied weight (GPT-2's embedding and head, both kept with the teacher).
    The stitched model keeps one copy, so the tie survives."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and torch.equal(a, b))


def _get_attr(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def build_student(ws: Workspace, teacher, selection: dict[str, Spec]) -> tuple[fx.GraphModule, dict]:
    """Stitch the trained students of ``selection``; returns the model and what it was made from."""
    replacements, made_from = {}, {}
    for name, spec in selection.items():
        module, info = load_candidate(ws, teacher, name, spec)
        replacements[name] = module
        made_from[name] = {"spec": str(spec), **info}
    return stitch(teacher, replacements), made_from


def fresh_student(teacher, selection: dict[str, Spec], seed: int = 0, ws: Workspace | None = None) -> fx.GraphModule:
    """The same student architecture with every parameter freshly initialised (the end-to-end baselines).

    A gated spec's widths were learned: its architecture comes from the trained candidate's record in ``ws``.
    """
    from ndc.passes.rewrite import make_student, rebuild_student

    torch.manual_seed(seed)
    parts = {}
    for name, spec in selection.items():
        if spec.gates is None:
            parts[name] = make_student(teacher.part(name), spec, init="random", seed=seed).module
        elif ws is None:
            raise NdcError(f"{name} {spec}: a gated student's widths were learned; its architecture needs the workspace")
        else:
            record = JobStore(ws).load(name, spec, made_for_now(teacher, name))[0]
            parts[name] = rebuild_student(teacher.part(name), spec, record)
    student = stitch(teacher, parts)
    reset_parameters(student, seed)
    return student.requires_grad_(True).train()


def reset_parameters(module: nn.Module, seed: int = 0) -> None:
    from ndc.passes.rewrite.width import reset_plain_parameters

    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    reset_plain_parameters(module)  # an exported graph's parameters sit in plain containers


# ------------------------------------------------------------- calibration


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data, batches: int, batch_size: int = 128) -> int:
    """Re-estimate every batch norm's running statistics on ``batches`` training batches; returns how many layers.

    The stitched student's batch norms saw their neighbourhood's inputs during
    distillation, not the inputs the students before them now produce; a few
    batches through the whole student put them right. Other layers stay in
    eval mode, and nothing else changes.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return 0
    was = model.training
    model.eval()
    momenta = {}
    for m in norms:
        momenta[m] = m.momentum
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.train()
    seen = 0
    device = next(iter(model.parameters()), torch.empty(0)).device
    for x, _ in data.batches("train", batch_size, shuffle=True, seed=12345):
        model(x.to(device))
        seen += 1
        if seen >= batches:
            break
    for m in norms:
        m.momentum = momenta[m]
        m.eval()
    model.train(was)
    return len(norms)


# ----------------------------------------------------------------- workspace


def save_student(ws: Workspace, model: fx.GraphModule, selection: dict[str, Spec], made_from: dict, extra: dict,
                 folder: str = STUDENT_DIR) -> None:
    """Write the stitched student into the workspace: weights, then the JSON that rebuilds it."""
    ws.save_tensors(f"{folder}/{WEIGHTS}", model.state_dict())
    doc = {
        "selection": {k: str(v) for k, v in selection.items()},
        "candidates": made_from,
        "weights_sha256": sha256_file(ws.path(f"{folder}/{WEIGHTS}")),
        **extra,
    }
    ws.write_json(f"{folder}/{STUDENT}", doc)


def student_document(ws: Workspace, folder: str = STUDENT_DIR) -> dict:
    """The ``student.json`` of a saved student (selection, records, weights hash, what made it)."""
    path = ws.path(f"{folder}/{STUDENT}")
    if not path.is_file():
        raise NdcError(f"no stitched student in {ws.root}; run ndc stitch first")
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("selection"), dict):
        raise NdcError(f"{path} is not a student description; rerun ndc stitch")
    return doc


def load_student(ws: Workspace, folder: str = STUDENT_DIR, teacher=None) -> fx.GraphModule:
    """Rebuild a stitched (or fine-tuned) student saved in the workspace; one made from another teacher is refused."""
    from ndc.passes.rewrite import rebuild_student
    from ndc.plan import load_teacher

    doc = student_document(ws, folder)
    path = ws.path(f"{folder}/{STUDENT}")
    weights = ws.path(f"{folder}/{WEIGHTS}")
    if not weights.is_file() or sha256_file(weights) != doc.get("weights_sha256"):
        raise NdcError(f"{weights} is missing or does not match {path}; rerun ndc stitch")
    teacher = teacher or load_teacher(ws)
    if doc.get("teacher", teacher.identity) != teacher.identity:
        raise NdcError(f"the student in {ws.path(folder)} was made from another teacher than the workspace's plan; rerun ndc stitch")
    replacements = {}
    for name, text in doc["selection"].items():
        info = doc["candidates"].get(name, {})
        if info.get("teacher"):
            continue
        replacements[name] = rebuild_student(teacher.part(name), Spec.parse(text), info["record"])
    model = stitch(teacher, replacements)
    check_and_load_state_dict(model, ws.load_tensors(f"{folder}/{WEIGHTS}"), str(weights))
    return model.eval()


def latest_student(ws: Workspace, teacher=None) -> str | None:
    """The folder of the workspace's current student: ``finetune`` when it fine-tuned the current ``student``, else ``student``.

    A fine-tuned student of an earlier stitch (or teacher) is never presented
    as the workspace's student.
    """
    current = {}
    for folder in (STUDENT_DIR, "finetune"):
        try:
            current[folder] = student_document(ws, folder)
        except NdcError:
            pass
    stitched = current.get(STUDENT_DIR)
    sha = teacher.identity if teacher is not None else (stitched or {}).get("teacher")
    if stitched is None or stitched.get("teacher", sha) != sha:
        return None
    tuned = current.get("finetune")
    if tuned is not None and tuned.get("from_student") == stitched.get("weights_sha256") and tuned.get("teacher", sha) == sha:
        return "finetune"
    return STUDENT_DIR


def describe_selection(selection: dict[str, Spec]) -> str:
    specs = sorted({str(s) for s in selection.values()})
    return specs[0] if len(specs) == 1 else json.dumps({k: str(v) for k, v in selection.items()})


def selection_phrase(selection: dict) -> str:
    """A stitched student's selection in a few words, to show: its one spec (``width=0.5``), or each spec with its
    count (:func:`describe_selection` names every neighbourhood's instead: it is part of a kd folder's name)."""
    from collections import Counter

    counts = Counter(str(spec) for spec in selection.values())
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{n}x {spec}" for spec, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def copy_module(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)

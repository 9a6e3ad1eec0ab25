"""The pipeline, one function per stage: what the commands, ``ndc demo`` and the Python API all call.

Every stage takes the workspace, holds its lock while it writes (a second
writer gets one line naming the holder), does its work through the library,
and returns a small result object; commands only parse options, call a stage
and print. Read top to bottom, this is ndc::

    ws = Workspace("ndc-work")
    distilled = distill(ws, [Spec(width=0.5)], DistillConfig(data="fashion-mnist"))
    stitched  = stitch(ws, "student.onnx", data="fashion-mnist")
    tuned     = finetune(ws, TrainConfig(epochs=5), data="fashion-mnist", output="student.onnx")
    baseline  = kd(ws, TrainConfig(lr=0.1, epochs=30), width=0.5, data="fashion-mnist")

(``ndc partition`` writes the plan first; see :mod:`ndc.plan`.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ndc.distill import (DEFAULT_CACHE_BUDGET, DistillConfig, cache_layout, cache_on_disk, choose_source, plan_candidates,
                         run_distill)
from ndc.distill.store import JobStore
from ndc.errors import NdcError, count
from ndc.finetune import TrainConfig
from ndc.ir import Spec
from ndc.training import DEFAULT_LR, choose_optimizer
from ndc.workspace import PLAN, Workspace

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


def one_device(device: str) -> str:
    """``cpu``, or the GPU a single-device stage runs on (``cuda`` is the first visible one); one line if there is none."""
    from ndc.backends.base import resolve_devices

    return resolve_devices(device)[0]


# ------------------------------------------------------------------- the data distill used

DATA_OPTIONS = "data.json"


@dataclass(frozen=True)
class DataOptions:
    """``--data``, ``--limit`` and ``--normalize`` as ``ndc distill`` last used them in a workspace (``data.json``):
    the later stages' data when they are given no ``--data``."""

    data: str
    limit: int | None = None
    normalize: Any = True  # ndc.data.open_data(normalize=...): True (statistics), False (none) or (mean, std)

    @property
    def flags(self) -> str:
        """The options as they would be typed."""
        out = f"--data {self.data}" + (f" --limit {self.limit}" if self.limit is not None else "")
        if self.normalize is False:
            out += " --normalize none"
        elif self.normalize is not True:
            mean, std = self.normalize
            out += f" --normalize {','.join(map(format, mean))}/{','.join(map(format, std))}"
        return out


def remember_data(ws: Workspace, options: DataOptions | None) -> None:
    """Keep ``options`` for the later stages, with relative paths in the spec made absolute (a later stage may run
    from another folder); None (a run on noise alone) forgets any earlier data."""
    if options is None:
        ws.path(DATA_OPTIONS).unlink(missing_ok=True)
        return
    ws.write_json(DATA_OPTIONS, {"data": absolute_spec(options.data), "limit": options.limit,
                                 "normalize": options.normalize})


def shape_doubt(plan, data) -> str | None:
    """What to say when ndc partition guessed the teacher's input size and ``data``'s examples have another one (a
    28x28 data set zero-padded to a guessed 32x32 can wreck a teacher trained on 28x28)."""
    from ndc.errors import fmt_shape

    invented, want = plan.tracer.get("guessed"), tuple(plan.input_shape[1:])
    raw = tuple(getattr(data, "raw_shape", None) or ())
    if not invented or len(raw) != len(want) or raw[1:] == want[1:]:
        return None
    given = ",".join(map(str, (1, want[0], *raw[1:])))
    return (f"ndc partition guessed the teacher's input shape {fmt_shape(want)} ({invented} is a guess), but the "
            f"examples of {data.name} are {fmt_shape(raw)}, fitted to it: if the teacher was trained on them, "
            f"partition again with --input-shape {given}")


def absolute_spec(spec: str) -> str:
    """``spec`` with each part that names an existing file or folder relative to here made absolute
    (``mine.npz``, ``imagefolder:photos``, ``my_data.py:load``); built-in names (``digits``) stay as they are."""
    import os
    import re

    parts = re.split(r"([:,])", spec)
    for i, part in enumerate(parts):
        file_like = i > 0 or "." in part or "/" in part
        if part not in (":", ",") and part and file_like and not os.path.isabs(part) and os.path.exists(part):
            parts[i] = os.path.abspath(part)
    return "".join(parts)


def remembered_data(ws: Workspace) -> DataOptions | None:
    """The data options ``ndc distill`` used in ``ws`` (None when it has used none: not run, or on noise alone)."""
    if not ws.exists(DATA_OPTIONS):
        return None
    doc = ws.read_json(DATA_OPTIONS)
    try:
        normalize = doc["normalize"]
        if not isinstance(normalize, bool):
            normalize = tuple(tuple(float(x) for x in v) for v in normalize)
        limit = doc["limit"]
        if not (isinstance(doc["data"], str) and doc["data"] and (limit is None or isinstance(limit, int))):
            raise TypeError
        return DataOptions(doc["data"], limit, normalize)
    except (KeyError, TypeError, ValueError):
        raise NdcError(f"{ws.path(DATA_OPTIONS)} is not what ndc distill writes; give --data SPEC, "
                       "or delete the file") from None


# ------------------------------------------------------------------- partition


def partition(ws: Workspace, model: str, *, input_shape: tuple[int, ...] | None = None, by: str = "auto", depth: int = 1,
              every: int | None = None, cuts: tuple[str, ...] = (), leaves: tuple[str, ...] = (), weights: str | None = None,
              trust_pickle: bool = False, frontend: str = "auto", input_dtype: str | None = None, output: str | None = None,
              warn: Log = _quiet):
    """Load MODEL, trace it, cut it into neighbourhoods and write the plan and the teacher's weights; returns
    ``(plan, traced)``. Every plan is verified before it is written (:mod:`ndc.passes.verify`). ``input_shape`` is
    a tuple or text ("1,3,32,32"); ``warn`` hears what ``ndc partition`` warns of, the plan's notes included."""
    from ndc.load import input_shape_guess, input_spec, load_model, parse_shape, random_parameters
    from ndc.passes.inputs import DTYPES
    from ndc.passes.partition import STRATEGIES
    from ndc.plan import partition_model, write_plan

    if by not in STRATEGIES:
        raise NdcError(f"unknown partition strategy {by!r}; valid strategies: {', '.join(STRATEGIES)}")
    if input_dtype is not None and input_dtype not in DTYPES:
        raise NdcError(f"unknown --input-dtype {input_dtype!r}; valid: {', '.join(DTYPES)}")
    if isinstance(input_shape, str):
        input_shape = parse_shape(input_shape)
    elif input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
    for given, option, owner in ((cuts, "--cut", ("cuts",)), (depth != 1, "--depth", ("module",)),
                                 (every is not None, "--every", ("layers", "auto"))):
        if given and by not in owner:
            warn(f"{option} is ignored with --by {by}: it goes with --by {' or --by '.join(owner)}")
    if ws.root.is_dir():
        with ws.writing("ndc partition"):  # a busy workspace is said now, not after a long trace
            pass
    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle)
    inputs = input_spec(loaded, input_dtype)
    shape, invented = input_shape or loaded.input_shape, None
    if shape is None:
        shape, invented = input_shape_guess(loaded.model)
        if shape is None:
            raise NdcError("cannot tell the model's input shape; pass --input-shape, e.g. 1,3,32,32")
        text = ",".join(map(str, shape))
        warn(f"no --input-shape given; using {text} from the model" if invented is None else
             f"no --input-shape given; guessing {text}: the channels are the first layer's, {invented} is a guess "
             f"(give --input-shape with the size the teacher was trained on)")
    plan, traced = partition_model(loaded, shape, by=by, depth=depth, every=every, cuts=tuple(cuts), leaves=tuple(leaves),
                                   frontend=frontend, inputs=inputs, output=output)
    if invented is not None:
        plan.tracer["guessed"] = invented  # later stages doubt it when the data's examples have another size
    with ws.writing("ndc partition", create=True):
        before = _reads(ws.read_json(PLAN)) if ws.exists(PLAN) else None
        write_plan(ws, plan, loaded.model)
        if before is not None and before != _reads(plan.to_json()) and ws.exists(DATA_OPTIONS):
            try:
                what = f" ({remembered_data(ws).flags})"
            except NdcError:
                what = ""
            remember_data(ws, None)
            warn(f"forgot the data ndc distill used here{what}: the new teacher reads other inputs; give --data to "
                 "the next stages")
    if weights is None and (random := random_parameters(model, loaded.model)):
        warn(f"{model} builds a model with random weights ({count(len(random), 'parameter tensor')}, e.g. {random[0]}, "
             "differ from one build to the next) and no --weights was given: the teacher is untrained; pass --weights "
             "FILE.safetensors (or load the weights in the factory)")
    for note in plan.notes:
        warn(note)
    return plan, traced


def _reads(plan_json: dict) -> tuple:
    """What a plan's teacher reads: the per-example input shape and its kind (floats, or token ids)."""
    return tuple(plan_json.get("input_shape", [])[1:]), (plan_json.get("tracer") or {}).get("input")


# --------------------------------------------------------------------- distill


@dataclass
class DistillResult:
    rows: list[dict]  # one per candidate: status done, skipped or failed, with its metrics
    source: str
    source_reason: str
    engine: str
    backend: str
    workers: int
    devices: list[str]
    seconds: float

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") == "failed"]


def resolve_engine(engine: str, devices: list[str]) -> str:
    """``auto``: fused on a GPU, where one process per tiny job is what costs; jobs on a CPU (measured: docs/benchmarks.md)."""
    if engine == "auto":
        return "fused" if devices[0].startswith("cuda") else "jobs"
    return engine


def _as_spec(spec) -> Spec:
    """A candidate as the Python API takes it: a :class:`Spec`, a width (0.5) or a spec's text ("width=0.5")."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Spec(width=float(spec))
    if isinstance(spec, str):
        return Spec.parse(spec)
    raise NdcError(f"a candidate is a Spec, a width such as 0.5 or a spec such as 'width=0.5', not a {type(spec).__name__}")


def distill(ws: Workspace, specs: list[Spec | float | str], cfg: DistillConfig, *, source: str | None = None, engine: str = "auto",
            backend: str = "local", workers: int = 1, address: str | None = None, device: str = "cpu",
            devices: str | None = None, only: tuple[str, ...] = (), force: bool = False,
            cache_budget: int = DEFAULT_CACHE_BUDGET, memory_budget: int | None = None, checkpoint_seconds: float = 60.0,
            log: Log = _quiet, warn: Log | None = None, on_start: Callable[[int, int], None] | None = None,
            on_progress: Callable[[dict], None] | None = None, on_done: Callable[[dict], None] | None = None) -> DistillResult:
    """Rewrite and train every (neighbourhood, spec) candidate not already done; see :func:`ndc.distill.run_distill`.

    ``source`` None chooses: noise without data, else the activation cache when
    it fits ``cache_budget`` and the disk, else recomputation. ``engine``
    ``auto`` picks by device (:func:`resolve_engine`); ``devices`` ("0,2")
    picks GPUs, every visible one by default.
    """
    from ndc.backends import make_backend
    from ndc.backends.base import resolve_devices
    from ndc.distill.engine import data_for
    from ndc.plan import load_teacher

    specs = [_as_spec(s) for s in specs]
    if cfg.data is not None and not isinstance(cfg.data, str):
        raise NdcError(f"data is a data spec such as 'fashion-mnist', 'data.npz' or 'my_data.py:load', not a "
                       f"{type(cfg.data).__name__}: put arrays in an .npz or return them from a my_data.py:load function "
                       "(docs/data.md)")
    placed = resolve_devices(device, devices)
    engine = resolve_engine(engine, placed)
    if cfg.data:  # a file named relatively or not is one file, for the job keys and for workers elsewhere
        cfg = replace(cfg, data=absolute_spec(cfg.data))
    with ws.writing("ndc distill") as fence:
        teacher = load_teacher(ws)
        plan = teacher.plan
        if not plan_candidates(plan, specs, only):
            raise NdcError("the plan has no neighbourhood to distil (all are kept); try ndc partition --by module or --by layers")
        data = data_for(ws, cfg, plan.input_shape[1:], fresh=True) if cfg.data else None
        if data is not None and (doubt := shape_doubt(plan, data)) and warn is not None:
            warn(doubt)
        options = DataOptions(cfg.data, cfg.limit, cfg.normalize) if data is not None else None
        remembered = False

        def published(metrics: dict) -> None:  # the later stages take this run's data once a student comes of it
            nonlocal remembered
            if not remembered and metrics.get("status") == "done":
                remember_data(ws, options)
                remembered = True
            if on_done is not None:
                on_done(metrics)

        chosen, why = choose_source(cfg, source, data, cache_layout(plan, cfg.lookahead), ws, cache_budget,
                                    on_disk=data is not None and cache_on_disk(ws, teacher, cfg, data))
        if source is None:
            log(f"source: {chosen} ({why})")
        cfg = replace(cfg, source=chosen, engine=engine, device=placed[0])
        if engine == "fused" and workers == 1:
            workers = len(placed)  # one process per GPU
        runner = make_backend(backend, workers, address, placed)
        started = time.perf_counter()
        rows = run_distill(ws, specs, cfg, runner, teacher=teacher, only=only, force=force, log=log, warn=warn, on_start=on_start,
                           on_progress=on_progress, on_done=published, fence=fence, checkpoint_seconds=checkpoint_seconds,
                           memory_budget=memory_budget, cache_budget=cache_budget)
        if not remembered and any(row["status"] in ("done", "skipped") for row in rows):
            remember_data(ws, options)
        same = {}
        for row in rows:
            spec = Spec.parse(row["spec"])
            if (row["status"] == "done" and (spec.width < 1 or spec.gates is not None) and spec.sparsity == 0
                    and spec.nm is None and spec.slim is None and row.get("student_params") == row.get("teacher_params")):
                because = ("ndc distill --dry-run says what kept each dimension" if spec.gates is None
                           else _why_no_gate_closed(row))
                same.setdefault((str(spec), because), []).append(row["neighbourhood"])
        for (spec, because), names in same.items():
            if warn is not None:
                warn(f"{spec} shrank nothing in {', '.join(names)}: the student is the teacher's size ({because})")
        return DistillResult(rows, chosen, why, engine, backend, workers, placed, time.perf_counter() - started)


def _why_no_gate_closed(row: dict) -> str:
    from ndc.distill.gates import CLOSING_STEPS

    gates = row.get("gates") or {}
    steps = (row.get("job") or {}).get("gate_steps")
    if gates.get("groups") and steps is not None and steps < CLOSING_STEPS:
        return (f"no gate closed in {count(steps, 'gate step')}; a gate needs some {CLOSING_STEPS} to close: more "
                "--steps or --epochs")
    if gates.get("groups"):
        return "no gate closed; a larger --gate-penalty closes more"
    if gates.get("ungated"):
        return "no channel group there can carry a gate: " + "; ".join(f"{g}: {why}" for g, why in gates["ungated"].items())
    return "no channel group there can shrink: ndc distill --dry-run --width 0.5 says what keeps each dimension"


# ---------------------------------------------------------------------- stitch


@dataclass
class StitchResult:
    summary: dict  # what ndc stitch prints: sizes, export report, scores
    model: Any = field(repr=False, default=None)
    metric: Any = None  # the ndc.scoring.Metric the scores are in (with --data)


def stitch(ws: Workspace, output: str | None, *, width: float | None = None, spec: str | None = None, selection_file: str | None = None,
           data: str | None = None, limit: int | None = None, normalize: Any = True, calibrate: int = 20,
           fold_bn: bool = False, device: str = "cpu", warn: Log | None = None) -> StitchResult:
    """Replace each neighbourhood by its selected student, recalibrate batch norms on ``data``, save it, export ``output``.

    The student is saved in the workspace (``student/``) whether or not it is
    exported (``output`` None: saved and measured only).
    """
    from ndc.data import open_data
    from ndc.evaluate import evaluate
    from ndc.heads import teacher_head
    from ndc.metrics import count_flops, count_nonzero_params, count_params
    from ndc.passes.export import check_output_path, export_model
    from ndc.plan import load_teacher
    from ndc.scoring import pick_metric, teacher_doubt
    from ndc.stitch import SELECTION, build_student, recalibrate_batchnorm, resolve_selection, save_student

    device = one_device(device)
    if output is not None:
        check_output_path(output)
    if calibrate < 0:
        raise NdcError("--calibrate must be 0 or more")
    with ws.writing("ndc stitch"):
        started = time.perf_counter()
        JobStore(ws).recover()
        teacher = load_teacher(ws)
        plan = teacher.plan
        selection = resolve_selection(ws, plan, width, spec, selection_file, teacher)
        searched = width is None and spec is None and selection_file is None and ws.exists(SELECTION)
        model, made_from = build_student(ws, teacher, selection)
        source, calibrated = None, 0
        if data:
            source = open_data(data, plan.input_shape[1:], limit=limit, workspace=ws, normalize=normalize)
            if (doubt := shape_doubt(plan, source)) and warn is not None:
                warn(doubt)
            _say_if_distilled_on_other_data(ws, selection, source, data, calibrate, warn)
            calibrated = recalibrate_batchnorm(model.to(device), source, calibrate)  # a few batches: no copy of the set
        model.cpu()
        save_student(ws, model, selection, made_from, {"calibrated_batches": calibrate if calibrated else 0, "data": data,
                                                        "teacher": teacher.identity})
        seconds = {"stitch": time.perf_counter() - started}
        report = {} if output is None else export_model(model, output, plan.input_shape, fold_bn=fold_bn,
                                                         report_dir=ws.path("student/export-failure"), inputs=plan.inputs)
        theirs = _teacher_export(ws, teacher, report["format"], fold_bn) if report else {}
        seconds["export"] = time.perf_counter() - started - seconds["stitch"]
        summary = {
            "output": report.get("output"), "format": report.get("format"),
            "teacher_bytes": theirs.get("bytes"), "teacher_latency_ms": theirs.get("latency_ms"),
            "params": count_params(model), "nonzero_params": count_nonzero_params(model), "teacher_params": plan.teacher["params"],
            "flops": count_flops(model, plan.input_shape, plan.inputs), "teacher_flops": plan.teacher["flops"],
            "bytes": report.get("bytes"), "max_abs_diff": report.get("max_abs_diff"), "latency_ms": report.get("latency_ms"),
            "selection": {k: str(v) for k, v in selection.items()}, "calibrated_norms": calibrated,
            "calibration_batches": min(calibrate, -(-source.train_size // 128)) if calibrated else 0,
            "seconds": seconds,
            "selection_file": selection_file or (str(ws.path(SELECTION)) if searched else None),
            **{k: report[k] for k in ("checked_batch_sizes", "folded_bn", "trusted_only") if k in report},
        }
        if report.get("warning") and warn:
            warn(report["warning"])  # a .pt is a pickle
        if fold_bn and report and not report.get("folded_bn") and warn:
            warn("--fold-bn folded nothing: no batch norm module directly follows a convolution module "
                 + ("(a graph from torch.export holds batch norms as ATen operators, which are not folded)"
                    if plan.tracer.get("frontend") == "torch.export" else "here"))
        metric = None
        summary.update(dict.fromkeys(("accuracy", "teacher_accuracy", "agreement", "metric", "score", "teacher_score")))
        if source is not None:
            metric = pick_metric("auto", source, teacher_head(teacher), warn=warn)
            t = time.perf_counter()
            scores = evaluate(model, source, teacher=teacher.gm, metric=metric, device=device)
            seconds["evaluate"] = time.perf_counter() - t
            summary.update({k: scores.get(k) for k in ("accuracy", "teacher_accuracy", "agreement")})
            summary.update(metric=metric.name, score=scores["score"],
                           teacher_score=scores.get("teacher_score", 0.0 if metric.kind == "output-error" else 1.0))
            doubt = teacher_doubt(metric, scores.get("teacher_score"), source)
            if doubt and warn:
                warn(doubt)
        ws.write_json("student/report.json", summary)
        teacher.gm.cpu()
        return StitchResult(summary, model.cpu(), metric)


# ------------------------------------------------------- end-to-end training


@dataclass
class TrainResult:
    payload: dict  # what the command prints
    model: Any = field(repr=False, default=None)
    metric: Any = None  # the ndc.scoring.Metric of every score in the payload


def training_setup(teacher, data, loss: str, metric: str, cfg, data_free: bool, warn: Log | None = None,
                   log: Log | None = None) -> dict:
    """The :class:`~ndc.finetune.TrainConfig` fields that depend on the teacher and the data: the loss (``log`` hears
    auto's choice, ``warn`` when the labels go unused), whether its label term applies (never on noise: ``lam``
    becomes 0), the per-epoch metric. Labels the teacher has no output for are refused here, naming the example,
    before any training; ``warn`` hears of a ``cfg.tau`` or ``cfg.lam`` the loss does not use."""
    from ndc.finetune import TrainConfig
    from ndc.heads import label_kind, teacher_head
    from ndc.losses import choose_loss
    from ndc.scoring import pick_metric

    head = teacher_head(teacher)
    name, labels, why = choose_loss(loss, head, data)
    weighed = not data_free and cfg.lam > 0  # the loss's label term counts
    if loss != "auto" and not labels and label_kind(head, data) == "targets" and weighed:
        # asked for by name, its label term would be dropped: a mistake more likely than a wish (auto only warns)
        per_example = getattr(data, "target_shape", None)
        raise NdcError(f"--loss {name} cannot use the targets of {data.name} ({count(math.prod(per_example or ()), 'value')} "
                       f"per example{', not 0/1' if name == 'bce' and not getattr(data, 'binary', False) else ''}) "
                       f"with the teacher's output {head.describe()}; give targets that fit, another --loss, or "
                       "--lambda 0 to match the teacher alone")
    labels = labels and weighed
    if name == "ce" or labels and data.labels == "classes":
        hint = "train on the teacher's outputs alone with --lambda 0" if name == "kd" else "use --loss kd --lambda 0"
        data.check_classes(head.scores, hint)
    if ";" in why and warn is not None:  # the labels go unused
        warn(why)
    elif loss == "auto" and log is not None:  # what auto chose
        log(why)
    if warn is not None:
        if name != "kd" and cfg.tau != TrainConfig.tau:
            warn(f"--tau {cfg.tau:g} is ignored: it softens --loss kd's scores, and the loss is {name}")
        if cfg.lam not in (0, TrainConfig.lam) and (name == "ce" or data_free):
            warn(f"--lambda {cfg.lam:g} is ignored: " + ("noise has no labels to weigh" if data_free
                                                        else "--loss ce is the label term alone"))
    return {"loss": name, "labels": labels, "probabilities": head.sigmoid and name == "bce",
            "metric": pick_metric(metric, data, head, warn=warn), "lam": 0.0 if data_free else cfg.lam}


def score_keys(metric, **scores) -> dict:
    """``score``-style keys of a payload, and under their old ``accuracy`` names too when the metric is accuracy."""
    out = {"metric": metric.name, "higher_is_better": metric.higher_is_better}
    for key, value in scores.items():
        out[key] = value
        if metric.kind == "accuracy":
            out[key.replace("score", "accuracy")] = value
    return out


FINETUNE_LR = DEFAULT_LR["sgd", "finetune"]  # 1e-2, the paper's appendix
SCRATCH_LR = DEFAULT_LR["sgd", "scratch"]  # 0.1, the usual rate for CIFAR ResNets


def optimizer_setup(model, cfg, optimizer: str, scratch: bool, data_free: bool, log: Log | None = None) -> dict:
    """The optimiser for ``model`` (``auto``: :func:`ndc.training.choose_optimizer`; ``log`` hears why it took AdamW)
    and, when ``cfg.lr`` is None, its default rate for fine-tuning or from ``scratch``: a tenth of it on noise,
    which frozen batch norms do not renormalise."""
    name, why = choose_optimizer(optimizer, model)
    if why and log is not None:
        log(why)
    lr = cfg.lr
    if lr is None:
        lr = DEFAULT_LR[name, "scratch" if scratch else "finetune"] / (10 if data_free else 1)
    return {"optimizer": name, "lr": lr}


def training_data(ws: Workspace, plan, data: str | None, limit: int | None, data_free: bool, normalize: Any = True):
    from ndc.data import open_data
    from ndc.finetune import NoiseImages

    if not data:
        raise NdcError("give --data SPEC: --data-free trains on noise, but each epoch's score needs real data" if data_free
                       else "give --data SPEC: training and accuracy need data (with --data-free it only measures accuracy)")
    source = open_data(data, plan.input_shape[1:], limit=limit, workspace=ws, normalize=normalize)
    return NoiseImages(plan.input_shape[1:], limit or 10_000, source, plan.inputs) if data_free else source


def epoch_logger(log: Log | None, on_epoch: Callable[[dict], None] | None = None, metric=None) -> Callable[[dict], None]:
    """train()'s events as lines (and, per epoch, ``on_epoch``)."""

    def event(e: dict) -> None:
        if e.get("event") == "epoch":
            if on_epoch:
                on_epoch(e)
            if log:
                value = metric.format(e["score"]) if metric is not None else f"{e['score']:.2%}"
                title = metric.title if metric is not None else "accuracy"
                log(f"epoch {e['epoch']}: loss {e['train_loss']:.4f}, {title} {value} ({e['seconds']:.0f}s)")
        elif e.get("event") == "resumed" and log:
            log(f"resuming after epoch {e['epoch']}")
        elif e.get("event") == "stale" and log:
            log(f"not resuming the checkpoint in this workspace: {e['why']}; moved it to {e['moved_to']} and starting afresh")

    return event


def finetune(ws: Workspace, cfg: TrainConfig, *, loss: str = "auto", metric: str = "auto", optimizer: str = "auto",
             data: str | None, limit: int | None = None, normalize: Any = True, data_free: bool = False, output: str | None = None,
             restart: bool = False, device: str = "cpu", log: Log | None = None, warn: Log | None = None,
             on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """End-to-end training of the stitched student (``student/``) against the teacher; the best epoch is saved in
    ``finetune/`` and exported. ``loss`` and ``metric`` (or ``auto``) are resolved against the teacher's head,
    ``optimizer`` (``auto``, ``sgd``, ``adamw``) and a ``cfg.lr`` of None against the student.

    As ``ndc finetune``: the stitched student is kept when no epoch beats it (``keep_initial``), and on noise
    inputs (``data_free``) the batch norms keep their statistics (``freeze_bn``), whatever ``cfg`` says."""
    from ndc.finetune import epoch_score, train
    from ndc.plan import load_teacher
    from ndc.stitch import STUDENT_DIR, load_student, save_student, student_document

    _check_output(output)
    cfg = replace(cfg, keep_initial=True, freeze_bn=cfg.freeze_bn or data_free)
    device = one_device(device)
    with ws.writing("ndc finetune"):
        teacher = load_teacher(ws)
        plan = teacher.plan
        model = load_student(ws, STUDENT_DIR, teacher=teacher)
        stitched = student_document(ws, STUDENT_DIR)
        source = training_data(ws, plan, data, limit, data_free, normalize)
        cfg = replace(cfg, **training_setup(teacher, getattr(source, "real", source), loss, metric, cfg, data_free, warn, log))
        cfg = replace(cfg, **optimizer_setup(model, cfg, optimizer, False, data_free, log))
        made_from = {"teacher": teacher.identity, "student": stitched["weights_sha256"], "selection": stitched["selection"]}
        result = train(model, source, cfg, teacher=teacher.gm, ws=ws, folder="finetune", log=epoch_logger(log, on_epoch, cfg.metric),
                       resume=not restart, made_from=made_from, device=device)
        teacher_score = epoch_score(teacher.gm, source, cfg.metric, teacher.gm)
        model.cpu()
        teacher.gm.cpu()
        payload = {**score_keys(cfg.metric, score=result["best_accuracy"], initial_score=result["initial_accuracy"],
                                teacher_score=teacher_score),
                   "loss": cfg.loss, "optimizer": cfg.optimizer, "lr": cfg.lr, "epochs": result["epochs"],
                   "augment": cfg.augment and len(getattr(source, "shape", ())) == 3,  # only images are translated
                   "best_epoch": result["best_epoch"],
                   "seconds": result["seconds"], "history": result["history"], "selection": stitched["selection"]}
        _say_if_better_replaced(ws, cfg.metric, payload["score"], stitched["weights_sha256"], warn)
        save_student(ws, model, {k: Spec.parse(v) for k, v in stitched["selection"].items()}, stitched["candidates"],
                     {"teacher": teacher.identity, "from_student": stitched["weights_sha256"],
                      "finetuned": {k: payload[k] for k in ("metric", "score", "initial_score", "epochs", "best_epoch", "lr")}},
                     folder="finetune")
        payload.update(output=None, export=None)
        if output:
            _export(ws, model, output, plan, "finetune", payload, warn)
        ws.write_json("finetune/report.json", payload)
        return TrainResult(payload, model, cfg.metric)


def _say_if_distilled_on_other_data(ws: Workspace, selection: dict, source, data: str, calibrate: int,
                                    warn: Log | None) -> None:
    """Warn when students of ``selection`` were distilled from other files than ``source``'s (each records its
    ``data_files``): the batch norms are recalibrated, and the student measured, on data they did not learn from."""
    from ndc.distill.store import data_files, from_other_files

    files, store = data_files(source), JobStore(ws)
    other = [name for name, spec in selection.items() if from_other_files(store.metrics(name, spec), files)]
    if other and warn is not None:
        what = "recalibrated and measured" if calibrate else "measured"
        warn(f"the students of {', '.join(other)} were distilled from other data than --data {data}, on which the "
             f"stitched student is {what}")


def _teacher_export(ws: Workspace, teacher, fmt: str, fold_bn: bool) -> dict:
    """The teacher's file size and latency in the student's format (and folding), as stitch reports beside the
    student's: exported once per teacher, format and folding, and kept in ``student/teacher-export.json``."""
    from ndc.passes.export import export_model
    from ndc.workspace import read_json, sha256_json

    record = ws.path("student/teacher-export.json")
    key = sha256_json({"teacher": teacher.identity, "format": fmt, "fold_bn": fold_bn})
    try:
        known = read_json(record) if record.is_file() else {}
    except NdcError:
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict):
        return known[key]
    target = ws.path(f"student/teacher.{fmt}")
    try:
        report = export_model(teacher.gm, target, teacher.plan.input_shape, fold_bn=fold_bn, check=False,
                              inputs=teacher.plan.inputs)
    except NdcError:  # the student was exported: a teacher the exporter cannot take costs its two figures only
        return {}
    finally:
        target.unlink(missing_ok=True)
    entry = {"bytes": report["bytes"], "latency_ms": report["latency_ms"]}
    ws.write_json("student/teacher-export.json", {**(known if isinstance(known, dict) else {}), key: entry})
    return entry


def _say_if_better_replaced(ws: Workspace, metric, score: float, student_sha: str, warn: Log | None) -> None:
    """Warn when the fine-tuned student this run replaces scored better (same stitched student, same metric)."""
    from ndc.stitch import STUDENT
    from ndc.workspace import read_json

    path = ws.path(f"finetune/{STUDENT}")
    try:
        doc = read_json(path) if warn is not None and path.is_file() else {}
    except NdcError:  # a corrupt description of the student this run replaces: nothing to compare with
        doc = {}
    earlier = doc.get("finetuned") if isinstance(doc, dict) and doc.get("from_student") == student_sha else None
    if (isinstance(earlier, dict) and earlier.get("metric") == metric.name and isinstance(earlier.get("score"), (int, float))
            and metric.drop(earlier["score"], score) > 0):
        warn(f"replacing the earlier fine-tuned student in finetune/, which scored better ({metric.format(earlier['score'])} "
             f"{metric.title} against this run's {metric.format(score)}); rerun its settings to get it back")


def kd(ws: Workspace, cfg: TrainConfig, *, loss: str = "auto", metric: str = "auto", optimizer: str = "auto",
       width: float | None = None, spec: str | None = None, selection_file: str | None = None, data: str | None,
       limit: int | None = None, normalize: Any = True, data_free: bool = False, output: str | None = None,
       restart: bool = False, device: str = "cpu", log: Log | None = None, warn: Log | None = None,
       on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """The end-to-end baseline: the stitched student's architecture, freshly initialised, trained by ``loss``."""
    from ndc.distill.store import folder_name
    from ndc.finetune import epoch_score, train
    from ndc.metrics import count_params
    from ndc.plan import load_teacher
    from ndc.stitch import describe_selection, fresh_student, resolve_selection, save_student

    _check_output(output)
    device = one_device(device)
    with ws.writing("ndc kd"):
        teacher = load_teacher(ws)
        plan = teacher.plan
        selection = resolve_selection(ws, plan, width, spec, selection_file, teacher)
        model = fresh_student(teacher, selection, cfg.seed, ws)
        source = training_data(ws, plan, data, limit, data_free, normalize)
        cfg = replace(cfg, **training_setup(teacher, getattr(source, "real", source), loss, metric, cfg, data_free, warn, log))
        cfg = replace(cfg, **optimizer_setup(model, cfg, optimizer, True, data_free, log))
        label = describe_selection(selection)
        folder = f"kd/{cfg.loss}{'-noise' if data_free else ''}-{folder_name(label)[:60]}"
        made_from = {"teacher": teacher.identity, "selection": {k: str(v) for k, v in selection.items()}}
        needs_teacher = cfg.loss_fn().needs_teacher or cfg.metric.needs_teacher
        result = train(model, source, cfg, teacher=teacher.gm if needs_teacher else None, ws=ws, folder=folder,
                       log=epoch_logger(log, on_epoch, cfg.metric), resume=not restart, made_from=made_from, device=device)
        teacher_score = epoch_score(teacher.gm, source, cfg.metric, teacher.gm)
        model.cpu()
        teacher.gm.cpu()
        payload = {"loss": cfg.loss, "student": label, "params": count_params(model), "teacher_params": plan.teacher["params"],
                   **score_keys(cfg.metric, score=result["best_accuracy"], teacher_score=teacher_score),
                   "epochs": result["epochs"], "best_epoch": result["best_epoch"], "seconds": result["seconds"],
                   "history": result["history"], "folder": folder, "optimizer": cfg.optimizer, "lr": cfg.lr}
        save_student(ws, model, selection, {}, {"baseline": cfg.loss, "data_free": data_free, "teacher": teacher.identity},
                     folder=folder)
        payload.update(output=None, export=None)
        if output:
            _export(ws, model, output, plan, folder, payload, warn)
        ws.write_json(f"{folder}/report.json", payload)
        return TrainResult(payload, model, cfg.metric)


# ---------------------------------------------------------------------- search


@dataclass
class SearchOutcome:
    payload: dict  # what ndc search prints as JSON
    quality: Any  # the measured QualityTable
    result: Any  # the SearchResult of the rule (None without one)
    measured: dict | None  # the stitched selection's measured scores
    doc: dict | None  # selection.json as written
    files: dict
    metric: Any
    reused: bool  # the quality table came from search/quality.json
    budget: Any


UNSEEN_TIMES = 4  # search confirms its choice on up to this many times --eval-size test examples that chose nothing


def search(ws: Workspace, *, data: str | None, limit: int | None = None, normalize: Any = True, max_drop: float | None = None,
           budget: str | None = None, objective: str | None = None, eval_size: int | None = 1000, metric: str = "auto",
           fallback: str = "teacher", calibrate: int = 20, verify: bool = True, plot: bool = False, batch_size: int = 256,
           device: str = "cpu", warn: Log = _quiet, log: Log = _quiet) -> SearchOutcome:
    """Student Search: score every trained candidate inside the teacher, choose by ``max_drop`` (greedy) or ``budget``
    (exact, minimising ``objective``: the summed divergence from the teacher by default, or the summed drop), measure
    the stitched choice, and write ``selection.json`` (which ``stitch`` then uses)."""
    from ndc.data import open_data
    from ndc.heads import teacher_head
    from ndc.plan import load_teacher
    from ndc.scoring import Divergence, pick_metric, teacher_doubt
    from ndc.search import (HeldOut, greedy, load_candidates, measure_selection, parse_budget, quality_table, run_sweep,
                            solve_budget, write_pareto, write_selection)
    from ndc.search.files import OUTCOME_KEYS
    from ndc.stitch import made_for_now

    if max_drop is not None and budget is not None:
        raise NdcError("give one of --max-drop and --budget")
    if objective is not None and max_drop is not None:
        raise NdcError("--objective is what --budget minimises; --max-drop compares each candidate's drop")
    device = one_device(device)
    if not data:
        from ndc.tokens import data_example, reads_token_ids

        raise NdcError("ndc search scores every candidate inside the teacher: give --data SPEC (the data the teacher "
                       f"was trained on), {data_example(reads_token_ids(ws))}")
    with ws.writing("ndc search"):
        JobStore(ws).recover()
        teacher = load_teacher(ws)
        plan = teacher.plan
        rule_budget = parse_budget(budget, plan.teacher) if budget is not None else None
        if rule_budget is not None and rule_budget.limit >= plan.teacher[rule_budget.kind]:
            warn(f"--budget {budget} is at least the teacher's size ({plan.teacher[rule_budget.kind]:,} "
                 f"{rule_budget.kind}): the teacher itself fits it; give a smaller budget to compress")
        source = open_data(data, plan.input_shape[1:], limit=limit, workspace=ws, normalize=normalize)
        head = teacher_head(teacher)
        chosen_metric = pick_metric(metric, source, head, warn=warn)
        heldout = HeldOut.first(source, eval_size, batch_size, device)
        candidates = load_candidates(ws, teacher, device, warn)
        if not candidates:
            raise NdcError("no trained candidates in the workspace; run ndc distill first, e.g. ndc distill --width 0.25,0.5,0.75 --data SPEC")
        missing = [nb.name for nb in plan.trainable if nb.name not in candidates]
        if missing:
            warn(f"no trained candidates for {', '.join(missing)}: they keep the teacher's neighbourhood")
        quality, reused = quality_table(ws, teacher, candidates, heldout, chosen_metric, Divergence.of(head, source))
        doubt = teacher_doubt(chosen_metric, quality.teacher_accuracy, source)
        if doubt:
            warn(doubt)
        result = None
        if max_drop is not None:
            result = greedy(quality, max_drop, fallback)
        elif rule_budget is not None:
            result = solve_budget(quality, rule_budget, objective)
        for note in result.notes if result else []:
            warn(note)
        measured = None
        if result is not None and verify:
            unseen = heldout.unseen(UNSEEN_TIMES * heldout.size)
            if unseen is None:
                warn(f"the test split has no examples beyond the {heldout.size} held out, so the choice is measured only "
                     "on the examples that made it (a smaller --eval-size leaves some to confirm it on)")
            measured = measure_selection(ws, teacher, result.selection(), source, heldout, chosen_metric, calibrate, unseen)
        doc = None
        if result is not None:
            made_for = {nb.name: made_for_now(teacher, nb.name) for nb in plan.trainable}
            doc = write_selection(ws, result, measured, data, made_for)
        files = {}
        if plot:
            points = run_sweep(ws, teacher, quality, source, heldout, calibrate, result, measured, log=log, objective=objective)
            files = write_pareto(ws, points, quality)
        teacher.gm.cpu()
        payload = {
            **(doc or {"selection": None}),
            "table": {name: [o.to_json() for o in opts] for name, opts in quality.options.items()},
            "quality_reused": reused,
            "selection_file": str(ws.path("selection.json")) if doc else None,
            "files": files,
        }
        if doc is None:
            payload.update({**dict.fromkeys(OUTCOME_KEYS), "metric": quality.metric, "eval_size": quality.examples,
                            "teacher_accuracy": quality.teacher_accuracy})
        return SearchOutcome(payload, quality, result, measured, doc, files, chosen_metric, reused, rule_budget)


# ----------------------------------------------------------------------- probe


@dataclass
class ProbeOutcome:
    result: Any  # ndc.probe.ProbeResult
    files: dict
    payload: dict
    metric: Any


def probe(teacher, ws: Workspace | None, folder, what: str, *, data: str, limit: int | None = None, normalize: Any = True,
          eps=None, relative: bool = False, tolerance: float = 0.5, eval_size: int | None = 1000, metric: str = "auto",
          include_kept: bool = False, seed: int = 0, batch_size: int = 256, device: str = "cpu",
          warn: Log = _quiet) -> ProbeOutcome:
    """The thresholding effect of ``teacher`` (a workspace's, or one partitioned in memory: ``ws`` None): its score with
    Gaussian noise at each neighbourhood's output and at all of them; curves and thresholds written into ``folder``."""
    import contextlib
    from pathlib import Path

    from ndc.data import open_data
    from ndc.heads import teacher_head
    from ndc.probe import DEFAULT_EPS, probe as run_probe, write_probe
    from ndc.scoring import pick_metric
    from ndc.search import HeldOut

    device = one_device(device)
    writes_workspace = ws is not None and ws.root in Path(folder).resolve().parents
    lock = ws.writing("ndc probe") if writes_workspace else ws.reading() if ws is not None else contextlib.nullcontext()
    with lock:
        plan = teacher.plan
        source = open_data(data, plan.input_shape[1:], limit=limit, workspace=ws, normalize=normalize)
        chosen_metric = pick_metric(metric, source, teacher_head(teacher), warn=warn)
        targets = [nb.name for nb in (plan.neighbourhoods if include_kept else plan.trainable)]
        if not targets:
            targets = plan.names
            warn("the plan keeps every neighbourhood with the teacher; probing all of them")
        heldout = HeldOut.first(source, eval_size, batch_size, device)
        parts = [part.to(device) for part in teacher.parts()]
        result = run_probe(parts, plan.names, heldout, targets=targets, eps=eps or DEFAULT_EPS, relative=relative,
                           metric=chosen_metric, seed=seed, tolerance=tolerance)
        title = (f"Thresholding effect: {what}\n{result.examples} held-out examples of {data}, "
                 f"{chosen_metric.title} {chosen_metric.format(result.baseline)} without noise")
        files = write_probe(folder, result, title)
        return ProbeOutcome(result, files, {**result.to_json(), "model": what, "files": files}, chosen_metric)


def _check_output(output: str | None) -> None:
    if output:
        from ndc.passes.export import check_output_path

        check_output_path(output)


def _export(ws: Workspace, model, output: str, plan, folder: str, payload: dict, warn: Log | None = None) -> None:
    from ndc.passes.export import export_model

    payload["export"] = export_model(model, output, plan.input_shape, report_dir=ws.path(f"{folder}/export-failure"),
                                     inputs=plan.inputs)
    payload["output"] = payload["export"]["output"]
    if payload["export"].get("warning") and warn:
        warn(payload["export"]["warning"])  # a .pt is a pickle

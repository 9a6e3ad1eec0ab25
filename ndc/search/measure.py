"""Measuring candidates inside the teacher, and stitched students, on the held-out set."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ndc.chain import run_parts
from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.scoring import Divergence, Metric, as_metric, score
from ndc.search.table import QUALITY_FORMAT, QualityTable, build_table
from ndc.workspace import Workspace, sha256_json

SEARCH_DIR = "search"
QUALITY = f"{SEARCH_DIR}/quality.json"


@dataclass(frozen=True)
class HeldOut:
    """The held-out set: ``size`` examples of ``data``'s test split from ``start`` (the first ones by default), in its
    fixed order.

    Every measurement of search and probe (teacher, candidates, stitched
    students, noise) runs on exactly these examples in these batches, so their
    scores compare example by example. :meth:`unseen` is the test examples
    after them, which chose nothing.
    """

    data: Any
    size: int
    batch_size: int = 256
    device: str = "cpu"  # where batches are delivered (and the models measured on them run)
    start: int = 0

    @classmethod
    def first(cls, data: Any, eval_size: int | None, batch_size: int = 256, device: str = "cpu") -> "HeldOut":
        if eval_size is not None and eval_size < 1:
            raise NdcError("--eval-size must be at least 1")
        size = data.test_size if eval_size is None else min(eval_size, data.test_size)
        if size < 1:
            raise NdcError(f"the data {data.name} has no test examples to measure on")
        return cls(data, size, batch_size, device)

    def unseen(self, most: int) -> "HeldOut | None":
        """Up to ``most`` test examples after these (None when the test split has no more)."""
        start = self.start + self.size
        size = min(most, self.data.test_size - start)
        return HeldOut(self.data, size, self.batch_size, self.device, start) if size > 0 else None

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        skip, seen = self.start, 0
        for x, y in self.data.batches("test", self.batch_size):
            if skip >= len(x):
                skip -= len(x)
                continue
            x, y = x[skip:], None if y is None else y[skip:]
            skip = 0
            keep = self.size - seen
            x, y = x[:keep].to(self.device), None if y is None else y[:keep].to(self.device)
            if not len(x):
                return
            seen += len(x)
            yield x, y
            if seen >= self.size:
                return


def candidate_size(module: nn.Module, spec: Spec, input_shape: Sequence[int]) -> tuple[int, int]:
    """(parameters, FLOPs per example) of one candidate; a sparse spec counts only its non-zero weight matrices' entries."""
    from ndc.metrics import count_flops

    unique = {id(p): p for p in module.parameters()}.values()
    sparse = spec.sparsity > 0 or spec.nm is not None
    params = sum(int(torch.count_nonzero(p)) if sparse and p.dim() >= 2 else p.numel() for p in unique)
    return params, count_flops(module, list(input_shape))


class Quality(NamedTuple):
    """What :func:`measure_quality` measured: the teacher's score, each ``(neighbourhood, spec)``'s score with only
    that neighbourhood replaced, the number of examples, and each one's divergence from the teacher's outputs
    (empty when no divergence was asked for)."""

    teacher_score: float
    scores: dict[tuple[str, Spec], float]
    examples: int
    divergences: dict[tuple[str, Spec], float]


@torch.no_grad()
def measure_quality(parts: Sequence[nn.Module], names: Sequence[str],
                    candidates: Mapping[str, Sequence[tuple[Spec, nn.Module]]], heldout: HeldOut,
                    metric: Metric | str, divergence: Divergence | None = None) -> Quality:
    """Score the teacher, and the teacher with only ``name`` replaced by each candidate (and, with ``divergence``,
    how far each such output is from the teacher's), in one pass over the held-out set.

    ``parts`` are the teacher's neighbourhoods in order (``names``). Per batch
    the teacher runs once, keeping every boundary; each candidate then runs
    on its neighbourhood's input followed by the teacher's suffix. Metrics
    that compare with the teacher compare with its unmodified output. A
    candidate equal to the teacher's part scores exactly the teacher's score
    (and divergence 0).
    """
    metric = as_metric(metric)
    index = {n: k for k, n in enumerate(names)}
    for name in candidates:
        if name not in index:
            raise NdcError(f"no neighbourhood named {name!r}")
    for part in parts:
        part.eval()
    for options in candidates.values():
        for _, module in options:
            module.eval()
    keys = [(name, spec) for name, options in candidates.items() for spec, _ in options]
    tallies = {k: metric.tally() for k in keys}
    distances = {k: divergence.tally() for k in keys} if divergence is not None else {}
    teacher_tally = metric.tally()
    total = 0
    for x, y in heldout.batches():
        values = run_parts(parts, x, keep=True)
        teacher_out = values[-1]
        teacher_tally.add(teacher_out, teacher_out, y)
        for name, options in candidates.items():
            i = index[name]
            for spec, module in options:
                out = run_parts(parts, module(values[i].clone()), i + 1)
                tallies[name, spec].add(out, teacher_out, y)
                if distances:
                    distances[name, spec].add(out, teacher_out, y)
        total += len(x)
    if not total:
        raise NdcError("the held-out set is empty")
    return Quality(teacher_tally.result(), {k: t.result() for k, t in tallies.items()}, total,
                   {k: t.result() for k, t in distances.items()})


# ------------------------------------------------------------------ workspace side


def load_candidates(ws: Workspace, teacher, device: str = "cpu",
                    warn: Callable[[str], None] = lambda message: None) -> dict[str, list[tuple[Spec, nn.Module, dict]]]:
    """Every finished candidate of the workspace, rebuilt with its weights: ``{neighbourhood: [(spec, module, info)]}``.

    Candidates distilled from another teacher or partition are left out, and ``warn`` hears which.
    """
    from ndc.distill.store import StaleStudent
    from ndc.stitch import load_candidate, trained_specs

    plan = teacher.plan
    trainable = {nb.name for nb in plan.trainable}
    out: dict[str, list[tuple[Spec, nn.Module, dict]]] = {}
    stale = []
    for name, specs in trained_specs(ws, plan).items():
        if name not in trainable:
            continue
        for spec in specs:
            try:
                module, info = load_candidate(ws, teacher, name, spec)
            except StaleStudent:
                stale.append(f"{name} {spec}")
                continue
            out.setdefault(name, []).append((spec, module.eval().to(device), info))
    if stale:
        warn(f"leaving out {len(stale)} candidate(s) distilled from another teacher or partition than the workspace's "
             f"now ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); rerun ndc distill to retrain them")
    return {nb.name: out[nb.name] for nb in plan.trainable if nb.name in out}


def quality_key(teacher, candidates: Mapping[str, Sequence[tuple[Spec, nn.Module, dict]]], heldout: HeldOut,
                metric: Metric, divergence: Divergence | None = None) -> str:
    """Hash of everything a quality table depends on: teacher, each candidate's weights, the held-out examples, the metric."""
    data = heldout.data
    return sha256_json({
        "format": QUALITY_FORMAT,
        "teacher": teacher.identity,
        "candidates": {name: [[str(spec), info.get("key"), info.get("weights_sha256")] for spec, _, info in opts]
                       for name, opts in candidates.items()},
        "data": [data.name, getattr(data, "fingerprint", None), data.limit, data.mean, data.std, list(data.shape)],
        "examples": heldout.size,
        "batch_size": heldout.batch_size,
        "metric": [metric.name, metric.threshold],
        "divergence": None if divergence is None else [divergence.kind, divergence.probabilities],
    })


def quality_table(ws: Workspace, teacher, candidates: Mapping[str, Sequence[tuple[Spec, nn.Module, dict]]],
                  heldout: HeldOut, metric: Metric | str, divergence: Divergence | None = None,
                  reuse: bool = True) -> tuple[QualityTable, bool]:
    """Measure (or reuse from ``search/quality.json``) every candidate's quality (its ``metric`` score and, with
    ``divergence``, its divergence from the teacher's outputs); returns the table and whether it was reused."""
    metric = as_metric(metric)
    key = quality_key(teacher, candidates, heldout, metric, divergence)
    if reuse and ws.exists(QUALITY):
        try:
            cached = QualityTable.from_json(ws.read_json(QUALITY))
        except (NdcError, KeyError, TypeError, ValueError):
            cached = None
        if cached is not None and cached.key == key:
            return cached, True
    plan = teacher.plan
    simple = {name: [(spec, module) for spec, module, _ in opts] for name, opts in candidates.items()}
    parts = [part.to(heldout.device) for part in teacher.parts()]
    measured = measure_quality(parts, plan.names, simple, heldout, metric, divergence)
    sizes = {(name, spec): candidate_size(module, spec, plan[name].input_shape)
             for name, opts in candidates.items() for spec, module, _ in opts}
    errors = {(name, spec): info.get("final_error") for name, opts in candidates.items() for spec, _, info in opts}
    table = build_table(plan, measured.teacher_score, measured.scores, measured.examples, sizes, metric, errors, key,
                        measured.divergences, None if divergence is None else divergence.kind)
    ws.write_json(QUALITY, table.to_json())
    return table, False


def measure_selection(ws: Workspace, teacher, selection: Mapping[str, Spec], data, heldout: HeldOut,
                      metric: Metric | str, calibrate: int = 20, unseen: HeldOut | None = None) -> dict:
    """Stitch ``selection`` and score it on the held-out set, as stitched and after recalibrating its batch norms.

    ``uncalibrated_accuracy`` is the student exactly as the drops predict it
    (every candidate with the statistics it was distilled with);
    ``accuracy`` is after ``calibrate`` training batches re-estimate every
    batch norm, as ``ndc stitch --data`` does (equal to the former when there
    is nothing to recalibrate). Both are values of ``metric``.

    The held-out examples chose the selection, so its score there flatters it
    a little (the candidates that did well on them by chance were kept).
    ``unseen`` (examples that chose nothing) gives the honest figure: the
    recalibrated student's and the teacher's scores there, under ``unseen``.
    """
    from ndc.devicedata import on_device
    from ndc.metrics import count_params
    from ndc.stitch import build_student, recalibrate_batchnorm

    metric = as_metric(metric)
    model, _ = build_student(ws, teacher, dict(selection))
    model.to(heldout.device)
    teacher.gm.to(heldout.device)
    before = score(model, heldout.batches(), metric, teacher.gm)
    norms = recalibrate_batchnorm(model, on_device(data, heldout.device), calibrate) if calibrate > 0 else 0
    after = score(model, heldout.batches(), metric, teacher.gm) if norms else before
    confirmed = None
    if unseen is not None:
        theirs = score(teacher.gm, unseen.batches(), metric, teacher.gm)
        ours = score(model, unseen.batches(), metric, teacher.gm)
        confirmed = {"examples": unseen.size, "accuracy": ours, "teacher_accuracy": theirs,
                     "drop": round(metric.drop(theirs, ours), 6)}
    return {"accuracy": after, "uncalibrated_accuracy": before, "calibrated_norms": norms,
            "stitched_params": count_params(model), "unseen": confirmed}

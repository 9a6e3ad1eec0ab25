"""Student Search: one trained candidate per neighbourhood, chosen from measured quality (the paper's section 5).

The pipeline of ``ndc search``::

    teacher    = load_teacher(ws)
    candidates = load_candidates(ws, teacher)                 # every finished job, rebuilt with its weights
    table      = quality_table(ws, teacher, candidates, heldout, metric)   # cached in search/quality.json
    result     = greedy(table, max_drop)  |  solve_budget(table, budget)   # pure: no model runs here
    measured   = measure_selection(ws, teacher, result, data, heldout)     # stitch, recalibrate, evaluate
    write_selection(ws, result, measured)                     # selection.json, read by ndc stitch

**Quality.** A candidate ``c`` for neighbourhood ``i`` is scored by the
teacher with only that neighbourhood replaced, ``T_n ∘ … ∘ c ∘ … ∘ T_1``, on
the *held-out set*: the first ``eval_size`` examples of the test split, in the
source's fixed order. The score is accuracy against the labels, or agreement
with the teacher's own predictions (``metric="agreement"``, used when the
labels do not fit the teacher's output). Its *drop* is the teacher's score
minus that score, in percentage points (negative when the candidate does
better than the teacher). Measuring is cheap: one teacher pass per batch
captures every boundary, and each candidate runs only itself and the teacher
suffix after it. A fresh pass is used rather than the distill stage's
activation cache, whose fp16 copies would perturb exactly what is measured
and hold only the examples distillation validated on.

**Rules.** ``greedy``: per neighbourhood, the smallest trained candidate (by
parameters, then FLOPs) whose drop is below ``max_drop`` (the paper's rule);
when none is, the teacher's own neighbourhood (or, with
``fallback="widest"``, the widest trained candidate) and a note saying so.
``solve_budget``: one option per neighbourhood, the teacher's neighbourhood
always among them with drop 0, minimising the summed drop with the whole
student's parameters (or FLOPs) within the budget, solved exactly by
:func:`mckp_frontier`. The predicted accuracy of a student is the teacher's
minus the summed drops (errors taken as additive, which the paper's appendix
B.1 finds holds, or errs on the safe side, while each drop is small); search
then stitches the student and measures it.

Sizes: a candidate's parameters are counted on its rebuilt module (non-zero
weights for sparse specs, since pruned weights are not stored in a sparse
format), FLOPs by :func:`ndc.metrics.count_flops` (dense). The whole student
is everything the search does not choose (kept neighbourhoods and any
parameters outside every neighbourhood, ``table.base``) plus the chosen
options.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.workspace import Workspace, sha256_json

SEARCH_DIR = "search"
QUALITY = f"{SEARCH_DIR}/quality.json"
PARETO_CSV = f"{SEARCH_DIR}/pareto.csv"
PARETO_PNG = f"{SEARCH_DIR}/pareto.png"
METRICS = ("auto", "accuracy", "agreement")
FALLBACKS = ("teacher", "widest")
DROP_DECIMALS = 9  # drops are compared to 1e-9 points, so sums in different orders tie exactly
QUALITY_FORMAT = 1


# ------------------------------------------------------------------ held-out set


@dataclass(frozen=True)
class HeldOut:
    """The held-out set: the first ``size`` examples of ``data``'s test split, in its fixed order.

    Every measurement of search and probe (teacher, candidates, stitched
    students, noise) runs on exactly these examples in these batches, so their
    scores compare example by example.
    """

    data: Any
    size: int
    batch_size: int = 256

    @classmethod
    def first(cls, data: Any, eval_size: int | None, batch_size: int = 256) -> "HeldOut":
        if eval_size is not None and eval_size < 1:
            raise NdcError("--eval-size must be at least 1")
        size = data.test_size if eval_size is None else min(eval_size, data.test_size)
        if size < 1:
            raise NdcError(f"the data {data.name} has no test examples to measure on")
        return cls(data, size, batch_size)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for x, y in self.data.batches("test", self.batch_size):
            x, y = x[: self.size - seen], y[: self.size - seen]
            if not len(x):
                return
            seen += len(x)
            yield x, y
            if seen >= self.size:
                return


def choose_metric(requested: str, data: Any, output_shape: Sequence[int]) -> tuple[str, str | None]:
    """``accuracy`` when the labels fit the teacher's output (B, classes), else ``agreement``; and why, if it switched."""
    if requested not in METRICS:
        raise NdcError(f"unknown --metric {requested!r}; valid: {', '.join(METRICS)}")
    fits = len(output_shape) == 2 and getattr(data, "classes", 0) and data.classes <= output_shape[1]
    if requested == "agreement":
        return "agreement", None
    if fits:
        return "accuracy", None
    why = (f"the labels of {data.name} ({data.classes} classes) do not fit the teacher's output "
           f"{'x'.join(map(str, output_shape))}")
    if requested == "accuracy":
        raise NdcError(f"cannot measure accuracy: {why}; use --metric agreement")
    return "agreement", f"{why}: measuring agreement with the teacher instead"


def predictions(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1)


# ------------------------------------------------------------- teacher chains


@torch.no_grad()
def boundary_values(parts: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """``values[k]`` is the input of part ``k`` (``values[0] = x``); ``values[-1]`` the teacher's output.

    Each part gets a copy of its input, so a part that writes into its input
    (an in-place ReLU at a neighbourhood's start) cannot change a value kept
    for later.
    """
    values = [x]
    for part in parts:
        values.append(part(values[-1].clone()))
    return values


@torch.no_grad()
def run_from(parts: Sequence[nn.Module], start: int, h: torch.Tensor) -> torch.Tensor:
    """Parts ``start ..`` applied in turn to ``h`` (the teacher suffix)."""
    for part in parts[start:]:
        h = part(h)
    return h


# ----------------------------------------------------------------- quality


@dataclass(frozen=True)
class Option:
    """One choice for one neighbourhood: a trained candidate, or the teacher's own neighbourhood (``teacher``).

    ``accuracy`` is the held-out score of the teacher with only this
    neighbourhood replaced; ``drop`` the teacher's score minus it, in points.
    """

    neighbourhood: str
    spec: Spec
    params: int
    flops: int
    accuracy: float
    drop: float
    teacher: bool = False
    error: float | None = None  # the job's final relative error on its held-out activations

    @property
    def label(self) -> str:
        return "teacher" if self.teacher else str(self.spec)

    def size(self, kind: str) -> int:
        return self.params if kind == "params" else self.flops

    def to_json(self) -> dict:
        d = asdict(self)
        d["spec"] = str(self.spec)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Option":
        return cls(**{**d, "spec": Spec.parse(d["spec"])})


@dataclass
class QualityTable:
    """Measured options per trainable neighbourhood (in plan order), each list ordered smallest first.

    Invariants: every neighbourhood's list holds exactly one ``teacher``
    option, with drop 0 and the teacher neighbourhood's size; ``base`` is the
    size of everything that no option replaces, so a student's size is
    ``base + Σ chosen sizes`` and the all-teacher choice gives the teacher's.
    """

    metric: str
    examples: int
    teacher_accuracy: float
    options: dict[str, list[Option]]
    base: dict[str, int]
    teacher_size: dict[str, int]
    key: str = ""

    def trained(self, name: str) -> list[Option]:
        return [o for o in self.options[name] if not o.teacher]

    def teacher_option(self, name: str) -> Option:
        return next(o for o in self.options[name] if o.teacher)

    def to_json(self) -> dict:
        return {"format": QUALITY_FORMAT, "key": self.key, "metric": self.metric, "examples": self.examples,
                "teacher_accuracy": self.teacher_accuracy, "base": self.base, "teacher_size": self.teacher_size,
                "options": {k: [o.to_json() for o in v] for k, v in self.options.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "QualityTable":
        return cls(metric=d["metric"], examples=d["examples"], teacher_accuracy=d["teacher_accuracy"],
                   options={k: [Option.from_json(o) for o in v] for k, v in d["options"].items()},
                   base=d["base"], teacher_size=d["teacher_size"], key=d.get("key", ""))


def _order(option: Option) -> tuple:
    return (option.params, option.flops, option.teacher, str(option.spec))


def candidate_size(module: nn.Module, spec: Spec, input_shape: Sequence[int]) -> tuple[int, int]:
    """(parameters, FLOPs per example) of one candidate; a sparse spec counts only its non-zero weight matrices' entries."""
    from ndc.metrics import count_flops

    unique = {id(p): p for p in module.parameters()}.values()
    sparse = spec.sparsity > 0 or spec.nm is not None
    params = sum(int(torch.count_nonzero(p)) if sparse and p.dim() >= 2 else p.numel() for p in unique)
    return params, count_flops(module, list(input_shape))


@torch.no_grad()
def measure_quality(parts: Sequence[nn.Module], names: Sequence[str],
                    candidates: Mapping[str, Sequence[tuple[Spec, nn.Module]]], heldout: HeldOut,
                    metric: str) -> tuple[float, dict[tuple[str, Spec], float], int]:
    """Score of the teacher, and of the teacher with only ``name`` replaced by each candidate; and the example count.

    ``parts`` are the teacher's neighbourhoods in order (``names``). Per batch
    the teacher runs once, keeping every boundary; each candidate then runs
    on its neighbourhood's input followed by the teacher's suffix. Scores are
    fractions in [0, 1]. A candidate equal to the teacher's part scores
    exactly the teacher's score.
    """
    index = {n: k for k, n in enumerate(names)}
    for name in candidates:
        if name not in index:
            raise NdcError(f"no neighbourhood named {name!r}")
    for part in parts:
        part.eval()
    for options in candidates.values():
        for _, module in options:
            module.eval()
    correct = {(name, spec): 0 for name, options in candidates.items() for spec, _ in options}
    teacher_correct = total = 0
    for x, y in heldout.batches():
        values = boundary_values(parts, x)
        teacher_pred = predictions(values[-1])
        reference = y if metric == "accuracy" else teacher_pred
        teacher_correct += int((teacher_pred == reference).sum())
        for name, options in candidates.items():
            i = index[name]
            for spec, module in options:
                out = run_from(parts, i + 1, module(values[i].clone()))
                correct[name, spec] += int((predictions(out) == reference).sum())
        total += len(x)
    if not total:
        raise NdcError("the held-out set is empty")
    return teacher_correct / total, {k: v / total for k, v in correct.items()}, total


def build_table(plan, teacher_score: float, scores: Mapping[tuple[str, Spec], float], examples: int,
                sizes: Mapping[tuple[str, Spec], tuple[int, int]], metric: str,
                errors: Mapping[tuple[str, Spec], float | None] | None = None, key: str = "") -> QualityTable:
    """Assemble a :class:`QualityTable` from measured scores and sizes (pure)."""
    errors = errors or {}
    options: dict[str, list[Option]] = {}
    for nb in plan.trainable:
        opts = [Option(nb.name, Spec(), nb.params, nb.flops, teacher_score, 0.0, teacher=True)]
        for (name, spec), score in scores.items():
            if name == nb.name:
                params, flops = sizes[name, spec]
                opts.append(Option(name, spec, params, flops, score, _drop(teacher_score, score),
                                   error=errors.get((name, spec))))
        options[nb.name] = sorted(opts, key=_order)
    searched = {"params": sum(nb.params for nb in plan.trainable), "flops": sum(nb.flops for nb in plan.trainable)}
    teacher_size = {"params": int(plan.teacher["params"]), "flops": int(plan.teacher["flops"])}
    base = {k: teacher_size[k] - searched[k] for k in ("params", "flops")}
    return QualityTable(metric, examples, teacher_score, options, base, teacher_size, key)


def _drop(reference: float, score: float) -> float:
    return round(100.0 * (reference - score), DROP_DECIMALS)


# ------------------------------------------------------------------- results


@dataclass
class SearchResult:
    """One option per trainable neighbourhood, the rule that chose it, and what it predicts."""

    table: QualityTable
    choice: dict[str, Option]
    rule: dict
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_drop(self) -> float:
        return round(sum(o.drop for o in self.choice.values()), DROP_DECIMALS)

    @property
    def predicted_accuracy(self) -> float:
        return self.table.teacher_accuracy - self.predicted_drop / 100.0

    def size(self, kind: str) -> int:
        return self.table.base[kind] + sum(o.size(kind) for o in self.choice.values())

    @property
    def teacher_parts(self) -> list[str]:
        return [name for name, o in self.choice.items() if o.teacher]

    def selection(self) -> dict[str, Spec]:
        """What ``ndc stitch`` replaces: the chosen spec per neighbourhood.

        A neighbourhood that keeps the teacher's part is written as the
        identity spec (stitch uses the teacher's part for an identity spec
        that was never trained), except when a ``width=1.0`` student *was*
        trained there: then the identity spec would name that student, so the
        neighbourhood is left out (stitch keeps the teacher's part for every
        neighbourhood a selection does not name).
        """
        out = {}
        for name, option in self.choice.items():
            if option.teacher and any(o.spec.is_identity for o in self.table.trained(name)):
                continue
            out[name] = option.spec
        return out


def greedy(table: QualityTable, max_drop: float, fallback: str = "teacher") -> SearchResult:
    """The paper's rule: per neighbourhood, the smallest trained candidate whose drop is below ``max_drop`` points.

    "Smallest" orders by parameters, then FLOPs, then the spec text. When no
    candidate qualifies, ``fallback`` decides: ``teacher`` keeps the teacher's
    neighbourhood (drop 0), ``widest`` the trained candidate with the most
    parameters (lowest drop on a tie); either way a note says so.

    >>> greedy(table, 1.0).choice["layer1.0"].spec          # doctest: +SKIP
    Spec(width=0.25, sparsity=0.0, nm=None)
    """
    if fallback not in FALLBACKS:
        raise NdcError(f"unknown --fallback {fallback!r}; valid: {', '.join(FALLBACKS)}")
    if not math.isfinite(max_drop):
        raise NdcError("--max-drop must be a finite number of points")
    choice, notes = {}, []
    for name in table.options:
        trained = table.trained(name)
        fits = [o for o in trained if o.drop < max_drop]
        if fits:
            choice[name] = fits[0]
            continue
        if not trained:
            choice[name] = table.teacher_option(name)
            notes.append(f"{name}: no trained candidates; keeping the teacher's neighbourhood")
            continue
        best = min(o.drop for o in trained)
        if fallback == "widest":
            choice[name] = max(trained, key=lambda o: (o.params, o.flops, -o.drop))
            what = f"the widest trained candidate, {choice[name].spec} (drop {choice[name].drop:.2f})"
        else:
            choice[name] = table.teacher_option(name)
            what = "the teacher's neighbourhood"
        notes.append(f"{name}: no candidate has a drop below --max-drop {max_drop:g} (best {best:.2f} points); keeping {what}")
    return SearchResult(table, choice, {"rule": "max-drop", "max_drop": max_drop, "fallback": fallback}, notes)


# -------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    kind: str  # "params" or "flops"
    limit: int

    def __str__(self) -> str:
        return f"{self.kind}={self.limit}"


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_budget(text: str, teacher_size: Mapping[str, int] | None = None) -> Budget:
    """``params=150K``, ``flops=2.5M``, ``params=40%`` (of the teacher) -> :class:`Budget` (decimal suffixes K, M, G).

    >>> parse_budget("params=150K")
    Budget(kind='params', limit=150000)
    >>> parse_budget("flops=2.5m")
    Budget(kind='flops', limit=2500000)
    """
    m = re.fullmatch(r"\s*(params|flops)\s*=\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg%]?)\s*", text, re.IGNORECASE)
    if not m:
        raise NdcError(f"bad --budget {text!r}: expected params=N or flops=N, e.g. params=150K, flops=2.5M or params=50%")
    kind, number, suffix = m.group(1).lower(), float(m.group(2)), m.group(3).lower()
    if suffix == "%":
        if teacher_size is None:
            raise NdcError(f"--budget {text}: a percentage needs the teacher's size")
        value = number / 100.0 * teacher_size[kind]
    else:
        value = number * _SUFFIX[suffix]
    if not math.isfinite(value) or value <= 0:
        raise NdcError(f"bad --budget {text!r}: the budget must be positive")
    return Budget(kind, int(math.floor(value + 1e-9)))


@dataclass(frozen=True)
class Frontier:
    """The exact Pareto frontier of a multiple-choice knapsack: every (cost, value) no other choice beats on both.

    ``costs`` ascend and ``values`` strictly descend, so the best choice within
    a capacity is the last point whose cost fits. ``choice(k)`` rebuilds the
    option index picked in each group for point ``k``.
    """

    costs: np.ndarray
    values: np.ndarray
    parents: tuple[np.ndarray, ...]
    picks: tuple[np.ndarray, ...]

    def best(self, capacity: int | None = None) -> int | None:
        """Index of the lowest-value point with cost ≤ ``capacity`` (the optimum), or None when nothing fits."""
        if not len(self.costs):
            return None
        if capacity is None:
            return len(self.costs) - 1
        k = int(np.searchsorted(self.costs, capacity, side="right")) - 1
        return k if k >= 0 else None

    def choice(self, k: int) -> list[int]:
        out = []
        for parents, picks in zip(reversed(self.parents), reversed(self.picks)):
            out.append(int(picks[k]))
            k = int(parents[k])
        return out[::-1]

    def __len__(self) -> int:
        return len(self.costs)


def mckp_frontier(groups: Sequence[Sequence[tuple[int, float]]], capacity: int | None = None) -> Frontier:
    """Exact multiple-choice knapsack: pick one ``(cost, value)`` per group minimising Σ value with Σ cost ≤ capacity.

    Dynamic programming over Pareto sets (Nemhauser-Ullmann): after group
    ``k`` we keep every partial choice that no other partial choice beats on
    both cost and value. Exactness: if an optimal choice's first ``k`` picks
    were dominated by a kept prefix (cost ≤, value ≤), swapping that prefix
    in gives a choice that is no costlier and no worse, so some optimum
    extends a kept prefix at every stage; with ``capacity`` a prefix is also
    dropped when even the cheapest completion cannot fit, which removes no
    feasible choice. Costs are integers and are never rounded or binned, so
    the result respects the true budget and is optimal for the true problem,
    not a discretised one. The frontier never holds more points than there
    are distinct cost sums (≤ capacity + 1), and in practice far fewer.

    Ties are broken deterministically: lower cost first, then lower value,
    then earlier options. Values are rounded to ``DROP_DECIMALS`` places
    after each addition, so choices whose values differ only by float
    rounding tie.

    >>> f = mckp_frontier([[(1, 5.0), (3, 1.0)], [(2, 4.0), (5, 0.0)]], capacity=6)
    >>> f.choice(f.best(6)), float(f.values[f.best(6)])
    ([1, 0], 5.0)
    """
    rest = [0] * (len(groups) + 1)
    for k in range(len(groups) - 1, -1, -1):
        if not groups[k]:
            raise ValueError(f"group {k} has no options")
        rest[k] = rest[k + 1] + min(int(c) for c, _ in groups[k])
    costs = np.zeros(1, dtype=np.int64)
    values = np.zeros(1, dtype=np.float64)
    if capacity is not None and rest[0] > capacity:
        costs, values = costs[:0], values[:0]
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    for k, group in enumerate(groups):
        gc = np.array([int(c) for c, _ in group], dtype=np.int64)
        gv = np.array([float(v) for _, v in group], dtype=np.float64)
        n, m = len(costs), len(group)
        c = (costs[:, None] + gc[None, :]).ravel()
        v = np.round((values[:, None] + gv[None, :]).ravel(), DROP_DECIMALS)
        parent = np.repeat(np.arange(n), m)
        pick = np.tile(np.arange(m), n)
        if capacity is not None:
            fits = c + rest[k + 1] <= capacity
            c, v, parent, pick = c[fits], v[fits], parent[fits], pick[fits]
        order = np.lexsort((pick, parent, v, c))
        c, v, parent, pick = c[order], v[order], parent[order], pick[order]
        if len(v):
            best_before = np.concatenate(([np.inf], np.minimum.accumulate(v)[:-1]))
            keep = v < best_before
            c, v, parent, pick = c[keep], v[keep], parent[keep], pick[keep]
        costs, values = c, v
        parents.append(parent)
        picks.append(pick)
    return Frontier(costs, values, tuple(parents), tuple(picks))


def solve_mckp(groups: Sequence[Sequence[tuple[int, float]]], capacity: int) -> tuple[list[int], int, float] | None:
    """The optimum of :func:`mckp_frontier`: (option index per group, total cost, total value), or None when infeasible."""
    frontier = mckp_frontier(groups, capacity)
    k = frontier.best(capacity)
    if k is None:
        return None
    return frontier.choice(k), int(frontier.costs[k]), float(frontier.values[k])


def smallest_size(table: QualityTable, kind: str) -> int:
    """The smallest student the options can make: every neighbourhood at its smallest option."""
    return table.base[kind] + sum(min(o.size(kind) for o in opts) for opts in table.options.values())


def solve_budget(table: QualityTable, budget: Budget) -> SearchResult:
    """One option per neighbourhood minimising the summed drop with the whole student within ``budget`` (exact).

    Raises :class:`NdcError` naming the smallest achievable size when no
    choice fits.
    """
    names = list(table.options)
    groups = [[(o.size(budget.kind), o.drop) for o in table.options[name]] for name in names]
    capacity = budget.limit - table.base[budget.kind]
    solved = solve_mckp(groups, capacity) if capacity >= 0 else None
    if solved is None:
        smallest = smallest_size(table, budget.kind)
        raise NdcError(f"no student fits {budget.kind} <= {budget.limit:,}: the smallest the trained candidates "
                       f"can make has {smallest:,} {budget.kind}; raise the budget or distil narrower candidates")
    picks, _, _ = solved
    choice = {name: table.options[name][k] for name, k in zip(names, picks)}
    return SearchResult(table, choice, {"rule": "budget", "budget": {"kind": budget.kind, "limit": budget.limit}})


def pareto_choices(table: QualityTable, kind: str = "params") -> list[SearchResult]:
    """Every student on the exact predicted frontier (size against summed drop), smallest first."""
    names = list(table.options)
    frontier = mckp_frontier([[(o.size(kind), o.drop) for o in table.options[n]] for n in names])
    out = []
    for k in range(len(frontier)):
        picks = frontier.choice(k)
        choice = {name: table.options[name][i] for name, i in zip(names, picks)}
        limit = table.base[kind] + int(frontier.costs[k])
        out.append(SearchResult(table, choice, {"rule": "budget", "budget": {"kind": kind, "limit": limit}}))
    return out


# ============================================================ workspace side


def load_candidates(ws: Workspace, teacher) -> dict[str, list[tuple[Spec, nn.Module, dict]]]:
    """Every finished candidate of the workspace, rebuilt with its weights: ``{neighbourhood: [(spec, module, info)]}``."""
    from ndc.stitch import load_candidate, trained_specs

    plan = teacher.plan
    trainable = {nb.name for nb in plan.trainable}
    out: dict[str, list[tuple[Spec, nn.Module, dict]]] = {}
    for name, specs in trained_specs(ws, plan).items():
        if name not in trainable:
            continue
        for spec in specs:
            module, info = load_candidate(ws, teacher, name, spec)
            out.setdefault(name, []).append((spec, module.eval(), info))
    return {nb.name: out[nb.name] for nb in plan.trainable if nb.name in out}


def quality_key(teacher, candidates: Mapping[str, Sequence[tuple[Spec, nn.Module, dict]]], heldout: HeldOut,
                metric: str) -> str:
    """Hash of everything a quality table depends on: teacher, each candidate's weights, the held-out examples, the metric."""
    data = heldout.data
    return sha256_json({
        "format": QUALITY_FORMAT,
        "teacher": teacher.sha256,
        "candidates": {name: [[str(spec), info.get("key"), info.get("weights_sha256")] for spec, _, info in opts]
                       for name, opts in candidates.items()},
        "data": [data.name, data.limit, data.mean, data.std, list(data.shape)],
        "examples": heldout.size,
        "batch_size": heldout.batch_size,
        "metric": metric,
    })


def quality_table(ws: Workspace, teacher, candidates: Mapping[str, Sequence[tuple[Spec, nn.Module, dict]]],
                  heldout: HeldOut, metric: str, reuse: bool = True) -> tuple[QualityTable, bool]:
    """Measure (or reuse from ``search/quality.json``) every candidate's quality; returns the table and whether it was reused."""
    key = quality_key(teacher, candidates, heldout, metric)
    if reuse and ws.exists(QUALITY):
        try:
            cached = QualityTable.from_json(ws.read_json(QUALITY))
        except (NdcError, KeyError, TypeError, ValueError):
            cached = None
        if cached is not None and cached.key == key:
            return cached, True
    plan = teacher.plan
    simple = {name: [(spec, module) for spec, module, _ in opts] for name, opts in candidates.items()}
    teacher_score, scores, examples = measure_quality(teacher.parts(), plan.names, simple, heldout, metric)
    sizes = {(name, spec): candidate_size(module, spec, plan[name].input_shape)
             for name, opts in candidates.items() for spec, module, _ in opts}
    errors = {(name, spec): info.get("final_error") for name, opts in candidates.items() for spec, _, info in opts}
    table = build_table(plan, teacher_score, scores, examples, sizes, metric, errors, key)
    ws.write_json(QUALITY, table.to_json())
    return table, False


@torch.no_grad()
def heldout_score(model: nn.Module, heldout: HeldOut, metric: str, teacher: nn.Module | None = None) -> float:
    """Accuracy (or agreement with ``teacher``) of ``model`` on the held-out set, as a fraction."""
    model.eval()
    if teacher is not None:
        teacher.eval()
    correct = total = 0
    for x, y in heldout.batches():
        pred = predictions(model(x))
        reference = y if metric == "accuracy" else predictions(teacher(x))
        correct += int((pred == reference).sum())
        total += len(x)
    return correct / max(total, 1)


def measure_selection(ws: Workspace, teacher, selection: Mapping[str, Spec], data, heldout: HeldOut, metric: str,
                      calibrate: int = 20) -> dict:
    """Stitch ``selection`` and score it on the held-out set, as stitched and after recalibrating its batch norms.

    ``uncalibrated_accuracy`` is the student exactly as the drops predict it
    (every candidate with the statistics it was distilled with);
    ``accuracy`` is after ``calibrate`` training batches re-estimate every
    batch norm, as ``ndc stitch --data`` does (equal to the former when there
    is nothing to recalibrate).
    """
    from ndc.metrics import count_params
    from ndc.stitch import build_student, recalibrate_batchnorm

    model, _ = build_student(ws, teacher, dict(selection))
    reference = teacher.gm if metric == "agreement" else None
    before = heldout_score(model, heldout, metric, reference)
    norms = recalibrate_batchnorm(model, data, calibrate) if calibrate > 0 else 0
    after = heldout_score(model, heldout, metric, reference) if norms else before
    return {"accuracy": after, "uncalibrated_accuracy": before, "calibrated_norms": norms,
            "stitched_params": count_params(model)}


def selection_document(result: SearchResult, measured: dict | None, data_spec: str | None) -> dict:
    """The JSON of ``selection.json``: what stitch needs (``selection``) and what search knew and found."""
    table = result.table
    doc = {
        "selection": {name: str(spec) for name, spec in result.selection().items()},
        "teacher": result.teacher_parts,
        **result.rule,
        "metric": table.metric,
        "eval_size": table.examples,
        "data": data_spec,
        "teacher_accuracy": table.teacher_accuracy,
        "predicted_drop": result.predicted_drop,
        "predicted_accuracy": result.predicted_accuracy,
        "measured_accuracy": None if measured is None else measured["accuracy"],
        "measured_uncalibrated_accuracy": None if measured is None else measured["uncalibrated_accuracy"],
        "calibrated_norms": None if measured is None else measured["calibrated_norms"],
        "measured_drop": None if measured is None else round(100 * (table.teacher_accuracy - measured["accuracy"]), 6),
        "params": result.size("params"),
        "flops": result.size("flops"),
        "teacher_params": table.teacher_size["params"],
        "teacher_flops": table.teacher_size["flops"],
        "candidates": {name: {"spec": str(o.spec), "teacher": o.teacher, "params": o.params, "flops": o.flops,
                              "accuracy": o.accuracy, "drop": o.drop} for name, o in result.choice.items()},
        "notes": result.notes,
    }
    return doc


def write_selection(ws: Workspace, result: SearchResult, measured: dict | None, data_spec: str | None) -> dict:
    """Write ``selection.json`` (the file ``ndc stitch`` uses by default) and record it in the manifest."""
    from ndc.stitch import SELECTION

    doc = selection_document(result, measured, data_spec)
    ws.write_json(SELECTION, doc)
    ws.record(SELECTION, made_from={"quality": result.table.key, "rule": result.rule})
    return doc


# ---------------------------------------------------------------- pareto sweep


SWEEP_MAX_DROPS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass
class SweepPoint:
    kind: str  # teacher, uniform, max-drop, budget, selected
    label: str
    params: int
    flops: int
    predicted_accuracy: float
    measured_accuracy: float | None
    selection: dict[str, str]


def sweep_results(table: QualityTable, uniform_specs: Sequence[Spec], kind: str = "params",
                  max_drops: Sequence[float] = SWEEP_MAX_DROPS, budgets: int = 6) -> list[tuple[str, str, SearchResult]]:
    """The students a Pareto plot measures (pure): uniform specs, a sweep of --max-drop, and budget optima.

    Budgets are the uniform students' sizes (what search finds at the same
    size) and ``budgets + 1`` sizes spread evenly from the smallest student to
    the teacher. Entries of one kind with the same selection are listed once.
    """
    out: list[tuple[str, str, SearchResult]] = []
    for spec in uniform_specs:
        choice = {name: next(o for o in table.trained(name) if o.spec == spec) for name in table.options}
        out.append(("uniform", str(spec), SearchResult(table, choice, {"rule": "uniform", "spec": str(spec)})))
    for x in max_drops:
        out.append(("max-drop", f"max-drop={x:g}", greedy(table, x)))
    smallest, largest = smallest_size(table, kind), table.teacher_size[kind]
    limits = {r.size(kind) for _, _, r in out if r.rule["rule"] == "uniform"}
    if budgets > 0 and largest > smallest:
        limits |= {int(smallest + (largest - smallest) * k / budgets) for k in range(budgets + 1)}
    for limit in sorted(limits):
        if limit >= smallest:
            out.append(("budget", f"{kind}={limit}", solve_budget(table, Budget(kind, limit))))
    seen, unique = set(), []
    for entry in out:
        key = (entry[0], selection_key(entry[2]))
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    return unique


def selection_key(result: SearchResult) -> tuple:
    return tuple(sorted((name, o.label) for name, o in result.choice.items()))


def uniform_specs(table: QualityTable) -> list[Spec]:
    """Specs trained on every searched neighbourhood."""
    common: set[Spec] | None = None
    for name in table.options:
        specs = {o.spec for o in table.trained(name)}
        common = specs if common is None else common & specs
    return sorted(common or set(), key=lambda s: (s.width, -s.sparsity))


def run_sweep(ws: Workspace, teacher, table: QualityTable, data, heldout: HeldOut, calibrate: int,
              selected: SearchResult | None = None, selected_measured: dict | None = None,
              log: Callable[[str], None] = lambda message: None) -> list[SweepPoint]:
    """Measure the sweep's students by stitching each one (each distinct selection once); the teacher and the selected student come along."""
    points = [SweepPoint("teacher", "teacher", table.teacher_size["params"], table.teacher_size["flops"],
                         table.teacher_accuracy, table.teacher_accuracy, {})]
    entries = sweep_results(table, uniform_specs(table))
    cache: dict[tuple, dict] = {}
    if selected is not None:
        entries.append(("selected", "selected", selected))
        if selected_measured is not None:
            cache[selection_key(selected)] = selected_measured
    distinct, done = len({selection_key(r) for _, _, r in entries} - set(cache)), 0
    for kind, label, result in entries:
        key = selection_key(result)
        if key not in cache:
            done += 1
            log(f"[{done}/{distinct}] measuring {kind} {label}")
            cache[key] = measure_selection(ws, teacher, result.selection(), data, heldout, table.metric, calibrate)
        measured = cache[key]
        points.append(SweepPoint(kind, label, result.size("params"), result.size("flops"), result.predicted_accuracy,
                                 measured["accuracy"], {n: o.label for n, o in result.choice.items()}))
    return points


def write_pareto(ws: Workspace, points: Sequence[SweepPoint], table: QualityTable, title: str = "") -> dict[str, str]:
    """Write ``search/pareto.csv`` and ``search/pareto.png`` (parameters against accuracy); returns their paths."""
    import csv
    import io
    import json

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["kind", "label", "params", "flops", "predicted_accuracy", "measured_accuracy", "selection"])
    for p in points:
        writer.writerow([p.kind, p.label, p.params, p.flops, f"{p.predicted_accuracy:.6f}",
                         "" if p.measured_accuracy is None else f"{p.measured_accuracy:.6f}",
                         json.dumps(p.selection, sort_keys=True)])
    csv_path = ws.write_text(PARETO_CSV, buf.getvalue())
    png_path = ws.path(PARETO_PNG)
    plot_pareto(points, pareto_choices(table, "params"), table, png_path, title)
    return {"csv": str(csv_path), "png": str(png_path)}


def plot_pareto(points: Sequence[SweepPoint], frontier: Sequence[SearchResult], table: QualityTable, path,
                title: str = "") -> None:
    """Parameters (x) against accuracy in % (y): uniform students as a line, searched students as markers,
    the predicted frontier as a dashed step line, the teacher as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ndc.workspace import atomic_write

    metric = "agreement with the teacher" if table.metric == "agreement" else "accuracy"
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    if frontier:
        xs = [r.size("params") for r in frontier] + [table.teacher_size["params"]]
        ys = [100 * r.predicted_accuracy for r in frontier]
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", linestyle="--", color="0.6", linewidth=1, label="search, predicted (exact frontier)")
    uniform = sorted((p for p in points if p.kind == "uniform"), key=lambda p: p.params)
    if uniform:
        ax.plot([p.params for p in uniform], [100 * p.measured_accuracy for p in uniform], "o-", color="tab:blue",
                label="uniform spec, measured")
        for p in uniform:
            ax.annotate(p.label, (p.params, 100 * p.measured_accuracy), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color="tab:blue")
    styles = {"budget": ("s", "tab:green", "search --budget, measured"),
              "max-drop": ("^", "tab:orange", "search --max-drop, measured"),
              "selected": ("*", "tab:red", "this search, measured")}
    for kind, (marker, color, label) in styles.items():
        chosen = [p for p in points if p.kind == kind and p.measured_accuracy is not None]
        if chosen:
            ax.scatter([p.params for p in chosen], [100 * p.measured_accuracy for p in chosen], marker=marker,
                       color=color, s=110 if kind == "selected" else 40, zorder=3, label=label)
    teacher = next((p for p in points if p.kind == "teacher"), None)
    if teacher is not None:
        ax.scatter([teacher.params], [100 * teacher.measured_accuracy], marker="*", color="black", s=140, zorder=4,
                   label="teacher")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title or f"Student Search: parameters against {metric} ({table.examples} held-out examples)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)

"""The rules that choose one option per neighbourhood from a quality table: greedy (the paper's) and an exact
budget solver (multiple-choice knapsack); pure functions, no model runs here."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.search.table import DROP_DECIMALS, QualityTable, SearchResult, selection_key

FALLBACKS = ("teacher", "widest")
OBJECTIVES = ("divergence", "drop")
SWEEP_MAX_DROPS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


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
        best = min(trained, key=lambda o: (o.drop, o.params))
        if fallback == "widest":
            choice[name] = max(trained, key=lambda o: (o.params, o.flops, -o.drop))
            what = f"the widest trained candidate, {choice[name].spec} (drop {choice[name].drop:.2f})"
        else:
            choice[name] = table.teacher_option(name)
            what = "the teacher's neighbourhood"
        notes.append(f"{name}: no candidate has a drop below --max-drop {max_drop:g} (best {best.spec}, {best.drop:.2f} points); keeping {what}")
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


def objective_of(table: QualityTable, objective: str | None = None) -> str:
    """What a budget minimises: ``objective``, or by default the summed divergence from the teacher's outputs when
    the table has it for every option, else the summed drop."""
    if objective is None:
        return "divergence" if table.has_divergence else "drop"
    if objective not in OBJECTIVES:
        raise NdcError(f"unknown --objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if objective == "divergence" and not table.has_divergence:
        raise NdcError("--objective divergence: the quality table has no divergences measured; use --objective drop")
    return objective


def _groups(table: QualityTable, names: Sequence[str], kind: str, objective: str) -> list[list[tuple[int, float]]]:
    value = (lambda o: o.divergence) if objective == "divergence" else (lambda o: o.drop)
    return [[(o.size(kind), value(o)) for o in table.options[name]] for name in names]


def solve_budget(table: QualityTable, budget: Budget, objective: str | None = None) -> SearchResult:
    """One option per neighbourhood minimising the summed ``objective`` with the whole student within ``budget`` (exact).

    ``objective`` (see :func:`objective_of`): ``divergence``, each option's
    divergence from the teacher's outputs (the default when measured), or
    ``drop``, its drop in the metric (the paper's additive estimate). A drop
    counted in examples is coarse and noisy on a small held-out set, and many
    candidates tie with the teacher or even beat it there, so once those are
    in, summed drops see no gain in more width and a larger budget goes
    unused; the divergence keeps falling as candidates get closer to the
    teacher. Raises :class:`NdcError` naming the smallest achievable size
    when no choice fits.
    """
    objective = objective_of(table, objective)
    names = list(table.options)
    capacity = budget.limit - table.base[budget.kind]
    solved = solve_mckp(_groups(table, names, budget.kind, objective), capacity) if capacity >= 0 else None
    if solved is None:
        smallest = smallest_size(table, budget.kind)
        raise NdcError(f"no student fits {budget.kind} <= {budget.limit:,}: the smallest the trained candidates "
                       f"can make has {smallest:,} {budget.kind}; raise the budget or distil narrower candidates")
    picks, _, _ = solved
    choice = {name: table.options[name][k] for name, k in zip(names, picks)}
    return SearchResult(table, choice, {"rule": "budget", "budget": {"kind": budget.kind, "limit": budget.limit},
                                        "objective": objective})


def pareto_choices(table: QualityTable, kind: str = "params", objective: str | None = None) -> list[SearchResult]:
    """Every student on the exact frontier of size against the summed ``objective`` (see :func:`objective_of`),
    smallest first; with divergences measured, that is also the frontier of the predicted score."""
    objective = objective_of(table, objective)
    names = list(table.options)
    frontier = mckp_frontier(_groups(table, names, kind, objective))
    out = []
    for k in range(len(frontier)):
        picks = frontier.choice(k)
        choice = {name: table.options[name][i] for name, i in zip(names, picks)}
        limit = table.base[kind] + int(frontier.costs[k])
        out.append(SearchResult(table, choice, {"rule": "budget", "budget": {"kind": kind, "limit": limit},
                                                "objective": objective}))
    return out


def sweep_results(table: QualityTable, uniform_specs: Sequence[Spec], kind: str = "params",
                  max_drops: Sequence[float] = SWEEP_MAX_DROPS, budgets: int = 6,
                  objective: str | None = None) -> list[tuple[str, str, SearchResult]]:
    """The students a Pareto plot measures (pure): uniform specs, a sweep of --max-drop, and budget optima (of
    ``objective``, see :func:`solve_budget`).

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
            out.append(("budget", f"{kind}={limit}", solve_budget(table, Budget(kind, limit), objective)))
    seen, unique = set(), []
    for entry in out:
        key = (entry[0], selection_key(entry[2]))
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    return unique



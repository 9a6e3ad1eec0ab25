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
source's fixed order. The score is any :class:`~ndc.scoring.Metric`:
accuracy against the labels by default, agreement with the teacher's own
predictions when the labels do not fit the teacher's output, the relative
output error for other heads. Its *drop* is how much worse that score is than
the teacher's, in percentage points (negative when the candidate does better
than the teacher). Measuring is cheap: one teacher pass per batch
captures every boundary, and each candidate runs only itself and the teacher
suffix after it. A fresh pass is used rather than the distill stage's
activation cache, whose fp16 copies would perturb exactly what is measured
and hold only the examples distillation validated on.

**Rules.** ``greedy``: per neighbourhood, the smallest trained candidate (by
parameters, then FLOPs) whose drop is below ``max_drop`` (the paper's rule);
when none is, the teacher's own neighbourhood (or, with
``fallback="widest"``, the widest trained candidate) and a note saying so.
``solve_budget``: one option per neighbourhood, the teacher's neighbourhood
always among them with drop 0, minimising the summed divergence from the
teacher's outputs (:class:`~ndc.scoring.Divergence`, measured in the same
pass; or with ``objective="drop"`` the summed drop) with the whole student's
parameters (or FLOPs) within the budget, solved exactly by
:func:`mckp_frontier`.

**Prediction.** A student's predicted score is the teacher's minus its
predicted drop: with divergences measured, the summed divergence times the
table's drop per unit of divergence (:attr:`QualityTable.drop_per_divergence`,
a least-squares fit through the origin over every candidate's own drop and
divergence); otherwise the summed drops (the paper's additive estimate,
appendix B.1). On the benchmarks the summed drops were far too optimistic
(candidates that tie with or beat the teacher on the held-out set add no
drop; docs/benchmarks.md). Search then stitches the student and measures it.

Sizes: a candidate's parameters are counted on its rebuilt module (non-zero
weights for sparse specs, since pruned weights are not stored in a sparse
format), FLOPs by :func:`ndc.metrics.count_flops` (dense). The whole student
is everything the search does not choose (kept neighbourhoods and any
parameters outside every neighbourhood, ``table.base``) plus the chosen
options.

The package, by job: :mod:`~ndc.search.measure` (held-out set, quality,
stitched students), :mod:`~ndc.search.table` (the quality table and a
result), :mod:`~ndc.search.solvers` (greedy, budget, Pareto frontier),
:mod:`~ndc.search.files` (selection.json, pareto.csv),
:mod:`~ndc.search.plots` (the sweep and its plot).
"""

from ndc.search.files import PARETO_CSV, PARETO_PNG, selection_document, write_pareto, write_selection
from ndc.search.measure import (QUALITY, SEARCH_DIR, HeldOut, Quality, candidate_size, load_candidates, measure_quality,
                                measure_selection, quality_key, quality_table)
from ndc.search.plots import SweepPoint, plot_pareto, run_sweep
from ndc.search.solvers import (FALLBACKS, OBJECTIVES, SWEEP_MAX_DROPS, Budget, Frontier, greedy, mckp_frontier,
                                objective_of, pareto_choices, parse_budget, smallest_size, solve_budget, solve_mckp,
                                sweep_results)
from ndc.search.table import (DROP_DECIMALS, QUALITY_FORMAT, Option, QualityTable, SearchResult, build_table,
                              selection_key, uniform_specs)

__all__ = [
    "DROP_DECIMALS", "FALLBACKS", "OBJECTIVES", "PARETO_CSV", "PARETO_PNG", "QUALITY", "QUALITY_FORMAT", "SEARCH_DIR",
    "SWEEP_MAX_DROPS", "Budget", "Frontier", "HeldOut", "Option", "Quality", "QualityTable", "SearchResult", "SweepPoint",
    "build_table", "candidate_size", "greedy", "load_candidates", "mckp_frontier", "measure_quality",
    "measure_selection", "objective_of", "pareto_choices", "parse_budget", "plot_pareto", "quality_key", "quality_table", "run_sweep",
    "selection_document", "selection_key", "smallest_size", "solve_budget", "solve_mckp", "sweep_results",
    "uniform_specs", "write_pareto", "write_selection",
]

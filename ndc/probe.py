"""The thresholding-effect probe (the paper's section 3, Figure 1): how much local error a network tolerates.

Gaussian noise of amplitude ε is added to the output of one neighbourhood,
``S_i = T_i + δ, δ ~ N(0, ε²)`` element-wise, or to the outputs of all of them
at once, and the teacher's score on the held-out set is measured over a sweep
of ε. ``relative=True`` scales the noise at each boundary by the standard
deviation of the teacher's activation there (one number per boundary, over
the held-out set), so ε = 0.1 means "noise a tenth the size of the signal"
everywhere.

Invariants:

* ε = 0 gives exactly the teacher's score (the noise is ``0 · z``, which adds
  nothing, and the same parts run on the same inputs), so a drop at ε = 0 is
  exactly 0;
* the noise is fixed by ``seed``: each (boundary, batch) draws one standard
  normal tensor ``z`` from its own generator, and every ε scales that same
  ``z`` (common random numbers), so curves are smooth in ε and the
  single-neighbourhood and ``all`` curves see the same noise at a boundary.

The *threshold* of a curve is the largest ε of the sweep such that the drop
stays below ``tolerance`` points (0.5 by default) at that ε and every smaller
one.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ndc.chain import run_parts
from ndc.errors import NdcError
from ndc.scoring import Metric, as_metric
from ndc.search import HeldOut

ALL = "all"
PROBE_DIR = "probe"
DEFAULT_EPS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass
class ProbeResult:
    """Scores over the sweep: ``curves[target][k]`` is the score with noise ``eps[k]`` at ``target`` (a neighbourhood or ``all``)."""

    eps: list[float]
    relative: bool
    metric: str
    examples: int
    baseline: float
    scales: dict[str, float]  # standard deviation of the teacher's activation at each perturbed neighbourhood's output
    curves: dict[str, list[float]]
    tolerance: float = 0.5
    seed: int = 0
    thresholds: dict[str, float] = field(default_factory=dict)
    capped: list[str] = field(default_factory=list)  # curves that stayed under the tolerance over the whole sweep
    threshold_of_metric: float | None = None  # the metric's multi-label threshold (see ndc.scoring.Metric)

    @property
    def score(self) -> Metric:
        return Metric(self.metric, self.threshold_of_metric)

    def drops(self, target: str) -> list[float]:
        """How much worse than without noise at each ε: points for fractions, positive when worse."""
        return [self.score.drop(self.baseline, s) for s in self.curves[target]]

    def to_json(self) -> dict:
        return {
            "thresholds": self.thresholds,
            "curves": {t: [{"eps": e, "accuracy": s, "drop": d} for e, s, d in zip(self.eps, self.curves[t], self.drops(t))]
                       for t in self.curves},
            "eps": self.eps,
            "relative": self.relative,
            "tolerance": self.tolerance,
            "metric": self.metric,
            "examples": self.examples,
            "baseline": self.baseline,
            "scales": self.scales,
            "capped": self.capped,
            "seed": self.seed,
        }


def parse_eps(text: str | None) -> list[float]:
    """``"0,0.01,0.1,1"`` -> sorted unique amplitudes (non-negative); None -> :data:`DEFAULT_EPS`."""
    if text is None:
        return list(DEFAULT_EPS)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NdcError(f"bad --eps {text!r}: expected numbers separated by commas, e.g. 0,0.01,0.1,1") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise NdcError(f"bad --eps {text!r}: amplitudes must be finite and non-negative")
    return sorted(set(values))


def threshold(eps: Sequence[float], drops: Sequence[float], tolerance: float) -> tuple[float, bool]:
    """Largest ε with every drop up to it below ``tolerance``; and whether the whole sweep stayed below (a lower bound then).

    >>> threshold([0, 0.1, 1, 10], [0, 0.2, 3, 40], 0.5)
    (0.1, False)
    """
    best = None
    for e, d in zip(eps, drops):
        if round(d, 9) >= tolerance:  # a drop that prints as the tolerance counts as reaching it
            return (0.0 if best is None else best), False
        best = e
    return (0.0 if best is None else best), True


def standard_noise(shape: Sequence[int], seed: int, boundary: int, batch: int) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` from its own stream per (seed, boundary, batch), so the noise at a boundary never
    depends on what else is probed. (numpy's seed sequence mixes all three numbers; torch's CPU generator would keep
    only the low 32 bits of one combined seed.)"""
    rng = np.random.default_rng([seed, boundary, batch])
    return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))


@torch.no_grad()
def activation_scales(parts: Sequence[nn.Module], targets: Sequence[int], heldout: HeldOut) -> list[float]:
    """Standard deviation of the teacher's output of each part in ``targets`` over the held-out set (all elements pooled)."""
    sums = {i: [0.0, 0.0, 0] for i in targets}
    for x, _ in heldout.batches():
        values = run_parts(parts, x, keep=True)
        for i in targets:
            v = values[i + 1].double()
            acc = sums[i]
            acc[0] += float(v.sum())
            acc[1] += float((v * v).sum())
            acc[2] += v.numel()
    out = []
    for i in targets:
        s1, s2, n = sums[i]
        mean = s1 / max(n, 1)
        out.append(math.sqrt(max(s2 / max(n, 1) - mean * mean, 0.0)))
    return out


@torch.no_grad()
def probe(parts: Sequence[nn.Module], names: Sequence[str], heldout: HeldOut, *, targets: Sequence[str] | None = None,
          eps: Sequence[float] = DEFAULT_EPS, relative: bool = False, metric: Metric | str = "accuracy", seed: int = 0,
          tolerance: float = 0.5) -> ProbeResult:
    """Score of the teacher (``parts`` in order) with Gaussian noise at each target's output and at all of them, per ε.

    ``targets`` default to every neighbourhood in ``names``. The returned
    curves hold one score per ε for each target and for ``"all"``. Metrics
    that compare with the teacher (agreement, output error) compare with its
    output without noise.
    """
    metric = as_metric(metric)
    eps = [float(e) for e in eps]
    if not eps:
        raise NdcError("give at least one noise amplitude")
    targets = list(names if targets is None else targets)
    index = {n: k for k, n in enumerate(names)}
    for t in targets:
        if t not in index:
            raise NdcError(f"no neighbourhood named {t!r}; the plan has: {', '.join(names)}")
    if not targets:
        raise NdcError("nothing to probe: no neighbourhoods")
    for part in parts:
        part.eval()
    idx = [index[t] for t in targets]
    sigma = activation_scales(parts, idx, heldout) if relative else [1.0] * len(idx)
    scale = dict(zip(idx, sigma))
    tallies = {t: [metric.tally() for _ in eps] for t in [*targets, ALL]}
    baseline = metric.tally()
    total = 0
    for b, (x, y) in enumerate(heldout.batches()):
        values = run_parts(parts, x, keep=True)
        clean = values[-1]
        baseline.add(clean, clean, y)
        total += len(x)
        noise = {i: standard_noise(values[i + 1].shape, seed, i, b).to(values[i + 1].device, values[i + 1].dtype) for i in idx}
        for k, e in enumerate(eps):
            for t, i, s in zip(targets, idx, sigma):
                tallies[t][k].add(run_parts(parts, values[i + 1] + (e * s) * noise[i], i + 1), clean, y)
            h = x
            for j in range(len(parts)):
                h = run_parts(parts, h, j, j + 1)
                if j in scale:
                    h = h + (e * scale[j]) * noise[j]
            tallies[ALL][k].add(h, clean, y)
    if not total:
        raise NdcError("the held-out set is empty")
    result = ProbeResult(eps=eps, relative=relative, metric=metric.name, examples=total, baseline=baseline.result(),
                         scales={t: s for t, s in zip(targets, sigma)} if relative else {},
                         curves={t: [c.result() for c in counts] for t, counts in tallies.items()},
                         tolerance=tolerance, seed=seed, threshold_of_metric=metric.threshold)
    for t in result.curves:
        result.thresholds[t], capped = threshold(eps, result.drops(t), tolerance)
        if capped:
            result.capped.append(t)
    return result


# ------------------------------------------------------------------- files


def curves_csv(result: ProbeResult) -> str:
    """One row per (target, ε): target, eps, noise_std (the absolute amplitude used), accuracy, drop."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["target", "eps", "noise_std", "accuracy", "drop"])
    for target in result.curves:
        scale = result.scales.get(target) if result.relative else 1.0
        for e, s, d in zip(result.eps, result.curves[target], result.drops(target)):
            std = "" if scale is None else f"{e * scale:.6g}"
            writer.writerow([target, f"{e:g}", std, f"{s:.6f}", f"{d:.4f}"])
    return buf.getvalue()


def plot_curves(result: ProbeResult, path, title: str = "") -> None:
    """Figure 1 of the paper: accuracy change (points) against ε on a log axis, one curve per neighbourhood plus ``all``.

    ε = 0 is left off the log axis (its change is 0 by construction). The
    dotted line marks −tolerance, where the thresholds are read.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ndc.workspace import atomic_write

    keep = [k for k, e in enumerate(result.eps) if e > 0]
    xs = [result.eps[k] for k in keep]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    singles = [t for t in result.curves if t != ALL]
    cmap = plt.get_cmap("viridis")
    for n, target in enumerate(singles):
        color = cmap(n / max(len(singles) - 1, 1) * 0.9)
        changes = [-result.drops(target)[k] for k in keep]
        ax.plot(xs, changes, "-", marker=".", color=color, linewidth=1.2, alpha=0.9,
                label=f"{target} ({_threshold_text(result, target)})" if len(singles) <= 12 else None)
    ax.plot(xs, [-result.drops(ALL)[k] for k in keep], "-", marker="o", color="tab:red", linewidth=2.2,
            label=f"all neighbourhoods ({_threshold_text(result, ALL)})")
    ax.axhline(-result.tolerance, color="0.4", linestyle=":", linewidth=1, label=f"−{result.tolerance:g} points")
    ax.axhline(0, color="0.8", linewidth=0.8)
    if xs:
        ax.set_xscale("log")
    what = result.score.title
    ax.set_xlabel("noise amplitude ε" + (" (× each boundary's activation std)" if result.relative else ""))
    unit = "points, " if result.score.fraction else ""
    ax.set_ylabel(f"{what} change ({unit}negative is worse)" if what != "accuracy" else "accuracy change (points)")
    ax.set_title(title or f"Thresholding effect: {result.examples} held-out examples, "
                          f"teacher {result.score.format(result.baseline)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    if len(singles) > 12:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(singles) - 1))
        fig.colorbar(sm, ax=ax, label="neighbourhood (input → output)")
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(singles) > 6 else 1)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _threshold_text(result: ProbeResult, target: str) -> str:
    bound = ">= " if target in result.capped else ""
    return f"threshold {bound}{result.thresholds[target]:g}"


def write_probe(folder, result: ProbeResult, title: str = "") -> dict[str, str]:
    """Write ``curves.csv``, ``thresholds.png`` and ``probe.json`` into ``folder``; returns their paths."""
    from pathlib import Path

    from ndc.workspace import write_json_atomic, write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "curves.csv", "png": folder / "thresholds.png", "json": folder / "probe.json"}
    write_text_atomic(paths["csv"], curves_csv(result))
    plot_curves(result, paths["png"], title)
    write_json_atomic(paths["json"], result.to_json())
    return {k: str(v) for k, v in paths.items()}

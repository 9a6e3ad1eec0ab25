"""Time tracing and boundary analysis on large graphs, and check the analysis is linear.

    python benchmarks/bench_partition.py            # prints a table, writes benchmarks/results/partition.json

Graphs: a ResNet-152-sized bottleneck network (blocks 3, 8, 36, 3) and deep
residual MLPs of 250 to 2000 blocks. For each it reports the median of
``--repeats`` runs of: tracing (fx + two shape propagations), the analysis
(liveness, boundaries, the residual strategy's cuts and names), and building
the plan (extracting and measuring every neighbourhood). The analysis time
per node should stay flat as the graphs grow.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ndc.load import LoadedModel  # noqa: E402
from ndc.passes.partition import partition  # noqa: E402
from ndc.passes.trace import trace  # noqa: E402
from ndc.plan import build_plan  # noqa: E402
from ndc.zoo import residual_mlp, resnet152_like  # noqa: E402


def median_time(fn, repeats: int) -> tuple[float, float, float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times), result


def measure(name: str, model, shape, repeats: int) -> dict:
    trace_s, _, _, traced = median_time(lambda: trace(model, shape), repeats)
    analysis_s, lo, hi, part = median_time(lambda: partition(traced, by="residual"), repeats)
    plan_s, _, _, _ = median_time(lambda: build_plan(LoadedModel(model, {"kind": "bench"}), traced, part, {"by": "residual"}), 1)
    nodes = len(traced.gm.graph.nodes)
    return {
        "graph": name,
        "nodes": nodes,
        "neighbourhoods": len(part.segments),
        "trace_s": trace_s,
        "analysis_s": analysis_s,
        "analysis_min_s": lo,
        "analysis_max_s": hi,
        "analysis_us_per_node": 1e6 * analysis_s / nodes,
        "plan_s": plan_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "partition.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure("resnet152-like (3,8,36,3)", resnet152_like(), (1, 3, 32, 32), args.repeats)]
    for blocks in (250, 500, 1000, 2000):
        rows.append(measure(f"residual MLP, {blocks} blocks", residual_mlp(blocks), (1, 64), args.repeats))
    header = f"{'graph':<28} {'nodes':>6} {'nbhds':>6} {'trace s':>8} {'analysis ms':>12} {'us/node':>8} {'plan s':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['graph']:<28} {r['nodes']:>6} {r['neighbourhoods']:>6} {r['trace_s']:>8.2f} "
              f"{1e3 * r['analysis_s']:>12.1f} {r['analysis_us_per_node']:>8.1f} {r['plan_s']:>7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
                               "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

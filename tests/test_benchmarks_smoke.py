"""The benchmarks call ndc's internal APIs, which move: each runs here on tiny sizes so that a drift fails CI.

bench_pareto.py once failed at its first step (``ndc.distill._cache`` had
gained a parameter) and bench_pretrained.py at its last (``ndc kd``'s history
entries lost ``accuracy`` under a task metric), each found only when the long
benchmark was next run. Here bench_pareto's ``run`` (every route, search,
``timing``), bench_search's ``run``, and bench_paper's table1, table3a and
table5 run end to end on a few hundred digits with tiny teachers, and
report.py renders what they wrote. Each runs in a subprocess (as
test_fake_cuda.py runs bench_gpu) with its teachers, workspaces and result
files under ``tmp_path`` (``NDC_BENCH_CACHE``, ``NDC_BENCH_RESULTS``); the
measurements themselves mean nothing at these sizes.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHMARKS = ROOT / "benchmarks"

PREAMBLE = """
import argparse, runpy, sys
sys.path.insert(0, {benchmarks!r})
import torch
torch.set_num_threads(1)
torch.set_num_threads = lambda n: None  # the benchmarks ask for the 2-core machine's 2 threads
import common
common.DATA = "digits"  # scikit-learn's, bundled: nothing to download
"""

PARETO = PREAMBLE + """
import bench_pareto, bench_search
bench_pareto.DATA = "digits"
# ndc demo's ResNet-14 on 8x8 digits, its teacher trained for 1 epoch on 128 images
bench_pareto.MODELS = {{"tiny": ("ndc.zoo:demo_teacher", "tiny-digits", 1, 128, (1, 1, 8, 8))}}
args = argparse.Namespace(examples=128, epochs=1, workers=1, timing_repeats=1)
bench_pareto.run("tiny", args)
result = bench_search.run("tiny", args)
assert len(result["points"]["divergence"]) == len(bench_pareto.BUDGETS), result["points"]
"""

PAPER = PREAMBLE + """
for table in ("table1", "table3a", "table5"):
    sys.argv = ["bench_paper.py", table, "--examples", "128", "--teacher-examples", "128", "--epochs", "1",
                "--nd-epochs", "1", "--ft-epochs", "1", "--workers", "1", "--widths", "0.5", "--sparsities", "0.5", "--no-ce"]
    runpy.run_path({benchmarks!r} + "/bench_paper.py", run_name="__main__")
runpy.run_path({benchmarks!r} + "/report.py", run_name="__main__")
"""


def _run(code: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NDC_BENCH_CACHE": str(tmp_path / "cache"),
           "NDC_BENCH_RESULTS": str(tmp_path / "results")}
    r = subprocess.run([sys.executable, "-c", code.format(benchmarks=str(BENCHMARKS))], env=env, capture_output=True,
                       text=True, timeout=600, check=False, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def test_bench_pareto_and_bench_search_run_on_tiny_sizes(tmp_path):
    _run(PARETO, tmp_path)
    pareto = json.loads((tmp_path / "results" / "pareto-tiny.json").read_text())
    assert set(pareto["points"]) == {"teacher", "uniform", "search", "slim-chain", "slim-none", "gates"}
    assert pareto["timing"]["ratio"] > 0 and pareto["quality"]
    assert not (BENCHMARKS / "results" / "pareto-tiny.json").exists()  # nothing written into the real results


def test_bench_paper_tables_run_on_tiny_sizes_and_report_renders_them(tmp_path):
    r = _run(PAPER, tmp_path)
    for name in ("paper-table1-0.5.json", "paper-table3a.json", "paper-table5.json"):
        assert json.loads((tmp_path / "results" / name).read_text())["rows"], name
    assert "### Table 1" in r.stdout and "### Table 3a" in r.stdout, r.stdout[-2000:]

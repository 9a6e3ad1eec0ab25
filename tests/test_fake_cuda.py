"""The GPU code paths, run on a simulated CUDA device (tests/fakecuda.py): no test may need a GPU, and none ran there.

A review found two crashes that only a GPU would have shown (labels on the
device scored against host outputs in every training loop's first evaluation;
the FLOPs of a student on the device counted with a host input when the first
candidate was published); both would have ended the lent GPU's one
benchmark run before it wrote anything. Here the benchmark's whole pipeline
(teacher training, ``kd``, fused ``distill`` from a device-resident cache,
``stitch``, ``finetune``) runs with every tensor "on cuda" and must not mix
devices anywhere.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

RUN = """
import runpy, sys
sys.path[:0] = [{tests!r}, {benchmarks!r}]
import torch
torch.set_num_threads(1)
import fakecuda
fakecuda.install()
sys.argv = ["bench_gpu.py", *{argv!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    for message, stack in fakecuda.LOG[:2]:
        print("FAKECUDA:", message, stack, file=sys.stderr)
assert not fakecuda.LOG  # a device error some fallback caught is still an error
"""


def test_the_gpu_benchmark_runs_end_to_end_on_a_simulated_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--device", "cuda", "--data", "digits", "--examples", "256", "--teacher-examples", "256", "--teacher-epochs", "1",
            "--nd-epochs", "1", "--finetune-epochs", "1", "--kd-epochs", "2", "--compile", "none", "--out", str(out)]
    code = RUN.format(tests=str(HERE), benchmarks=str(ROOT / "benchmarks"), argv=argv, script=str(ROOT / "benchmarks/bench_gpu.py"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NDC_BENCH_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FAKECUDA" not in r.stderr, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "FakeCUDA H100" and doc["headline_compile"] == "none"
    run = doc["by_compile"]["none"]
    assert "error" not in run, run.get("traceback")
    for key in ("kd_seconds_to_target", "nd_epoch_seconds", "kd_epoch_seconds", "nd_epoch_over_kd_epoch", "speedup"):
        assert key in doc, key
    assert run["nd"]["engine"] == "fused" and len(run["nd"]["final_errors"]) == 9


COMMANDS = """
import sys
sys.path[:0] = [{tests!r}]
import torch
torch.set_num_threads(1)
import fakecuda
fakecuda.install()
from ndc.cli import main
for args in {commands!r}:
    print("RUNNING", args[0], file=sys.stderr, flush=True)
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
assert not fakecuda.LOG, fakecuda.LOG[:2]  # a device error some fallback caught is still an error
"""


def _on_a_simulated_gpu(commands: list[list[str]], cwd) -> subprocess.CompletedProcess:
    """Run ndc ``commands`` in one process with the simulated GPU."""
    code = COMMANDS.format(tests=str(HERE), commands=commands)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False,
                       cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FAKECUDA" not in r.stderr and r.stderr.count("RUNNING") == len(commands), r.stderr[-3000:]
    return r


def test_every_stage_runs_with_device_cuda_on_a_simulated_gpu(ws, tmp_path):
    data = ["--data", "digits", "--limit", "200"]
    fast = ["--steps", "12", "--batch-size", "32", "--val-size", "64", "--quiet", "--device", "cuda"]
    commands = [["distill", "--width", "0.75", "--data-free", *fast],
                ["distill", "--width", "0.5", *data, *fast, "--source", "recompute"],
                ["distill", "--width", "0.5,0.25", *data, *fast, "--lookahead", "1", "--force"],
                ["stitch", "-o", "s.onnx", "--width", "0.5", "--device", "cuda"],
                ["eval", "--device", "cuda"],
                ["finetune", "--epochs", "1", "--device", "cuda"],
                ["kd", "--epochs", "1", "--width", "0.5", "--device", "cuda"],
                ["search", "--budget", "params=60%", "--eval-size", "64", "--device", "cuda"],
                ["probe", "--eps", "0.1", "--eval-size", "64", "--device", "cuda"]]
    _on_a_simulated_gpu([[*args, "-w", str(ws)] for args in commands], tmp_path)
    assert (tmp_path / "s.onnx").is_file() and (ws / "selection.json").is_file()


def test_the_demo_runs_with_device_cuda_on_a_simulated_gpu(tmp_path):
    r = _on_a_simulated_gpu([["demo", "--quick", "--data", "digits", "--workers", "1", "--device", "cuda", "--format", "json",
                              "-w", str(tmp_path / "demo")]], tmp_path)
    doc = json.loads(r.stdout)
    assert doc["device"] == "cuda" and doc["finetuned"]["max_abs_diff"] < 1e-3 and doc["kd_baseline"]["epochs"] >= 1


# ---------------------------------------------------------- GPU-only pieces, run on the CPU directly


def test_an_fp16_step_in_which_every_candidate_failed_does_not_crash_the_unit():
    import torch

    from ndc.distill.engine import Precision

    precision = Precision("fp16", "cpu")
    w = torch.nn.Parameter(torch.ones(2))
    precision.backward((w * 2).sum())
    precision.step([])  # no optimiser stepped: GradScaler.update() raised "No inf checks were recorded"


def test_unlabelled_data_can_be_held_in_device_memory(tmp_path):
    import numpy as np

    from ndc.data import open_data
    from ndc.devicedata import DeviceData

    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    data = DeviceData(open_data(str(tmp_path / "x.npz"), (8,)), "cpu")  # torch.cat of None labels raised
    x, y = next(data.batches("train", 16, shuffle=True))
    assert x.shape == (16, 8) and y is None

"""The two engines: fused training gives the students independent jobs give, the same artefacts, and resumes."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ndc.workspace import sha256_file
from tests.conftest import distill_json as distill

HERE = pathlib.Path(__file__).resolve().parent
FAST = ["--data", "digits", "--limit", "200", "--steps", "24", "--batch-size", "32", "--val-size", "64", "--quiet"]


def errors(doc) -> dict:
    return {(row["neighbourhood"], row["spec"]): row["final_error"] for row in doc["candidates"]}


@pytest.mark.parametrize("source", ["cache", "recompute", "noise"])
def test_fused_students_are_as_good_as_independent_jobs(run_cli, ws, tmp_path, source):
    other = tmp_path / "other"
    shutil.copytree(ws, other)
    args = ["--width", "0.25,0.5", *FAST, "--lookahead", "1", "--source", source]
    r, jobs = distill(run_cli, *args, "--engine", "jobs")
    assert r.exit_code == 0, r.stderr
    r, fused = distill(run_cli, *args, "--engine", "fused", "-w", str(other))
    assert r.exit_code == 0, r.stderr
    assert fused["engine"] == "fused" and jobs["engine"] == "jobs"
    assert all(row["status"] == "done" and row["engine"] == "fused" for row in fused["candidates"])
    for key, error in errors(fused).items():
        assert error <= 1.1 * errors(jobs)[key], (key, error, errors(jobs)[key])  # held-out error within 10%
    # the same artefacts: same files per candidate, and stitch takes either
    names = lambda root: sorted(str(p.relative_to(root)) for p in root.glob("jobs/*/*/*"))  # noqa: E731
    assert names(ws) == names(other)
    for root in (ws, other):
        r = run_cli("stitch", "-o", str(root / "s.onnx"), "--width", "0.5", "-w", str(root))
        assert r.exit_code == 0, r.stderr


def test_fused_shards_give_the_same_students_as_one_unit(run_cli, ws, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ws, other)
    r, one = distill(run_cli, "--width", "0.5,1.0", *FAST, "--engine", "fused")
    assert r.exit_code == 0, r.stderr
    r, two = distill(run_cli, "--width", "0.5,1.0", *FAST, "--engine", "fused", "--workers", "2", "-w", str(other))
    assert r.exit_code == 0, r.stderr
    assert two["workers"] == 2
    for p in ws.glob("jobs/*/*/weights.safetensors"):
        assert sha256_file(p) == sha256_file(other / p.relative_to(ws))  # batch order is the run's, not the shard's


def test_engine_is_part_of_the_key(run_cli, ws):
    assert distill(run_cli, "--width", "0.5", *FAST, "--engine", "jobs")[0].exit_code == 0
    _, doc = distill(run_cli, "--width", "0.5", *FAST, "--engine", "jobs")
    assert {row["status"] for row in doc["candidates"]} == {"skipped"}
    _, doc = distill(run_cli, "--width", "0.5", *FAST, "--engine", "fused")
    assert {row["status"] for row in doc["candidates"]} == {"done"}


def test_a_killed_fused_run_redoes_only_unfinished_candidates(run_cli, ws):
    # width 0.5 finishes first; then a fused run of 0.25 and 0.5 is killed after its first checkpoint
    long = ["--engine", "fused", "--data", "digits", "--limit", "200", "--steps", "600", "--evals", "2", "--batch-size", "32",
            "--val-size", "64", "--checkpoint-every", "1", "--quiet"]
    assert distill(run_cli, "--width", "0.5", *long)[0].exit_code == 0
    finished = {p: p.stat().st_mtime_ns for p in ws.glob("jobs/*/width-0.5/metrics.json")}
    args = [sys.executable, "-m", "ndc", "distill", "--width", "0.25,0.5", *long, "-w", str(ws), "--format", "json"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(ws.glob("jobs/*/.width-0.25.checkpoint.safetensors"))) == 3:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = list(ws.glob("jobs/*/.width-0.25.checkpoint.safetensors"))
    assert len(checkpoints) == 3, "the run should be killed after its first checkpoint"
    assert not list(ws.glob("jobs/*/width-0.25/metrics.json"))
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["candidates"]
    assert {(r["spec"], r["status"]) for r in rows} == {("width=0.5", "skipped"), ("width=0.25", "done")}
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime  # finished candidates were not redone
    for row in rows:
        if row["spec"] == "width=0.25":
            assert row["steps"] == 600
            metrics = json.loads((ws / "jobs" / row["neighbourhood"] / "width-0.25" / "metrics.json").read_text())
            assert metrics["resumed_from"] > 0  # continued from the checkpoint, not from step 0
    assert not list(ws.glob("jobs/*/.*.checkpoint.safetensors"))  # published candidates drop their checkpoints


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_students_match_full_precision(run_cli, ws, precision):
    r, full = distill(run_cli, "--width", "0.5", *FAST, "--engine", "fused")
    assert r.exit_code == 0, r.stderr
    r, mixed = distill(run_cli, "--width", "0.5", *FAST, "--engine", "fused", "--precision", precision)
    assert r.exit_code == 0, r.stderr
    assert {row["status"] for row in mixed["candidates"]} == {"done"}  # another precision, another key: retrained
    for key, error in errors(mixed).items():
        assert error <= 1.1 * errors(full)[key] and error < 0.9 * next(
            row["initial_error"] for row in mixed["candidates"] if (row["neighbourhood"], row["spec"]) == key)


def test_every_stage_takes_device_and_says_when_there_is_no_gpu(run_cli, ws):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for args in (["distill", "--width", "0.5", *FAST], ["stitch", "-o", "s.onnx", "--width", "1.0"],
                 ["finetune", "--data", "digits"], ["kd", "--width", "0.5", "--data", "digits"], ["eval", "--data", "digits"],
                 ["search", "--data", "digits"], ["probe", "--data", "digits"], ["demo", "--quick"]):
        r = run_cli(*args, "--device", "cuda")
        assert r.exit_code == 1, (args, r.stderr)
        assert r.stderr.startswith("Error: --device cuda: no CUDA GPU is visible") and r.stderr.count("\n") == 1, r.stderr
    r = run_cli("distill", "--width", "0.5", *FAST, "--device", "tpu")
    assert r.exit_code == 1 and "unknown --device 'tpu'" in r.stderr


def test_in_a_fused_unit_one_failing_candidate_fails_alone(ws, monkeypatch):
    from ndc.backends import make_backend
    from ndc.distill import DistillConfig, run_distill
    from ndc.distill.trainer import CandidateTrainer
    from ndc.ir import Spec
    from ndc.workspace import Workspace

    real_loss = CandidateTrainer.loss

    def poisoned(self, batch):
        loss = real_loss(self, batch)
        return loss * float("nan") if self.spec.width == 0.25 and self.name == "layer2.0" else loss

    monkeypatch.setattr(CandidateTrainer, "loss", poisoned)
    cfg = DistillConfig(data="digits", limit=200, steps=24, batch_size=32, val_size=64, engine="fused")
    rows = run_distill(Workspace(ws), [Spec(width=0.25), Spec(width=0.5)], cfg, make_backend("local"))
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["neighbourhood"], r["spec"]) for r in failed] == [("layer2.0", "width=0.25")]
    assert "the loss became nan" in failed[0]["error"]
    done = [r for r in rows if r["status"] == "done"]
    assert len(done) == 5 and all(r["final_error"] < r["initial_error"] for r in done)


def test_in_a_fused_unit_a_candidate_that_stops_early_is_published_at_once(ws, monkeypatch):
    from ndc.backends import make_backend
    from ndc.distill import DistillConfig, run_distill
    from ndc.distill.trainer import CandidateTrainer
    from ndc.ir import Spec
    from ndc.workspace import Workspace

    real_evaluate = CandidateTrainer.evaluate

    def stalls(self, heldout):  # width 1.0 students never improve on the teacher: they stop after `patience` evaluations
        real_evaluate(self, heldout if self.spec.width != 1.0 else {**heldout, "mse": heldout["mse"] + 1.0})

    monkeypatch.setattr(CandidateTrainer, "evaluate", stalls)
    cfg = DistillConfig(data="digits", limit=200, steps=60, evals=20, patience=2, batch_size=32, val_size=64, engine="fused")
    rows = run_distill(Workspace(ws), [Spec(width=0.5), Spec(width=1.0)], cfg, make_backend("local"))
    for r in rows:
        assert r["status"] == "done"
        if r["spec"] == "width=1.0":
            assert r["stopped_early"] and r["steps"] == 6 and r["final_error"] < 1e-3  # kept its best (the teacher's) weights
        else:
            assert not r["stopped_early"] and r["steps"] == 60


@pytest.mark.parametrize("engine", ["fused", "jobs"])
def test_compiled_training_gives_the_eager_students_and_shares_their_key(run_cli, ws, tmp_path, engine):
    other = tmp_path / "other"
    shutil.copytree(ws, other)
    first = next(nb["name"] for nb in json.loads((ws / "plan.json").read_text())["neighbourhoods"] if not nb["kept"])  # one block
    args = ["--width", "0.5", *FAST, "--lookahead", "1", "--engine", engine, "--only", first]
    r, eager = distill(run_cli, *args)
    assert r.exit_code == 0, r.stderr
    r, compiled = distill(run_cli, *args, "--compile", "default", "-w", str(other))
    assert r.exit_code == 0, r.stderr
    assert {row["status"] for row in compiled["candidates"]} == {"done"}
    for key, error in errors(compiled).items():  # the same training: equal up to float rounding
        assert error == pytest.approx(errors(eager)[key], rel=1e-3), key
    _, again = distill(run_cli, *args, "--compile", "default")  # how it runs is not what it makes: already done
    assert {row["status"] for row in again["candidates"]} == {"skipped"}


def test_compile_choices_of_the_cli_are_the_trainers():
    from ndc.commands.common import COMPILE_CHOICES
    from ndc.training import COMPILE_MODES

    assert COMPILE_CHOICES == COMPILE_MODES


def test_a_cache_held_in_memory_gives_the_students_of_the_memory_mapped_one(ws, tmp_path, monkeypatch):
    # On a GPU the cache is held in device memory by default (--source cache); here in host memory, the same path.
    from ndc.backends import make_backend
    from ndc.distill import DistillConfig, run_distill
    from ndc.distill import sources
    from ndc.ir import Spec
    from ndc.workspace import Workspace

    other = tmp_path / "other"
    shutil.copytree(ws, other)
    storages = []
    real_rows = sources.ResidentArrays.rows

    def rows(self, name, split, idx):
        if split == "train":
            storages.append(idx._base)  # a view of a tensor on the device: a NumPy array would be copied every step
        return real_rows(self, name, split, idx)

    monkeypatch.setattr(sources.ResidentArrays, "rows", rows)
    cfg = DistillConfig(data="digits", limit=200, steps=24, batch_size=32, val_size=64, engine="fused", source="cache")
    mapped = run_distill(Workspace(ws), [Spec(width=0.5)], cfg, make_backend("local"), memory_budget=0)
    assert not storages
    held = run_distill(Workspace(other), [Spec(width=0.5)], cfg, make_backend("local"), memory_budget=1 << 30)
    assert len({id(t) for t in storages}) == -(-24 // -(-200 // 32))  # the batch indices go to the device once per epoch, not per step
    assert [r["status"] for r in held] == [r["status"] for r in mapped] and {r["status"] for r in held} == {"done"}
    for p in ws.glob("jobs/*/*/weights.safetensors"):
        assert sha256_file(p) == sha256_file(other / p.relative_to(ws))


def test_a_fused_units_candidates_split_its_time_by_cost(ws, monkeypatch):
    """Each candidate's ``seconds`` is its share of the unit's wall time (FLOPs x steps): they add up to the unit."""
    from ndc.backends import make_backend
    from ndc.distill import DistillConfig, engine, run_distill
    from ndc.ir import Spec
    from ndc.workspace import Workspace

    walls = []
    real = engine.run_unit

    def timed(unit, progress=None):
        start = time.perf_counter()
        try:
            return real(unit, progress)
        finally:
            walls.append(time.perf_counter() - start)

    monkeypatch.setattr(engine, "run_unit", timed)
    # (no early stopping: a candidate that stops sooner is charged less, whatever its cost)
    cfg = DistillConfig(data="digits", limit=200, steps=40, batch_size=32, val_size=64, engine="fused", patience=1000)
    rows = run_distill(Workspace(ws), [Spec(width=0.25), Spec(width=1.0)], cfg, make_backend("local"))
    assert len(walls) == 1 and all(r["status"] == "done" and not r["stopped_early"] for r in rows)
    total = sum(r["seconds"] for r in rows)
    assert 0.7 * walls[0] <= total <= walls[0], (total, walls)
    by_width: dict = {}
    for r in rows:
        by_width[r["spec"]] = by_width.get(r["spec"], 0.0) + r["seconds"]
    assert by_width["width=1.0"] > by_width["width=0.25"]

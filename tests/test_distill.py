"""`ndc distill`: independent jobs, sources, losses, backends, resume, and failure handling."""

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
import torch

from ndc.commands.common import human
from ndc.workspace import Workspace, sha256_file
from tests.conftest import distill_json as distill

HERE = pathlib.Path(__file__).resolve().parent
FAST = ["--data", "digits", "--limit", "200", "--steps", "12", "--batch-size", "32", "--val-size", "64", "--quiet"]


def test_width_half_improves_and_width_one_stays_at_zero(run_cli, ws):
    r, doc = distill(run_cli, "--width", "0.5,1.0", *FAST)
    assert r.exit_code == 0, r.stderr
    rows = doc["candidates"]
    assert len(rows) == 6 and {row["status"] for row in rows} == {"done"}
    for row in rows:
        assert {"neighbourhood", "spec", "status", "initial_error", "final_error", "seconds"} <= set(row)
        if row["spec"] == "width=0.5":
            assert row["final_error"] < row["initial_error"], row
        else:
            assert row["initial_error"] < 1e-3 and row["final_error"] < 1e-3, row
    assert doc["source"] == "cache"
    for row in rows:
        folder = ws / "jobs" / row["neighbourhood"] / row["spec"].replace("=", "-")
        assert {p.name for p in folder.iterdir()} >= {"weights.safetensors", "metrics.json", "student.json"}
    manifest = json.loads((ws / "manifest.json").read_text())
    assert sum(1 for j in manifest["jobs"].values() if j["status"] == "done") == 6


def test_resnet20_acceptance(run_cli, tmp_path):
    """The issue's criterion on ResNet-20 with a few hundred real images."""
    from ndc.zoo import resnet20
    from tests.conftest import calibrated_weights

    weights = calibrated_weights(resnet20(), (3, 32, 32), tmp_path / "r20.safetensors")
    assert run_cli("partition", "ndc.zoo:resnet20", "--weights", weights, "--input-shape", "1,3,32,32").exit_code == 0
    r, doc = distill(run_cli, "--width", "0.5,1.0", "--data", "digits", "--limit", "200", "--steps", "15",
                     "--batch-size", "32", "--val-size", "64", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert len(doc["candidates"]) == 18
    for row in doc["candidates"]:
        if row["spec"] == "width=0.5":
            assert row["final_error"] < row["initial_error"], row
        else:
            assert row["initial_error"] < 1e-3 and row["final_error"] < 1e-3, row


def test_rerun_skips_finished_jobs_and_redoes_corrupt_ones(run_cli, ws):
    assert distill(run_cli, "--width", "0.5", *FAST)[0].exit_code == 0
    weights = ws / "jobs" / "layer1.0" / "width-0.5" / "weights.safetensors"
    first = {p: sha256_file(p) for p in ws.glob("jobs/*/*/weights.safetensors")}
    _, doc = distill(run_cli, "--width", "0.5", *FAST)
    assert [row["status"] for row in doc["candidates"]] == ["skipped"] * 3
    weights.write_bytes(weights.read_bytes()[:100])  # corrupt one artefact
    _, doc = distill(run_cli, "--width", "0.5", *FAST)
    statuses = {row["neighbourhood"]: row["status"] for row in doc["candidates"]}
    assert statuses == {"layer1.0": "done", "layer2.0": "skipped", "layer3.0": "skipped"}
    assert sha256_file(weights) == first[weights]  # same seed, same result
    _, doc = distill(run_cli, "--width", "0.5", *FAST, "--force")
    assert [row["status"] for row in doc["candidates"]] == ["done"] * 3


def test_evals_sets_how_often_each_job_is_measured_on_held_out_inputs(run_cli, ws):
    r, doc = distill(run_cli, "--width", "0.5", *FAST, "--evals", "4", "--patience", "100")
    assert r.exit_code == 0, r.stderr
    jobs = list(ws.glob("jobs/*/*/metrics.json"))
    assert len(jobs) == len(doc["candidates"]) == 3
    for metrics in jobs:
        history = json.loads(metrics.read_text())["history"]
        assert [h["step"] for h in history] == [3, 6, 9, 12]  # 12 steps, measured every 12 / 4


def test_a_changed_configuration_redoes_the_jobs(run_cli, ws):
    assert distill(run_cli, "--width", "0.5", *FAST)[0].exit_code == 0
    _, doc = distill(run_cli, "--width", "0.5", *FAST, "--lr", "0.002")
    assert [row["status"] for row in doc["candidates"]] == ["done"] * 3


def test_killed_run_resumes_without_redoing_finished_jobs(ws, tmp_path):
    args = [sys.executable, "-m", "ndc", "distill", "--width", "0.25,0.5,0.75,1.0", "--data", "digits", "--limit", "200",
            "--steps", "60", "--batch-size", "32", "--val-size", "64", "-w", str(ws), "--format", "json", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    done_before = {}
    while time.time() < deadline:
        done_before = {p: p.stat().st_mtime_ns for p in ws.glob("jobs/*/*/metrics.json")  # not a job being
                       if not p.parent.name.startswith(".")  # published: its folder is renamed into place
                       and json.loads(p.read_text()).get("status") == "done"}
        if len(done_before) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(done_before) < 12, "the run should be killed part-way"
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["candidates"]
    assert len(rows) == 12 and all(r["status"] in ("done", "skipped") for r in rows)
    for path, mtime in done_before.items():
        assert path.stat().st_mtime_ns == mtime  # finished jobs were not redone
    skipped = sum(r["status"] == "skipped" for r in rows)
    assert skipped >= len(done_before)
    assert not list(ws.glob("jobs/**/.*.tmp"))  # a killed write's temporary file is cleared by the next run
    for metrics in ws.glob("jobs/*/*/metrics.json"):
        m = json.loads(metrics.read_text())
        assert sha256_file(metrics.parent / "weights.safetensors") == m["weights_sha256"]


def test_two_workers_give_the_same_artefacts_as_one(run_cli, ws, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ws, other)
    assert distill(run_cli, "--width", "0.5", *FAST)[0].exit_code == 0
    r, doc = distill(run_cli, "--width", "0.5", *FAST, "--workers", "2", "-w", str(other))
    assert r.exit_code == 0, r.stderr
    assert doc["workers"] == 2
    for p in ws.glob("jobs/*/*/weights.safetensors"):
        assert sha256_file(p) == sha256_file(other / p.relative_to(ws))


@pytest.mark.xdist_group("ray")
def test_ray_backend_produces_the_same_artefacts(run_cli, ws, tmp_path):
    pytest.importorskip("ray")
    other = tmp_path / "other"
    shutil.copytree(ws, other)
    assert distill(run_cli, "--width", "0.5", *FAST)[0].exit_code == 0
    r, doc = distill(run_cli, "--width", "0.5", *FAST, "--backend", "ray", "--workers", "2", "-w", str(other))
    assert r.exit_code == 0, r.stderr
    assert doc["backend"] == "ray" and [row["status"] for row in doc["candidates"]] == ["done"] * 3
    for p in ws.glob("jobs/*/*/weights.safetensors"):
        assert sha256_file(p) == sha256_file(other / p.relative_to(ws))


def test_a_ray_cluster_nobody_answers_at_is_one_line(run_cli, ws):
    pytest.importorskip("ray")
    r, _ = distill(run_cli, "--width", "0.5", *FAST, "--backend", "ray", "--address", "127.0.0.1:1")  # it hung
    assert r.exit_code == 1 and r.stderr.strip().endswith(
        "Error: cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused after at most 10s): is `ray start "
        "--head` running there, and the port open?"), r.stderr
    r, _ = distill(run_cli, "--width", "0.5", *FAST, "--backend", "ray", "--address", "head-node")
    assert r.exit_code == 1 and "bad --address 'head-node': give HOST:PORT" in r.stderr
    assert not list(ws.glob("jobs/*/*/weights.safetensors"))


def test_a_cache_on_disk_is_used_whatever_the_budget_for_writing_one(run_cli, ws):
    assert distill(run_cli, "--width", "0.5", *FAST)[1]["source"] == "cache"
    r, doc = distill(run_cli, "--width", "0.5", *FAST, "--force", "--cache-budget", "1K")  # recomputed: 3x slower
    assert r.exit_code == 0 and doc["source"] == "cache", r.stderr
    r, doc = distill(run_cli, "--width", "0.5", *FAST, "--force", "--cache-budget", "1K", "--val-size", "32")
    assert doc["source"] == "recompute"  # another cache would have to be written


def test_a_new_cache_deletes_the_least_recently_used_others_beyond_the_budget(run_cli, ws):
    args = ["--width", "0.5", "--data", "digits", "--steps", "4", "--batch-size", "32", "--val-size", "64", "--force"]
    caches = lambda: {p.name: sum(f.stat().st_size for f in p.iterdir()) for p in (ws / "cache").iterdir()}  # noqa: E731
    assert distill(run_cli, *args, "--limit", "200")[0].exit_code == 0
    (a, size_a), = caches().items()
    assert distill(run_cli, *args, "--limit", "300")[0].exit_code == 0
    (b, size_b), = ((k, v) for k, v in caches().items() if k != a)
    r, doc = distill(run_cli, *args, "--limit", "200")  # reused: now the most recently used
    assert doc["source"] == "cache" and "removed" not in r.stderr
    r, doc = distill(run_cli, *args, "--limit", "250", "--cache-budget", str(size_a + size_b - 1))
    assert r.exit_code == 0 and doc["source"] == "cache", r.stderr
    assert a in caches() and b not in caches() and len(caches()) == 2
    assert f"removed activation cache {b} (" in r.stderr and "to make room within --cache-budget" in r.stderr
    # a cache over the budget by itself (an explicit --source cache): deleting the others would not help, so none is
    r, doc = distill(run_cli, *args, "--limit", "150", "--source", "cache", "--cache-budget", "1K")
    assert r.exit_code == 0 and "removed" not in r.stderr and len(caches()) == 3, r.stderr


def test_recompute_source_needs_no_disk(run_cli, ws):
    r, doc = distill(run_cli, "--width", "0.5", *FAST, "--source", "recompute", "--cache-budget", "1G")
    assert r.exit_code == 0, r.stderr
    assert "--cache-budget sizes the activation cache, which --source recompute does not use; ignored" in r.stderr
    assert doc["source"] == "recompute" and not (ws / "cache").exists()
    assert all(row["final_error"] < row["initial_error"] for row in doc["candidates"])


def test_data_free_distillation(run_cli, ws):
    (ws / "data.json").write_text('{"data": "digits", "limit": 300, "normalize": true}')  # an earlier run's data
    r, doc = distill(run_cli, "--width", "0.5", "--data-free", "--limit", "256", "--steps", "12", "--batch-size", "32",
                     "--val-size", "64", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert not (ws / "data.json").exists()  # later stages are not told this run used data it did not
    assert doc["source"] == "noise"
    assert all(row["final_error"] < row["initial_error"] for row in doc["candidates"])
    r, doc = distill(run_cli, "--width", "0.5", "--source", "noise", "--noise", "matched", *FAST)
    assert r.exit_code == 0, r.stderr
    r, _ = distill(run_cli, "--width", "0.5", "--data-free", "--noise", "matched")
    assert r.exit_code == 1 and "--noise matched measures" in r.stderr


def test_lookahead(run_cli, ws):
    r, doc = distill(run_cli, "--width", "0.5", *FAST, "--lookahead", "2", "--alpha", "0.5")
    assert r.exit_code == 0, r.stderr
    assert all(row["final_error"] < row["initial_error"] for row in doc["candidates"])


def test_sparsity_reaches_the_target(run_cli, ws):
    from safetensors.torch import load_file

    r, doc = distill(run_cli, "--sparsity", "0.5", *FAST)
    assert r.exit_code == 0, r.stderr
    for row in doc["candidates"]:
        assert row["sparsity"] == pytest.approx(0.5, abs=0.02)
        weights = load_file(str(ws / "jobs" / row["neighbourhood"] / "sparsity-0.5" / "weights.safetensors"))
        convs = [v for k, v in weights.items() if k.endswith("weight") and v.dim() == 4]
        zero = sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs)
        assert zero == pytest.approx(0.5, abs=0.02)
    r = run_cli("stitch", "-o", "s.pt2", "--spec", "sparsity=0.5", "--calibrate", "0", "--format", "json")
    stitched = json.loads(r.stdout)
    assert stitched["params"] == stitched["teacher_params"] and stitched["nonzero_params"] < 0.75 * stitched["params"]
    r = run_cli("stitch", "-o", "s.pt2", "--spec", "sparsity=0.5", "--calibrate", "0")
    assert f"({human(stitched['nonzero_params'])} non-zero)" in r.stdout
    r = run_cli("distill", "--sparsity", "0.5", *FAST[:-1])  # the table says what 'error before' means here
    assert "(error before for sparsity=S, the dense start: the pruning ramps in during training)" in r.stdout


def test_non_finite_loss_fails_the_job_with_a_clear_message(run_cli, ws):
    (ws / "data.json").write_text('{"data": "digits", "limit": 300, "normalize": true}')  # an earlier run's data
    r, doc = distill(run_cli, "--width", "0.5", *FAST, "--lr", "1e30")
    assert r.exit_code == 1
    assert all(row["status"] == "failed" for row in doc["candidates"])
    assert "try a lower --lr" in doc["candidates"][0]["error"]
    assert "3 of 3 jobs failed" in r.stderr and r.stderr.strip().count("\n") == 0
    assert json.loads((ws / "data.json").read_text())["limit"] == 300  # no student came of this run's data
    r, doc = distill(run_cli, "--width", "0.5", *FAST)
    assert [row["status"] for row in doc["candidates"]] == ["done"] * 3
    assert json.loads((ws / "data.json").read_text())["limit"] == 200


def test_dry_run_previews_without_training(run_cli, ws):
    r, doc = distill(run_cli, "--width", "0.5", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert len(doc["candidates"]) == 3
    for row in doc["candidates"]:
        assert {"neighbourhood", "spec", "teacher_params", "student_params", "student_flops", "kept_dims"} <= set(row)
        assert row["student_params"] < row["teacher_params"]
    assert not (ws / "jobs").exists()
    text = run_cli("distill", "--width", "0.5", "--dry-run").stdout
    assert "layer1.0" in text


def test_user_errors(run_cli, ws, tmp_path):
    cases = [
        (["--width", "0.5"], "give --data SPEC"),
        (["--width", "2"], "width must be in (0, 1]"),
        (["--data", "digits"], "nothing to distil"),
        (["--width", "0.5", "--data", "digits", "--only", "stem"], "kept with the teacher"),
        (["--width", "0.5", "--data", "digits", "--only", "nope"], "no neighbourhood named 'nope'"),
        (["--width", "0.5", "--data-free", "--source", "cache"], "--data-free trains on noise"),
        (["--width", "0.5", "--data", "digits", "-w", str(tmp_path / "empty")], "no plan in workspace"),
    ]
    for args, needle in cases:
        r = run_cli("distill", *args)
        assert r.exit_code == 1, (args, r.stdout)
        assert needle in r.stderr and r.stderr.startswith("Error: "), (args, r.stderr)


def test_training_a_student_never_touches_the_teacher(ws):
    from ndc.distill import DistillConfig, run_distill
    from ndc.backends import make_backend
    from ndc.ir import Spec
    from ndc.plan import load_teacher

    w = Workspace(ws)
    teacher = load_teacher(w)
    before = {k: v.clone() for k, v in teacher.gm.state_dict().items()}
    cfg = DistillConfig(data="digits", limit=200, source="recompute", steps=5, batch_size=32, val_size=64)
    rows = run_distill(w, [Spec(width=1.0)], cfg, make_backend("local"), teacher=teacher)
    assert all(r["status"] == "done" for r in rows)
    assert all(torch.equal(before[k], v) for k, v in teacher.gm.state_dict().items())


def test_frozen_batch_norm_statistics_stay_the_teachers(run_cli, ws):
    from safetensors.torch import load_file

    teacher = load_file(str(ws / "teacher.safetensors"))
    folder = ws / "jobs" / "layer1.0" / "width-0.5"
    means = {}
    for mode in ("frozen", "batch"):
        r, _ = distill(run_cli, "--width", "0.5", *FAST, "--bn-stats", mode)
        assert r.exit_code == 0, r.stderr
        kept = json.loads((folder / "student.json").read_text())["record"]["dims"]["layer1.0.conv1.out_channels"]["kept"]
        means[mode] = (load_file(str(folder / "weights.safetensors"))["layer1.0.bn1.running_mean"],
                       teacher["layer1.0.bn1.running_mean"][kept])
    assert torch.equal(*means["frozen"])
    assert not torch.equal(*means["batch"])


def test_explicit_normalisation_reaches_the_jobs(run_cli, ws):
    r, doc = distill(run_cli, "--width", "0.5", *FAST, "--normalize", "0.5/0.25")
    assert r.exit_code == 0, r.stderr
    r2, doc2 = distill(run_cli, "--width", "0.5", *FAST)
    assert [row["status"] for row in doc2["candidates"]] == ["done"] * 3  # another normalisation, another key
    assert doc["candidates"][0]["initial_error"] != doc2["candidates"][0]["initial_error"]
    r, _ = distill(run_cli, "--width", "0.5", *FAST, "--normalize", "nonsense")
    assert r.exit_code == 2 and "--normalize" in r.stderr


def test_batch_norms_at_momentum_zero_learn_their_students_statistics(run_cli, tiny_teacher, tmp_path):
    """A teacher whose batch norms have momentum 0 still gives students running statistics that follow their weights."""
    from safetensors.torch import load_file

    ws = tmp_path / "ws"
    r = run_cli("partition", f"{HERE / 'models_for_tests.py'}:tiny_resnet_momentum_zero", "--weights", tiny_teacher,
                "--input-shape", "1,3,16,16", "-w", str(ws))
    assert r.exit_code == 0, r.stderr
    r = run_cli("distill", "--width", "0.5", *FAST, "-w", str(ws))
    assert r.exit_code == 0, r.stderr
    teacher = load_file(str(ws / "teacher.safetensors"))
    folder = ws / "jobs" / "layer1.0" / "width-0.5"
    kept = json.loads((folder / "student.json").read_text())["record"]["dims"]["layer1.0.conv1.out_channels"]["kept"]
    student = load_file(str(folder / "weights.safetensors"))
    assert not torch.equal(student["layer1.0.bn1.running_mean"], teacher["layer1.0.bn1.running_mean"][kept])


def test_track_running_stats_changes_only_norms_at_momentum_zero():
    from torch import nn

    from ndc.training import track_running_stats

    still, default, untracked = nn.BatchNorm1d(3, momentum=0.0), nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)
    cumulative = nn.BatchNorm1d(3, momentum=None)
    assert track_running_stats(nn.Sequential(still, default, untracked, cumulative)) == 1
    assert still.momentum == 0.1 and default.momentum == 0.1 and cumulative.momentum is None


def test_patience_zero_stops_at_the_first_evaluation_that_is_no_better():
    from ndc.training import BestWeights

    best = BestWeights(torch.nn.Linear(1, 1), None, patience=0)
    for error in (1.0, 0.5):  # improving: it went on (patience 0 stopped every job at its first evaluation)
        best.offer(error)
        assert not best.exhausted
    best.offer(0.7)
    assert best.exhausted

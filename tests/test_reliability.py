"""Never wrong, never stale, never a traceback: fault injection for every command that writes (issue 14).

Each test reproduces one way a user (or the machine) can hurt a workspace and
checks what the user sees: one line and a non-zero exit, or the right model,
and nothing finished lost.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from ndc.workspace import sha256_file
from tests.conftest import TINY_RESNET as TINY, cli_workspace, copy_of, descendants, running

HERE = pathlib.Path(__file__).resolve().parent
DATA = ["--data", "digits", "--limit", "300"]
FAST = [*DATA, "--steps", "8", "--batch-size", "32", "--val-size", "64", "--quiet"]
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent), "PYTHONDONTWRITEBYTECODE": "1"}


def ndc(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ndc", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=600, **kwargs)


def one_line_error(stderr: str) -> bool:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("warning:", "epoch ", "source:", "resuming", "data: "))]
    return len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr


@pytest.fixture(scope="module")
def stitched(tmp_path_factory, tiny_teacher):
    """A workspace with width 0.5 and 0.25 students distilled and the 0.5 one stitched on digits."""
    ws = tmp_path_factory.mktemp("rel") / "ws"
    return cli_workspace(ws, tiny_teacher, ["distill", "--width", "0.5,0.25", *FAST],
                         ["stitch", "-o", ws.parent / "s.onnx", "--width", "0.5", *DATA])


@pytest.fixture
def ws(stitched, tmp_path):
    return copy_of(stitched, tmp_path)


def json_of(r) -> dict:
    return json.loads(r.stdout)


# ---------------------------------------------------------------- 1. stale checkpoints


def test_finetune_never_resumes_a_checkpoint_of_another_student_or_data(run_cli, ws):
    first = run_cli("finetune", *DATA, "--epochs", "2", "--lr", "0.05", "--no-augment", "--format", "json")
    assert first.exit_code == 0, first.stderr
    # another student stitched: the old checkpoint is set aside, the new student is trained and reported
    assert run_cli("stitch", "-o", "s.onnx", "--width", "0.25", *DATA).exit_code == 0
    stitched = json.loads((ws / "student" / "report.json").read_text())
    r = run_cli("finetune", *DATA, "--epochs", "2", "--lr", "0.05", "--no-augment", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert "not resuming the checkpoint" in r.stderr and "resuming after" not in r.stderr
    doc = json_of(r)
    assert doc["initial_accuracy"] == pytest.approx(stitched["accuracy"])  # epoch 0 is the width-0.25 student
    assert [h["epoch"] for h in doc["history"]] == [1, 2]
    assert (ws / "finetune" / "checkpoint.stale.safetensors").is_file()
    # other data (another --limit): not resumed either
    r = run_cli("finetune", "--data", "digits", "--limit", "200", "--epochs", "2", "--no-augment", "--format", "json")
    assert r.exit_code == 0 and "not resuming the checkpoint" in r.stderr
    # the same inputs again: resumed, nothing trained
    r = run_cli("finetune", "--data", "digits", "--limit", "200", "--epochs", "2", "--no-augment", "--format", "json")
    assert r.exit_code == 0 and "resuming after epoch 2" in r.stderr


def test_kd_checkpoint_is_keyed_by_the_teacher(run_cli, ws, tiny_teacher, tmp_path):
    args = ["kd", "--width", "0.5", *DATA, "--epochs", "1", "--no-augment", "--format", "json"]
    assert run_cli(*args).exit_code == 0
    other = _perturbed(tiny_teacher, tmp_path / "other.safetensors")
    assert run_cli("partition", TINY, "--weights", other, "--input-shape", "1,3,16,16").exit_code == 0
    r = run_cli(*args)
    assert r.exit_code == 0, r.stderr
    assert "not resuming the checkpoint" in r.stderr


def test_eval_never_presents_a_student_of_another_teacher(run_cli, ws, tiny_teacher, tmp_path):
    assert run_cli("finetune", *DATA, "--epochs", "1", "--no-augment").exit_code == 0
    other = _perturbed(tiny_teacher, tmp_path / "other.safetensors")
    assert run_cli("partition", TINY, "--weights", other, "--input-shape", "1,3,16,16").exit_code == 0
    r = run_cli("eval", *DATA, "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json_of(r)["model"] == "teacher" and "stitched student in the workspace was made from another teacher" in r.stderr
    r = run_cli("finetune", *DATA, "--epochs", "1")
    assert r.exit_code == 1 and "made from another teacher" in r.stderr


def test_stitch_and_search_never_use_students_of_another_teacher_or_partition(run_cli, ws, tiny_teacher, tmp_path):
    other = _perturbed(tiny_teacher, tmp_path / "other.safetensors")
    assert run_cli("partition", TINY, "--weights", other, "--input-shape", "1,3,16,16").exit_code == 0
    r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5", *DATA)
    assert r.exit_code == 1 and one_line_error(r.stderr)
    assert "was distilled from another teacher or partition than the workspace's now; rerun ndc distill" in r.stderr
    r = run_cli("eval", *DATA)  # the stitched student is the old teacher's: the teacher alone, and why
    assert r.exit_code == 0 and "stitched student in the workspace was made from another teacher or partition" in r.stderr
    r = run_cli("search", *DATA, "--max-drop", "5", "--eval-size", "64")
    assert r.exit_code == 1 and "leaving out 6 candidate(s) distilled from another teacher" in r.stderr
    assert "no trained candidates" in r.stderr
    r = run_cli("distill", "--width", "0.5", *FAST, "--format", "json")  # the key changed with the teacher: retrained
    assert r.exit_code == 0 and all(row["status"] == "done" for row in json_of(r)["candidates"])
    assert run_cli("stitch", "-o", "s.onnx", "--width", "0.5", *DATA).exit_code == 0
    # the same teacher cut another way, under the same name (layer2.0 is now one opaque module): stitch says why
    assert run_cli("partition", TINY, "--weights", other, "--input-shape", "1,3,16,16", "--by", "module", "--depth", "2",
                   "--leaf", "layer2.0").exit_code == 0
    (tmp_path / "one.json").write_text(json.dumps({"layer2.0": "width=0.5"}))
    r = run_cli("stitch", "-o", "s.onnx", "--selection", tmp_path / "one.json")
    assert r.exit_code == 1 and one_line_error(r.stderr) and "another teacher or partition" in r.stderr


def test_changed_files_under_the_same_data_spec_are_never_reused(run_cli, ws, tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images / 16).astype("float32"), digits.target

    def write(path, labels_shift: int) -> None:
        import numpy as np

        np.savez(path, x=x[:300], y=y[:300], x_test=x[1500:1600], y_test=(y[1500:1600] + labels_shift) % 10)

    npz = tmp_path / "mine.npz"
    write(npz, 0)
    args = ["--data", npz, "--normalize", "none"]
    fast = [*args, "--steps", "8", "--batch-size", "32", "--val-size", "64", "--quiet", "--format", "json"]
    r = run_cli("distill", "--width", "0.5", *fast)
    assert r.exit_code == 0, r.stderr
    assert "replacing 3 finished student(s) distilled with other settings" in r.stderr  # those of --data digits
    r = run_cli("search", *args, "--max-drop", "5", "--eval-size", "64", "--no-verify", "--format", "json")
    assert r.exit_code == 0 and json_of(r)["quality_reused"] is False
    write(npz, 3)  # the same path and spec, other contents
    time.sleep(0.01)
    os.utime(npz)
    r = run_cli("search", *args, "--max-drop", "5", "--eval-size", "64", "--no-verify", "--format", "json")
    assert r.exit_code == 0 and json_of(r)["quality_reused"] is False  # measured again, not read from the old table
    r = run_cli("distill", "--width", "0.5", *fast)
    assert r.exit_code == 0, r.stderr
    assert "retraining 3 finished job(s): their students were distilled from other files of --data" in r.stderr
    assert "replacing" not in r.stderr
    assert all(row["status"] == "done" for row in json_of(r)["candidates"])
    r = run_cli("distill", "--width", "0.5", *fast)  # now they are this data's students
    assert all(row["status"] == "skipped" for row in json_of(r)["candidates"])


def test_a_data_function_is_known_by_what_it_returns_not_only_its_file(tmp_path, monkeypatch):
    import numpy as np

    from ndc.data import open_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text("import numpy as np\n"
                                      "def load():\n"
                                      "    d = np.load('arrays.npz')\n"
                                      "    return (d['x'], d['y']), (d['x'][:20], d['y'][:20])\n")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "arrays.npz", x=rng.random((60, 8, 8), dtype=np.float32), y=rng.integers(0, 3, 60))
    first = open_data("mine.py:load", (1, 8, 8)).fingerprint
    assert open_data("mine.py:load", (1, 8, 8)).fingerprint == first
    np.savez(tmp_path / "arrays.npz", x=rng.random((60, 8, 8), dtype=np.float32), y=rng.integers(0, 3, 60))
    assert open_data("mine.py:load", (1, 8, 8)).fingerprint != first  # same file, other arrays


def _perturbed(weights: str, path) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    torch.manual_seed(1)
    save_file({k: (v + 0.05 * torch.randn_like(v)) if v.is_floating_point() else v for k, v in state.items()}, str(path))
    return str(path)


# ----------------------------------------------------- 2. a killed finetune --restart


def test_a_killed_restart_never_ships_another_model_than_it_reports(ws, tmp_path):
    assert ndc("finetune", *DATA, "--epochs", "2", "--lr", "0.05", "-w", ws).returncode == 0
    checkpoint = ws / "finetune" / "checkpoint.safetensors"
    assert checkpoint.is_file()
    proc = subprocess.Popen([sys.executable, "-m", "ndc", "finetune", "--data", "digits", "--epochs", "50", "--restart",
                             "-w", str(ws)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while checkpoint.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # after it discarded the old checkpoint, before its first epoch ends
    proc.wait()
    assert not checkpoint.is_file()
    out = tmp_path / "ft.onnx"
    r = ndc("finetune", *DATA, "--epochs", "2", "--lr", "0.05", "-o", out, "-w", ws, "--format", "json")
    assert r.returncode == 0, r.stderr
    reported = json.loads(r.stdout)["accuracy"]
    exported = json.loads(ndc("eval", out, *DATA, "-w", ws, "--format", "json").stdout)["accuracy"]
    assert exported == pytest.approx(reported, abs=1 / 300 + 1e-9)  # onnxruntime may flip one near-tie at most
    current = json.loads(ndc("eval", *DATA, "-w", ws, "--format", "json").stdout)
    assert current["model"] == "fine-tuned student" and current["accuracy"] == pytest.approx(reported)


# --------------------------------------------------------------- 3. orphan workers


def test_workers_die_with_their_command_and_write_nothing_after_it(ws):
    proc = subprocess.Popen([sys.executable, "-m", "ndc", "distill", "--width", "0.75,1.0", *DATA, "--steps", "3000",
                             "--batch-size", "32", "--val-size", "64", "--workers", "2", "--force", "-w", str(ws), "--quiet"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    children: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        children = descendants(proc.pid)
        if len(children) >= 4:  # forkserver, resource tracker, two workers
            break
        time.sleep(0.1)
    time.sleep(0.5)
    children = descendants(proc.pid)
    assert len(children) >= 4, "the workers should have started"
    before = sorted(p.stat().st_mtime_ns for p in ws.glob("jobs/*/*/metrics.json"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(running(p) for p in children):
        time.sleep(0.1)
    assert not [p for p in children if running(p)], "workers outlived their command"
    assert sorted(p.stat().st_mtime_ns for p in ws.glob("jobs/*/*/metrics.json")) == before


# ------------------------------------------------------------ 4. checked data and caches


def test_a_corrupt_activation_cache_is_rebuilt_not_blamed_on_the_learning_rate(run_cli, ws):
    r = run_cli("distill", "--width", "0.5", *FAST, "--force", "--format", "json")
    assert r.exit_code == 0
    arrays = sorted(ws.glob("cache/*/*.train.f16.npy"))
    target = arrays[len(arrays) // 2]
    size = target.stat().st_size
    with open(target, "r+b") as f:  # garbage of the same size, in place
        f.seek(128)
        f.write(b"\xff" * (size - 128))
    r = run_cli("distill", "--width", "0.5", *FAST, "--force", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert "changed since it was written (corrupt); rebuilding it" in r.stderr
    assert all(row["status"] == "done" for row in json_of(r)["candidates"])


def test_a_failed_rerun_keeps_the_finished_student(run_cli, ws):
    before = {p: sha256_file(p) for p in ws.glob("jobs/*/width-0.5/weights.safetensors")}
    r = run_cli("distill", "--width", "0.5", *FAST, "--force", "--lr", "1e30", "--format", "json")
    assert r.exit_code == 1
    assert "the earlier student is kept" in r.stderr
    assert "width=0.5: layer" not in r.stderr  # the candidate is named once
    assert {p: sha256_file(p) for p in before} == before
    assert run_cli("stitch", "-o", "s.onnx", "--width", "0.5").exit_code == 0


@pytest.mark.parametrize("option", ["--lr", "--alpha"])
def test_options_that_are_not_numbers_are_refused_before_any_work(run_cli, ws, option):
    r = run_cli("distill", "--width", "0.5", *FAST, "--lookahead", "1", option, "nan")
    assert r.exit_code == 1 and one_line_error(r.stderr) and "must be" in r.stderr
    for command in (["finetune"], ["kd", "--width", "0.5"]):
        r = run_cli(*command, *DATA, "--lr", "nan")
        assert r.exit_code == 1 and one_line_error(r.stderr) and "--lr must be a positive" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--augment-passes", "-1"], "--augment-passes must be 0 or more"),  # hung before
    (["--seed", "-1"], "--seed must be 0 or more"),  # a numpy traceback before
    (["--round-to", "0"], "--round-to must be at least 1"),  # failed every job before
    (["--lookahead", "1", "--alpha", "-1"], "--alpha must be finite numbers, 0 or more"),
    (["--cache-budget", "-1"], "bad size '-1'"),
])
def test_bad_distill_options_are_refused_before_any_work_dry_run_included(run_cli, ws, args, message):
    for dry in ([], ["--dry-run"]):
        r = run_cli("distill", "--width", "0.5", *FAST, *args, *dry)
        assert r.exit_code == 1 and one_line_error(r.stderr) and message in r.stderr, (dry, r.stderr)


def test_the_dry_run_refuses_what_the_run_refuses(run_cli, ws):
    r = run_cli("distill", "--slimmable", "1.0", "--dry-run")
    assert r.exit_code == 1 and "a slimmable job needs a width below 1.0" in r.stderr


def test_options_that_do_not_apply_are_said_and_change_nothing(run_cli, ws):
    # --noise and --calibration shape noise inputs; with real data they are ignored, and the students stand
    r = run_cli("distill", "--width", "0.5", *FAST, "--noise", "matched", "--calibration", "100", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert "warning: --noise applies to noise inputs (--data-free or --source noise); ignored" in r.stderr
    assert "warning: --calibration applies to --noise matched; ignored" in r.stderr
    assert all(row["status"] == "skipped" for row in json_of(r)["candidates"])  # the fixture's students, not retrained


# ------------------------------------------------------------ 5. one line, never a traceback


def test_metrics_that_are_json_but_not_an_object_are_redone(run_cli, ws):
    metrics = next(ws.glob("jobs/*/width-0.5/metrics.json"))
    metrics.write_text("[1, 2, 3]\n")
    r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5")
    assert r.exit_code == 1 and one_line_error(r.stderr)
    r = run_cli("distill", "--width", "0.5", *FAST, "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert sorted(row["status"] for row in json_of(r)["candidates"]) == ["done", "skipped", "skipped"]


def test_neighbourhood_names_longer_than_a_file_name(run_cli, tmp_path):
    factory = f"{HERE / 'models_for_tests.py'}:long_names"
    assert run_cli("partition", factory, "--input-shape", "1,3,8,8").exit_code == 0
    r = run_cli("distill", "--width", "0.5", "--data-free", "--steps", "3", "--val-size", "16", "--batch-size", "8",
                "--quiet", "--format", "json")
    assert r.exit_code == 0, r.stderr
    name = json_of(r)["candidates"][0]["neighbourhood"]
    assert len(name.encode()) > 255
    folders = [p.name for p in (tmp_path / "ndc-work" / "jobs").iterdir()]
    assert all(len(f.encode()) <= 80 for f in folders) and folders[0].startswith("block_very_long")
    assert run_cli("stitch", "-o", "s.onnx", "--width", "0.5").exit_code == 0


def test_a_full_disk_while_exporting_is_one_line(ws, tmp_path):
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))  # the student's weights fit, its .pt2 does not

    r = subprocess.run([sys.executable, "-m", "ndc", "stitch", "-o", str(tmp_path / "s.pt2"), "--width", "1.0", "-w", str(ws)],
                       env=ENV, capture_output=True, text=True, timeout=600, preexec_fn=limited)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # not SIGABRT (134) from torch's C++ writer
    assert one_line_error(r.stderr) and f"file too large while writing {tmp_path / 's.pt2'}" in r.stderr
    assert not list(tmp_path.glob("*.pt2")) and not list(tmp_path.glob(".*tmp*"))


def test_an_output_where_no_file_can_be_made(run_cli, ws):
    for target in ("/proc/s.onnx", "/sys/s.pt2"):
        r = run_cli("stitch", "-o", target, "--width", "0.5")
        assert r.exit_code == 1 and one_line_error(r.stderr) and "cannot write" in r.stderr, r.stderr


def test_a_model_without_parameters_cannot_be_trained(tmp_path):
    from ndc.data import open_data
    from ndc.errors import NdcError
    from ndc.finetune import TrainConfig, train

    with pytest.raises(NdcError, match="no trainable parameters"):
        train(torch.nn.Flatten(), open_data("digits", (1, 8, 8), limit=64), TrainConfig(loss="ce", epochs=1))


# ----------------------------------------------------------------- 6. the workspace lock


def _hold(ws, command: str = "ndc distill") -> subprocess.Popen:
    code = ("import sys, time; from ndc.workspace import Workspace; "
            f"w = Workspace(sys.argv[1]); c = w.writing({command!r}); c.__enter__(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_told_who_holds_the_workspace(run_cli, ws):
    holder = _hold(ws)
    try:
        for args in (["stitch", "-o", "s.onnx", "--width", "0.5"], ["distill", "--width", "0.5", *FAST],
                     ["finetune", *DATA], ["eval", *DATA],
                     ["partition", "not_loaded_yet.py:make"]):  # said before loading and tracing the model
            r = run_cli(*args)
            assert r.exit_code == 1 and one_line_error(r.stderr), (args, r.stderr)
            assert f"in use by `ndc distill` (pid {holder.pid})" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock died with it, nothing is stale
    assert run_cli("stitch", "-o", "s.onnx", "--width", "0.5").exit_code == 0


def test_stitch_during_a_forced_distill_is_refused(ws, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ndc", "distill", "--width", "0.5", *DATA, "--steps", "2000",
                             "--batch-size", "32", "--val-size", "64", "--force", "-w", str(ws), "--quiet"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and '"ndc distill' not in (ws / ".ndc-lock").read_text():
            time.sleep(0.05)
        r = ndc("stitch", "-o", tmp_path / "s.onnx", "--width", "0.5", "-w", ws)
        assert r.returncode == 1 and "in use by `ndc distill --width 0.5 ...` (pid" in r.stderr  # the holder's command line
        assert not (tmp_path / "s.onnx").exists()
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------- 7. smaller


def test_temporary_files_of_killed_writes_are_removed_by_the_next_writer(run_cli, ws):
    leftovers = [ws / ".plan.json.x1y2.tmp", ws / "student" / ".weights.safetensors.abc.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    assert run_cli("stitch", "-o", "s.onnx", "--width", "0.5").exit_code == 0
    assert not any(p.exists() for p in leftovers)


def test_a_nearly_full_disk_says_how_much_is_free(monkeypatch, ws):
    from ndc import distill as distill_package
    from ndc.distill import DistillConfig, cache_layout, choose_source
    from ndc.distill.engine import data_for
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    w = Workspace(ws)
    plan = load_teacher(w).plan
    cfg = DistillConfig(data="digits", limit=300)
    monkeypatch.setattr(distill_package, "free_bytes", lambda ws: 1000)
    source, why = choose_source(cfg, None, data_for(w, cfg, plan.input_shape[1:]), cache_layout(plan, 0), w)
    assert source == "recompute" and "-0." not in why and "has 1 KiB free" in why


def test_a_publish_killed_between_its_two_renames_is_put_back(run_cli, ws):
    folder = next(ws.glob("jobs/*/width-0.5"))
    before = sha256_file(folder / "weights.safetensors")
    aside = folder.parent / f".{folder.name}.old-x1y2"  # what publish leaves when killed after its first rename
    aside.mkdir()
    folder.rename(aside / "x")
    staging = folder.parent / f".{folder.name}.new-z3"  # and the new result it never moved in
    staging.mkdir()
    (staging / "weights.safetensors").write_bytes(b"half")
    assert run_cli("stitch", "-o", "s.onnx", "--width", "0.5").exit_code == 0
    assert sha256_file(folder / "weights.safetensors") == before
    assert not aside.exists() and not staging.exists()


def test_the_python_finetune_keeps_the_stitched_student_as_the_command_does(ws):
    from ndc import stages
    from ndc.finetune import TrainConfig
    from ndc.workspace import Workspace

    # a learning rate that can only make it worse: the stitched student is what comes back (and what is saved)
    out = stages.finetune(Workspace(ws), TrainConfig(loss="kd", epochs=1, lr=5.0, augment=False), data="digits",
                          limit=300).payload
    assert out["best_epoch"] == 0 and out["score"] == out["initial_score"]


NET = '''
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return x + self.bn(self.conv(x)).relu()


def make():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), Block(), Block(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
'''


def test_a_teacher_whose_code_changed_after_partition_is_refused_and_repartitioning_retrains(run_cli, tmp_path):
    net = tmp_path / "net.py"
    net.write_text(NET)
    distill = ["distill", "--width", "0.5", *FAST, "--format", "json"]
    assert run_cli("partition", f"{net}:make", "--input-shape", "1,1,8,8").exit_code == 0
    r = run_cli(*distill)
    assert r.exit_code == 0 and {c["status"] for c in json.loads(r.stdout)["candidates"]} == {"done"}
    net.write_text(NET + "\n# a comment: the same graph\n")
    r = run_cli(*distill)
    assert r.exit_code == 0 and {c["status"] for c in json.loads(r.stdout)["candidates"]} == {"skipped"}
    net.write_text(NET.replace("padding=1)\n        self.bn", "padding=2, dilation=2)\n        self.bn"))  # same names, shapes
    for args in (distill, ["stitch", "-o", "s.onnx"], ["eval"]):
        r = run_cli(*args)
        assert r.exit_code == 1 and one_line_error(r.stderr), (args, r.stderr)
        assert f"the teacher's code changed since ndc partition ({net}:make computes another graph" in r.stderr
    assert run_cli("partition", f"{net}:make", "--input-shape", "1,1,8,8").exit_code == 0
    r = run_cli(*distill)  # the blocks compute something else now: their students are retrained
    assert r.exit_code == 0 and {c["status"] for c in json.loads(r.stdout)["candidates"]} == {"done"}


def test_workspace_json_of_the_wrong_shape_is_one_line_or_redone(run_cli, ws):
    (ws / "manifest.json").write_text("[]")  # only costs re-verification: every artefact is checked again
    r = run_cli("distill", "--width", "0.5", *FAST, "--format", "json")
    assert r.exit_code == 0 and {c["status"] for c in json.loads(r.stdout)["candidates"]} == {"skipped"}, r.stderr
    for junk in ('"x"', "null", "[]"):
        (ws / "plan.json").write_text(junk)
        r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5")
        assert r.exit_code == 1 and one_line_error(r.stderr) and "rerun ndc partition" in r.stderr, r.stderr


def test_a_workspace_that_cannot_be_written_can_still_be_read(ws, monkeypatch):
    import errno

    import ndc.workspace as workspace
    from ndc.workspace import Workspace

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(workspace.os, "open", read_only)
    with Workspace(ws).reading():  # the lock file exists: held shared through a read-only descriptor
        pass
    (ws / ".ndc-lock").unlink()
    with Workspace(ws).reading():  # none at all: nobody can be writing either
        pass
    with pytest.raises(OSError):
        with Workspace(ws).writing("ndc test"):
            pass

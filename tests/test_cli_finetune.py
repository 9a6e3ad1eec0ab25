"""`ndc finetune`, `ndc kd` and `ndc eval` on a stitched student, as a user runs them."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from tests.conftest import cli_workspace, copy_of

HERE = pathlib.Path(__file__).resolve().parent
DATA = ["--data", "digits", "--limit", "300"]


@pytest.fixture(scope="module")
def stitched(tmp_path_factory, tiny_teacher):
    """A workspace with an under-trained width-0.5 student stitched (5 distillation steps per block)."""
    ws = tmp_path_factory.mktemp("ft") / "ws"
    return cli_workspace(ws, tiny_teacher,
                         ["distill", "--width", "0.5", *DATA, "--steps", "5", "--batch-size", "32", "--val-size", "64", "--quiet"],
                         ["stitch", "-o", ws.parent / "s.onnx", *DATA])


@pytest.fixture
def ws(stitched, tmp_path):
    return copy_of(stitched, tmp_path)


def test_finetune_raises_an_undertrained_student(run_cli, ws, tmp_path):
    r = run_cli("finetune", *DATA, "--epochs", "3", "--lr", "0.05", "--no-augment", "-o", "ft.onnx", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["accuracy"] > doc["initial_accuracy"] + 0.05
    assert len(doc["history"]) == 3 and (tmp_path / "ft.onnx").is_file()
    assert (ws / "finetune" / "weights.safetensors").is_file()
    r = run_cli("eval", *DATA, "--format", "json")  # the workspace's latest student: the fine-tuned one
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(doc["accuracy"], abs=1e-9)
    assert (json.loads(r.stdout)["model"], json.loads(r.stdout)["selection"]) == ("fine-tuned student", "width=0.5")
    # a later, worse run replaces it, and says so
    r = run_cli("finetune", *DATA, "--epochs", "1", "--lr", "1e-6", "--no-augment", "--format", "json")
    assert r.exit_code == 0, r.stderr
    worse = json.loads(r.stdout)["accuracy"]
    assert worse < doc["accuracy"]
    assert (f"replacing the earlier fine-tuned student in finetune/, which scored better ({doc['accuracy']:.2%} accuracy "
            f"against this run's {worse:.2%})") in r.stderr
    assert json.loads(r.stdout)["best_epoch"] == 0  # no epoch beat the stitched student: eval says whose weights these are
    r = run_cli("finetune", *DATA, "--epochs", "1", "--lr", "1e-6", "--no-augment")
    assert "(a lower learning rate, --lr 1e-07 may help" in r.stdout and "or --no-augment" not in r.stdout, r.stdout
    r = run_cli("eval", *DATA)
    assert "stitched student (width=0.5; ndc finetune kept it: no epoch beat it)" in r.stdout
    assert "fine-tuned student" not in r.stdout


def test_data_free_finetune_never_returns_a_worse_student(run_cli, ws):
    r = run_cli("finetune", *DATA, "--data-free", "--epochs", "2", "--lr", "0.05", "--lambda", "0.3", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert "--lambda 0.3 is ignored: noise has no labels to weigh" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["accuracy"] >= doc["initial_accuracy"]  # judged on --data's test split; epoch 0 is the stitched student
    assert doc["history"][0]["epoch"] == 1 and len(doc["history"]) == 2


def test_learning_rate_defaults_per_stage(run_cli, ws):
    def lr(*args):
        r = run_cli(*args, *DATA, "--epochs", "1", "--restart", "--format", "json")
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["optimizer"] == ("adamw" if "adamw" in args else "sgd")  # a CNN with batch norms: SGD by default
        return doc["lr"]

    assert lr("finetune") == 1e-2  # the paper's fine-tuning rate
    assert lr("finetune", "--data-free") == pytest.approx(1e-3)  # a tenth on noise
    assert lr("finetune", "--data-free", "--lr", "0.02") == 0.02  # an explicit rate always wins
    assert lr("kd", "--width", "0.5") == 0.1  # from scratch
    assert lr("kd", "--width", "0.5", "--data-free") == pytest.approx(0.01)
    assert lr("finetune", "--optimizer", "adamw") == 1e-4  # each optimizer has its own default


def test_a_killed_finetune_resumes_from_its_last_checkpoint(ws):
    args = [sys.executable, "-m", "ndc", "finetune", *DATA, "--epochs", "40", "--lr", "0.05", "--no-augment",
            "-w", str(ws), "--format", "json"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = ws / "finetune" / "checkpoint.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_file() and json.loads(checkpoint.read_text()).get("epoch", 0) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch = json.loads(checkpoint.read_text())["epoch"]
    assert 2 <= epoch < 40, "the run should be killed part-way"
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"resuming after epoch {epoch}" in out.stderr
    doc = json.loads(out.stdout)
    assert [h["epoch"] for h in doc["history"]] == list(range(1, doc["epochs"] + 1))


def test_kd_and_ce_baselines_train_the_same_architecture_from_scratch(run_cli, ws):
    for loss, unused in (("kd", ()), ("ce", ("--tau", "4", "--lambda", "0.5"))):
        r = run_cli("kd", "--width", "0.5", *DATA, "--loss", loss, "--epochs", "2", "--lr", "0.05", "--no-augment",
                    "--format", "json", *unused)
        assert r.exit_code == 0, r.stderr
        said = [line for line in r.stderr.splitlines() if "is ignored" in line]
        assert said == ([] if loss == "kd" else ["warning: --tau 4 is ignored: it softens --loss kd's scores, and the loss is ce",
                                                 "warning: --lambda 0.5 is ignored: --loss ce is the label term alone"])
        doc = json.loads(r.stdout)
        assert doc["loss"] == loss and len(doc["history"]) == 2
        assert all(h["seconds"] > 0 for h in doc["history"])
        assert (ws / doc["folder"] / "checkpoint.json").is_file()
    stitched = json.loads((ws / "student" / "report.json").read_text())
    assert doc["params"] == stitched["params"]


def test_time_budget_limits_the_baseline(run_cli, ws):
    r = run_cli("kd", "--width", "0.5", *DATA, "--epochs", "500", "--time-budget", "1", "--no-augment", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["epochs"] < 500


def test_stages_after_distill_read_its_data_options_unless_given(run_cli, ws):
    assert json.loads((ws / "data.json").read_text()) == {"data": "digits", "limit": 300, "normalize": True}
    r = run_cli("finetune", "--epochs", "1", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert "data: --data digits --limit 300, as ndc distill used (give --data to choose)" in r.stderr
    assert "loss kd: the teacher outputs 10 class scores" in r.stderr and "warning: loss" not in r.stderr  # information
    remembered = json.loads(r.stdout)
    r = run_cli("kd", "--width", "0.5", "--epochs", "1", "--quiet")  # --quiet: warnings only
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    r = run_cli("eval", "--format", "json")  # the fine-tuned student, on the same 300 test examples
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(remembered["accuracy"], abs=1e-9)
    r = run_cli("eval", "--data", "digits", "--limit", "100", "--format", "json")  # given: as given, and nothing said
    assert r.exit_code == 0 and "ndc distill used" not in r.stderr
    assert json.loads(r.stdout)["examples"] == 100
    r = run_cli("eval", "--limit", "50", "--format", "json", "--trust-pickle")  # a --limit given is kept; the rest is remembered
    assert "--trust-pickle lets ndc unpickle a .pt or .pt2 MODEL; there is none here; ignored" in r.stderr
    assert "data: --data digits --limit 50, from what ndc distill used" in r.stderr
    assert json.loads(r.stdout)["examples"] == 50
    (ws / "data.json").write_text("[1, 2]")
    r = run_cli("eval")
    assert r.exit_code == 1 and "data.json is not what ndc distill writes; give --data SPEC" in r.stderr


def test_a_new_teacher_that_reads_other_inputs_forgets_the_remembered_data(run_cli, ws, tiny_teacher):
    from tests.conftest import TINY_RESNET

    r = run_cli("partition", TINY_RESNET, "--weights", tiny_teacher, "--input-shape", "1,3,16,16", "--by", "layers")
    assert r.exit_code == 0 and "forgot" not in r.stderr and (ws / "data.json").is_file()  # the same inputs: kept
    r = run_cli("partition", f"{HERE / 'models_for_tests.py'}:regression_mlp", "--input-shape", "1,16")
    assert r.exit_code == 0, r.stderr
    assert "forgot the data ndc distill used here (--data digits --limit 300): the new teacher reads other inputs; " \
        "give --data to the next stages" in r.stderr
    assert not (ws / "data.json").exists()
    r = run_cli("eval")  # no longer "as ndc distill used" for a teacher that cannot read it
    assert r.exit_code != 0 and "ndc distill used" not in r.stderr


def test_remembered_paths_are_absolute_and_built_in_names_stay(tmp_path, monkeypatch):
    from ndc.stages import absolute_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.npz").write_bytes(b"")
    (tmp_path / "photos").mkdir()
    (tmp_path / "digits").mkdir()  # a folder named like a built-in set does not make "digits" a path
    assert absolute_spec("mine.npz") == str(tmp_path / "mine.npz")
    assert absolute_spec("imagefolder:photos") == f"imagefolder:{tmp_path / 'photos'}"
    assert absolute_spec("digits") == "digits" and absolute_spec("fashion-mnist") == "fashion-mnist"
    assert absolute_spec("missing.npz") == "missing.npz"


def test_errors(run_cli, ws, tmp_path):
    (ws / "data.json").unlink()  # no data remembered from distill
    for args, needle in ((["finetune", "--epochs", "1"], "give --data SPEC"),
                         (["finetune", *DATA, "-o", "x.tflite"], "suffix"),
                         (["kd", "--width", "0.5", *DATA, "--loss", "hinge"], "Invalid value for '--loss'"),
                         (["finetune", *DATA, "-w", str(tmp_path / "empty")], "no plan in workspace")):
        r = run_cli(*args)
        assert r.exit_code in (1, 2) and needle in r.stderr, (args, r.stderr)


@pytest.fixture
def stray_labels(tmp_path):
    """digits-sized images whose example 11 has label 18: outside the teacher's 10 classes."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.arange(40) % 10
    y[11] = 18
    path = tmp_path / "stray.npz"
    np.savez(path, x=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y=y)
    return path


@pytest.mark.parametrize("command", [["finetune"], ["kd", "--width", "0.5"], ["kd", "--width", "0.5", "--loss", "ce"],
                                     ["eval"]])
def test_labels_outside_the_teachers_classes_are_one_line(run_cli, ws, stray_labels, command):
    r = run_cli(*command, "--data", stray_labels, *([] if command == ["eval"] else ["--epochs", "1"]))
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "stray.npz: y: example 11 has label 18, outside the model's 10 classes (0..9)" in r.stderr
    assert not (ws / "kd").exists() and not (ws / "finetune").exists()  # refused before any training


def test_with_lambda_0_the_teacher_alone_is_matched(run_cli, ws, stray_labels):
    r = run_cli("finetune", "--data", stray_labels, "--epochs", "1", "--lambda", "0", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["metric"] == "agreement"  # the labels cannot score this teacher


@pytest.mark.parametrize("option", [["--lr", "nan"], ["--lr", "0"], ["--tau", "inf"], ["--lambda", "nan"],
                                    ["--time-budget", "nan"]])
def test_non_finite_options_are_refused_before_any_work(run_cli, ws, option):
    before = sorted(p.name for p in ws.iterdir())
    for command in (["finetune"], ["kd", "--width", "0.5"]):
        r = run_cli(*command, *DATA, "--epochs", "1", *option)
        assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"{option[0]} must be" in r.stderr and option[1] in r.stderr
    assert sorted(p.name for p in ws.iterdir()) == before  # nothing written


@pytest.mark.parametrize("command", [["finetune"], ["kd", "--width", "0.5"]])
def test_compile_reaches_the_training_step_and_its_failure_is_one_line(run_cli, ws, monkeypatch, command):
    import torch
    import torch._dynamo.exc

    modes = []

    def broken(fn, mode=None, **_):
        modes.append(mode)

        def run(*args, **kwargs):
            raise torch._dynamo.exc.Unsupported("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    r = run_cli(*command, *DATA, "--epochs", "1", "--compile", "reduce-overhead")
    assert r.exit_code == 1 and modes == ["reduce-overhead"]
    assert r.stderr.splitlines()[-1] == ("Error: --compile reduce-overhead: torch.compile failed: no C++ compiler; "
                                         "try without --compile") and "Traceback" not in r.stderr, r.stderr
    r = run_cli(*command, *DATA, "--compile", "fast")
    assert r.exit_code == 2 and "'fast' is not one of" in r.stderr


def test_a_student_that_already_scores_full_marks_is_not_blamed_on_the_learning_rate(run_cli, ws):
    r = run_cli("distill", "--width", "1.0", *DATA, "--steps", "2", "--batch-size", "32", "--val-size", "64", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert run_cli("stitch", "-o", "t.onnx", "--width", "1.0", "--calibrate", "0").exit_code == 0  # the teacher, as it is
    r = run_cli("finetune", *DATA, "--metric", "agreement", "--epochs", "1", "--lr", "1e-9", "--no-augment")
    assert r.exit_code == 0, r.stderr
    assert "stitched student (width=1.0)" in r.stdout
    assert "no epoch beat the stitched student, which already scores 100.00%: it is kept unchanged" in r.stdout

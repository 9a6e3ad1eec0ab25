"""evaluate and `ndc eval`: accuracy, agreement with the teacher, safe loading of exported files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from ndc.data import open_data
from ndc.errors import NdcError
from ndc.evaluate import evaluate, load_for_eval
from ndc.passes.export import export_model
from ndc.plan import load_teacher
from ndc.workspace import Workspace

DATA = ["--data", "digits", "--limit", "200"]
JSON_KEYS = {"accuracy", "teacher_accuracy", "agreement", "examples"}


class Constant(nn.Module):
    """Always predicts class ``k`` (of 10)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        logits[:, self.k] = self.scale
        return logits


@pytest.fixture(scope="module")
def digits():
    return open_data("digits", None, limit=100)


def labels(data) -> torch.Tensor:
    return torch.cat([y for _, y in data.batches("test", 64)])


# ------------------------------------------------------------------- library


def test_accuracy_and_agreement(digits):
    y = labels(digits)
    result = evaluate(Constant(2), digits, batch_size=32)
    share = pytest.approx(float((y == 2).float().mean()))
    assert result == {"metric": "accuracy", "score": share, "accuracy": share, "examples": 100}
    same = evaluate(Constant(2), digits, teacher=Constant(2))
    assert same["agreement"] == 1.0 and same["teacher_accuracy"] == same["accuracy"]
    other = evaluate(Constant(2), digits, teacher=Constant(3))
    assert other["agreement"] == 0.0
    assert other["teacher_accuracy"] == pytest.approx(float((y == 3).float().mean()))


def test_module_mode_is_restored(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.5)).train()
    first = evaluate(model, digits)
    assert model.training
    assert evaluate(model, digits) == first  # eval mode inside: dropout off, deterministic


def test_wrong_class_count_is_one_line(digits):
    with pytest.raises(NdcError, match=r"digits labels: example \d+ has label [3-9], outside the model's 3 classes"):
        evaluate(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), digits)
    with pytest.raises(NdcError, match="does not run on digits batches of shape"):
        evaluate(nn.Linear(5, 10), digits)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.onnx's own deprecation notices
def test_static_batch_onnx_runs_in_chunks(digits, tmp_path):
    """A file exported elsewhere with a fixed batch size still evaluates every example."""
    import onnxruntime as ort

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    torch.onnx.export(model, (torch.randn(16, 1, 8, 8),), tmp_path / "static.onnx", dynamo=True, external_data=False,
                      verbose=False)
    assert ort.InferenceSession(str(tmp_path / "static.onnx")).get_inputs()[0].shape[0] == 16
    predictor = load_for_eval(tmp_path / "static.onnx")
    assert predictor.input_shape == (1, 8, 8)
    result = evaluate(predictor, digits, teacher=model, batch_size=50)
    assert result["examples"] == 100 and result["agreement"] == 1.0


@pytest.mark.parametrize("name, message", [
    ("missing.onnx", "no such file"),
    ("model.pt", "refusing to unpickle"),
    ("model.tflite", "unknown suffix '.tflite'"),
])
def test_load_for_eval_errors(name, message, tmp_path):
    if name != "missing.onnx":
        (tmp_path / name).write_bytes(b"not a model")
    with pytest.raises(NdcError, match=message):
        load_for_eval(tmp_path / name)


def test_corrupt_onnx_is_one_line(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(NdcError, match="not a readable ONNX model") as e:
        load_for_eval(tmp_path / "bad.onnx")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------- workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A resnet20 teacher partitioned with `ndc partition` (built once for the module)."""
    from ndc.cli import main

    root = tmp_path_factory.mktemp("eval") / "ws"
    r = CliRunner().invoke(main, ["partition", "ndc.zoo:resnet20", "--input-shape", "1,3,32,32", "-w", str(root)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return root


@pytest.fixture(scope="module")
def teacher_onnx(workspace, tmp_path_factory):
    teacher = load_teacher(Workspace(workspace))
    out = tmp_path_factory.mktemp("exported") / "teacher.onnx"
    export_model(teacher.gm, out, teacher.plan.input_shape, latency_runs=0)
    return out



def test_eval_workspace_teacher(run_cli, workspace):
    r = run_cli("eval", "-w", workspace, *DATA)
    assert r.exit_code == 0, r.stderr
    assert "teacher" in r.stdout and "%" in r.stdout and "200 test examples of digits" in r.stdout
    assert "evaluated the teacher only" in r.stderr

    r = run_cli("eval", workspace, *DATA, "--format", "json")  # the workspace as MODEL
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert JSON_KEYS <= doc.keys()
    assert doc["evaluated"] == "teacher" and doc["examples"] == 200
    assert 0 <= doc["accuracy"] <= 1 and doc["teacher_accuracy"] == doc["accuracy"] and doc["agreement"] is None


def test_eval_workspace_student(run_cli, workspace, tmp_path):
    from ndc.stitch import save_student, stitch

    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    teacher = load_teacher(Workspace(ws))
    student = stitch(teacher, {})
    with torch.no_grad():
        student.fc.bias[0] += 100.0  # now predicts class 0 everywhere
    save_student(Workspace(ws), student, {}, {}, {})
    r = run_cli("eval", "-w", ws, *DATA, "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    y = labels(open_data("digits", (3, 32, 32), limit=200))
    assert doc["evaluated"] == "student"
    assert doc["accuracy"] == pytest.approx(float((y == 0).float().mean()))
    assert 0 <= doc["agreement"] < 1 and doc["teacher_accuracy"] is not None
    r = run_cli("eval", "-w", ws, *DATA)
    assert "teacher" in r.stdout and "stitched student" in r.stdout


def test_eval_onnx_agrees_with_pytorch(run_cli, workspace, teacher_onnx, monkeypatch):
    r = run_cli("eval", teacher_onnx, "-w", workspace, *DATA, "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert JSON_KEYS <= doc.keys() and doc["examples"] == 200
    assert doc["agreement"] >= 0.995
    assert abs(doc["accuracy"] - doc["teacher_accuracy"]) <= 1 / 200

    # Same through the library, and the same accuracy as the teacher module itself.
    teacher = load_teacher(Workspace(workspace))
    data = open_data("digits", (3, 32, 32), limit=200, workspace=Workspace(workspace))
    direct = evaluate(teacher.gm, data)
    assert abs(direct["accuracy"] - doc["teacher_accuracy"]) < 1e-9
    assert evaluate(load_for_eval(teacher_onnx), data, teacher=teacher.gm)["agreement"] >= 0.995


def test_eval_pt2_without_workspace_reports_accuracy_only(run_cli, workspace, tmp_path):
    teacher = load_teacher(Workspace(workspace))
    export_model(teacher.gm, tmp_path / "teacher.pt2", teacher.plan.input_shape, latency_runs=0)
    r = run_cli("eval", "teacher.pt2", *DATA, "--format", "json")  # no ./ndc-work here
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["teacher_accuracy"] is None and doc["agreement"] is None and 0 <= doc["accuracy"] <= 1
    r = run_cli("eval", "teacher.pt2", "-w", "elsewhere", *DATA)  # an explicit -w without a plan: say so
    assert r.exit_code == 0 and "accuracy only" in r.stderr
    assert "agreement with teacher" not in r.stdout  # no column left blank in every row


def test_eval_pt_needs_trust(run_cli, workspace, tmp_path):
    teacher = load_teacher(Workspace(workspace))
    export_model(teacher.gm, tmp_path / "teacher.pt", teacher.plan.input_shape, latency_runs=0)
    r = run_cli("eval", "teacher.pt", "-w", workspace, *DATA)
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "--trust-pickle" in r.stderr
    r = run_cli("eval", "teacher.pt", "-w", workspace, *DATA, "--trust-pickle", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["agreement"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["-w", "nowhere", "--data", "digits"], "no workspace at"),
    (["missing.onnx", "--data", "digits"], "no such file"),
    (["-w", "."], "needs --data"),
])
def test_user_errors_are_one_line(run_cli, args, message):
    r = run_cli("eval", *args)
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and message in r.stderr


def test_input_shape_mismatch_with_teacher(run_cli, workspace, tmp_path):
    export_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tmp_path / "small.onnx", (1, 1, 8, 8), latency_runs=0)
    r = run_cli("eval", "small.onnx", "-w", workspace, *DATA)
    assert r.exit_code == 1 and "takes inputs of shape 1x8x8 but the workspace's teacher takes 3x32x32" in r.stderr


def test_a_teacher_near_chance_is_doubted_with_a_hint():
    from types import SimpleNamespace

    from ndc.scoring import Metric, teacher_doubt

    data = SimpleNamespace(classes=10, name="mine.npz", normalization="training statistics")
    accuracy = Metric("accuracy")
    doubt = teacher_doubt(accuracy, 0.27, data)  # standardised inputs for a teacher trained on raw pixels: 27%
    assert doubt.startswith("the teacher scores 27.0% accuracy on mine.npz (chance 10%)")
    assert doubt.endswith("by default: a teacher trained on raw inputs needs --normalize none")
    assert teacher_doubt(accuracy, 0.9, data) is None
    assert "--normalize" not in teacher_doubt(accuracy, 0.2, SimpleNamespace(classes=10, name="x", normalization="none"))
    assert teacher_doubt(Metric("agreement"), 0.2, data) is None
    language_model = SimpleNamespace(classes=100, name="text", label_shape=(16,), normalization="none")
    assert teacher_doubt(accuracy, 0.05, language_model) is None  # next-token accuracy is low for any model
    r2 = Metric("r2")  # regression: worse than predicting the targets' mean
    assert teacher_doubt(r2, -0.45, data).startswith("the teacher scores R² -45.0% on mine.npz: its predictions are "
                                                     "worse than the targets' mean: it was probably trained on other")
    assert teacher_doubt(r2, 0.3, data) is None

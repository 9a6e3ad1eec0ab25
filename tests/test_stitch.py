"""`ndc stitch`: recombination, exactness at width 1, calibration, export parity for every family, errors."""

from __future__ import annotations

import json
import pathlib

import onnx
import pytest
import torch

from ndc.ir import Spec
from ndc.load import LoadedModel
from ndc.plan import Teacher, partition_model
from ndc.stitch import stitch
from ndc.zoo import FAMILIES
from tests.conftest import cli_workspace, copy_of

HERE = pathlib.Path(__file__).resolve().parent
FAST = ["--data", "digits", "--limit", "200", "--steps", "10", "--batch-size", "32", "--val-size", "64", "--quiet"]


def _teacher(family: str) -> Teacher:
    factory, shape = FAMILIES[family]
    plan, traced = partition_model(LoadedModel(factory().eval(), {"kind": "test"}), shape)
    return Teacher(plan, traced)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stitching_the_teacher_parts_is_the_teacher(family):
    teacher = _teacher(family)
    student = stitch(teacher, {})
    x = torch.randn(3, *teacher.plan.input_shape[1:])
    with torch.no_grad():
        assert torch.equal(student(x), teacher.gm(x))
    assert set(student.state_dict()) == set(teacher.gm.state_dict())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("width", [1.0, 0.5])
def test_stitched_students_export_to_onnx_with_parity(family, width, tmp_path):
    from ndc.passes.export import export_model
    from ndc.passes.rewrite import make_student

    teacher = _teacher(family)
    parts = {nb.name: make_student(teacher.part(nb.name), Spec(width=width)).module for nb in teacher.plan.trainable}
    student = stitch(teacher, parts)
    if width == 1.0:
        x = torch.randn(2, *teacher.plan.input_shape[1:])
        with torch.no_grad():
            assert torch.equal(student(x), teacher.gm(x))
    report = export_model(student, tmp_path / "s.onnx", teacher.plan.input_shape)
    onnx.checker.check_model(str(tmp_path / "s.onnx"))
    assert report["max_abs_diff"] < 1e-3
    assert report["checked_batch_sizes"] == [1, 7, 64]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_teacher):
    """A tiny ResNet workspace with width 0.5 and 1.0 students trained."""
    return cli_workspace(tmp_path_factory.mktemp("stitch") / "ws", tiny_teacher, ["distill", "--width", "0.5,1.0", *FAST])


@pytest.fixture
def ws(trained, tmp_path):
    return copy_of(trained, tmp_path)


def test_width_one_students_reproduce_the_teacher(run_cli, ws):
    from ndc.plan import load_teacher
    from ndc.stitch import load_student
    from ndc.workspace import Workspace

    r = run_cli("stitch", "-o", "s.onnx", "--width", "1.0", "--calibrate", "0", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {"output", "params", "teacher_params", "max_abs_diff"} <= set(doc)
    assert doc["params"] == doc["teacher_params"]
    teacher = load_teacher(Workspace(ws))
    student = load_student(Workspace(ws))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(student(x), teacher.gm(x))


def test_stitch_with_data_recalibrates_and_reports_accuracy(run_cli, ws, tmp_path):
    r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5", "--data", "digits", "--limit", "200", "--calibrate", "3",
                "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["params"] < doc["teacher_params"] and doc["flops"] < doc["teacher_flops"]
    assert 0 <= doc["accuracy"] <= 1 and 0 <= doc["teacher_accuracy"] <= 1 and 0 <= doc["agreement"] <= 1
    assert doc["calibrated_norms"] > 0
    from ndc.data import open_data

    train = open_data("digits", (3, 16, 16), limit=200).train_size
    assert doc["calibration_batches"] == min(3, -(-train // 128))  # the batches there were, not the ones asked for
    assert (tmp_path / "s.onnx").is_file() and (ws / "student" / "report.json").is_file()
    onnx.checker.check_model(str(tmp_path / "s.onnx"))
    assert doc["checked_batch_sizes"] and doc["folded_bn"] == 0 and doc["trusted_only"] is False  # the export report
    # the teacher in the same format, beside the student: exported once, measured, and its file removed
    assert doc["teacher_bytes"] > doc["bytes"] and set(doc["teacher_latency_ms"]) == set(doc["latency_ms"])
    assert (ws / "student" / "teacher-export.json").is_file() and not list((ws / "student").glob("teacher.onnx*"))
    r = run_cli("stitch", "-o", "s.pt", "--width", "0.5", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["trusted_only"] is True
    assert "s.pt is a pickle: loading it (torch.load(weights_only=False)) can run arbitrary code" in r.stderr


def test_default_selection_is_the_only_trained_spec(run_cli, ws):
    r = run_cli("stitch", "-o", "s.pt2")
    assert r.exit_code == 1 and "which students?" in r.stderr and "width=0.5" in r.stderr


def test_selection_file(run_cli, ws, tmp_path):
    (tmp_path / "sel.json").write_text(json.dumps({"layer1.0": "width=0.5", "layer2.0": "width=1.0", "layer3.0": "width=0.5"}))
    r = run_cli("stitch", "-o", "s.pt2", "--selection", "sel.json", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["selection"]["layer2.0"] == "width=1.0"
    # "teacher", as search's pareto.csv names the teacher's own part, keeps it
    (tmp_path / "csv.json").write_text(json.dumps({"layer1.0": "width=0.5", "layer2.0": "teacher", "layer3.0": "width=0.5"}))
    r = run_cli("stitch", "-o", "s.pt2", "--selection", "csv.json", "--format", "json")
    assert r.exit_code == 0 and "layer2.0" not in json.loads(r.stdout)["selection"]
    loaded = torch.export.load(str(tmp_path / "s.pt2")).module()
    assert loaded(torch.randn(5, 3, 16, 16)).shape == (5, 10)


def test_stitch_errors_are_one_line_and_leave_nothing(run_cli, ws, tmp_path):
    cases = [
        (["-o", "s.onnx", "--width", "0.25"], "no trained student for layer1.0 width=0.25"),
        (["-o", "missing/s.onnx", "--width", "0.5"], "missing"),
        (["-o", "s.tflite", "--width", "0.5"], "suffix"),
        (["-o", "s.onnx", "--width", "0.5", "--spec", "width=0.5"], "give one of --width, --spec and --selection"),
    ]
    for args, needle in cases:
        r = run_cli("stitch", *args)
        assert r.exit_code == 1, (args, r.stdout)
        said = [line for line in r.stderr.splitlines() if not line.startswith("data: ")]  # the data distill used
        assert len(said) == 1 and said[0].startswith("Error: ") and needle in said[0], (args, r.stderr)
    assert not list(tmp_path.glob("s.*"))


def test_stitch_recalibrates_on_the_data_distill_used(run_cli, ws):
    r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["calibrated_norms"] > 0 and doc["accuracy"] is not None
    assert "data: --data digits --limit 200, as ndc distill used" in r.stderr


def test_calibrate_without_data_is_said_to_do_nothing(run_cli, ws):
    (ws / "data.json").unlink()  # as after a distillation on noise alone: no data to recalibrate on
    r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5", "--calibrate", "3")
    assert r.exit_code == 0 and "--calibrate recalibrates batch norms on --data; without --data it is ignored" in r.stderr
    r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5")  # the default alone says nothing
    assert r.exit_code == 0 and "--calibrate" not in r.stderr


def test_fold_bn_folds_batch_norms_into_the_exported_file_and_says_how_many(run_cli, ws, tmp_path):
    r = run_cli("stitch", "-o", "s.pt2", "--width", "0.5", "--fold-bn", "--calibrate", "0", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    program = torch.export.load(str(tmp_path / "s.pt2"))
    left = [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    assert doc["folded_bn"] > 0 and not left
    r = run_cli("stitch", "-o", "s.pt2", "--width", "0.5", "--fold-bn", "--calibrate", "0")
    assert f"folded {doc['folded_bn']} batch norms into their convolutions in the exported file" in r.stdout


def test_a_teacher_the_exporter_cannot_take_costs_only_its_figures(run_cli, ws, tmp_path, monkeypatch):
    import ndc.passes.export as export
    from ndc.errors import NdcError

    real = export.export_model

    def students_only(module, path, *args, **kwargs):
        if str(path).endswith("teacher.onnx"):
            raise NdcError("the ONNX exporter failed: an operator it does not know")
        return real(module, path, *args, **kwargs)

    monkeypatch.setattr(export, "export_model", students_only)
    r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5", "--calibrate", "0", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["bytes"] > 0 and doc["teacher_bytes"] is None and (tmp_path / "s.onnx").is_file()


def test_stitching_on_other_data_than_the_students_learned_from_is_said(run_cli, ws, tmp_path):
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "mine.npz", x=(digits.images[:200] / 16).astype("float32"), y=digits.target[:200])
    r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5", "--data", "digits", "--limit", "200")
    assert r.exit_code == 0 and "distilled from other data" not in r.stderr  # what they learned from
    r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5", "--data", "mine.npz")
    assert r.exit_code == 0, r.stderr
    assert ("the students of layer1.0, layer2.0, layer3.0 were distilled from other data than --data mine.npz, on which "
            "the stitched student is recalibrated and measured") in r.stderr


def test_a_selection_reads_as_its_spec_or_its_counts():
    from ndc.stitch import selection_phrase

    assert selection_phrase({"a": Spec(width=0.5), "b": Spec(width=0.5)}) == "width=0.5"
    assert selection_phrase({"a": "width=0.25", "b": "sparsity=0.5", "c": "width=0.25", "d": "teacher"}) == \
        "2x width=0.25, 1x sparsity=0.5, 1x teacher"

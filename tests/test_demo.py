"""`ndc demo --quick`: the whole pipeline runs and prints its table (the README's main command, scaled down)."""

from __future__ import annotations

import json

import onnx


def test_quick_demo_on_digits(run_cli, tmp_path):
    r = run_cli("demo", "--quick", "--data", "digits", "--workers", "1", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["data"] == "digits"
    assert doc["finetuned"]["params"] < doc["teacher"]["params"]
    assert doc["finetuned"]["max_abs_diff"] < 1e-3
    for route in ("teacher", "distilled", "finetuned", "kd_baseline"):
        assert 0 <= doc[route]["accuracy"] <= 1
    assert set(doc["seconds"]) == {"teacher training", "partition", "distill", "stitch", "fine-tune", "export + verify"}
    onnx.checker.check_model(doc["finetuned"]["onnx"])
    assert len(list((tmp_path / "ndc-work" / "demo").glob("teacher-*.safetensors"))) == 1
    again = run_cli("demo", "--quick", "--data", "digits", "--workers", "1")  # the teacher is reused
    assert again.exit_code == 0, again.stderr
    assert "training the teacher" not in again.stderr
    assert "student, + fine-tuned" in again.stdout and "end-to-end KD" in again.stdout
    other = run_cli("demo", "--quick", "--data", "digits", "--workers", "1", "--limit", "300")  # another teacher
    assert other.exit_code == 0, other.stderr
    assert "training the teacher" in other.stderr


def test_a_bad_width_is_refused_before_the_teacher_trains(run_cli, tmp_path):
    r = run_cli("demo", "--width", "7", "--data", "digits", "--quick")
    assert r.exit_code == 1 and r.stderr == "Error: bad spec: width must be in (0, 1], got 7.0\n"
    assert not (tmp_path / "ndc-work").exists()


def test_bad_data_leaves_no_new_workspace_and_keeps_an_old_one(run_cli, tmp_path):
    r = run_cli("demo", "--data", "nosuch", "--quick")
    assert r.exit_code == 1 and r.stderr.startswith("Error: unknown data spec 'nosuch'")
    assert not (tmp_path / "ndc-work").exists()  # an empty folder holding only its lock was left behind
    (tmp_path / "ndc-work").mkdir()
    assert run_cli("demo", "--data", "nosuch", "--quick").exit_code == 1
    assert (tmp_path / "ndc-work").is_dir()

"""Output selection, token inputs and .pt2 archives: what the tracer makes of models that are not one tensor in, one out.

Every later stage must just work once the traced teacher returns one tensor:
each case goes through partition -> distill -> stitch (width 1.0, .pt2) and
the stitched student must compute the chosen output of the model.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.nn as nn

from ndc.errors import NdcError
from ndc.passes.inputs import InputSpec, integer_inputs
from ndc.passes.trace import trace
from tests import models_for_tests as m

TESTS = pathlib.Path(__file__).resolve().parent / "models_for_tests.py"
FAST = ["--data-free", "--width", "1.0", "--steps", "2", "--batch-size", "8", "--val-size", "16", "--quiet"]


def _pipeline(run_cli, tmp_path, model: str, *partition_args: str) -> tuple[dict, torch.nn.Module]:
    r = run_cli("partition", model, *partition_args, "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    r = run_cli("distill", *FAST)
    assert r.exit_code == 0, r.stderr
    r = run_cli("stitch", "-o", "s.pt2", "--width", "1.0")
    assert r.exit_code == 0, r.stderr
    return doc, torch.export.load(str(tmp_path / "s.pt2")).module()


@pytest.mark.parametrize("factory, output, expected", [
    ("tuple_out", None, lambda out: out[0]),
    ("tuple_out", "1", lambda out: out[1]),
    ("dict_out", None, lambda out: out["logits"]),
    ("dict_out", "features", lambda out: out["features"]),
    ("model_output", None, lambda out: out.logits),
])
def test_each_output_kind_goes_through_every_stage(run_cli, tmp_path, factory, output, expected):
    model = getattr(m, factory)().eval()
    args = ["--output", output] if output else []
    doc, student = _pipeline(run_cli, tmp_path, f"{TESTS}:{factory}", *args)
    assert doc["output"] == (output or ("0" if factory == "tuple_out" else "logits"))
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(student(x), expected(model(x)))


def test_a_bad_output_choice_is_one_line(run_cli):
    r = run_cli("partition", f"{TESTS}:dict_out", "--output", "scores")
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == "Error: --output scores: the model's output has no entry 'scores'; tensors: features, logits"
    r = run_cli("partition", f"{TESTS}:chain", "--output", "logits")
    assert r.exit_code == 1 and "the model returns one tensor" in r.stderr


def test_token_ids_need_an_integer_input(run_cli):
    """A float example input fails at the embedding with a hint; --input-dtype int64 draws ids below the vocabulary."""
    r = run_cli("partition", f"{TESTS}:token_classifier", "--input-shape", "1,6", "--input-dtype", "float32")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "--input-dtype int64" in r.stderr
    r = run_cli("partition", f"{TESTS}:token_classifier", "--input-shape", "1,6", "--input-dtype", "int64", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["input_dtype"] == "int64" and doc["neighbourhoods"][0]["kept"]  # the embedding stays with the teacher


def test_input_spec_draws_ids_below_the_vocabulary():
    ids = integer_inputs(m.token_classifier()).sample((4, 50), torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 20
    with pytest.raises(NdcError, match="cannot tell the vocabulary size"):
        integer_inputs(nn.Linear(2, 2))
    with pytest.raises(NdcError, match="unsupported input dtype"):
        InputSpec("bfloat16")


def test_a_pt2_archive_is_a_model_without_trust_or_shape(run_cli, tmp_path):
    model = m.mha_encoder().eval()
    program = torch.export.export(model, (torch.randn(2, 6, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "teacher.pt2"))
    doc, student = _pipeline(run_cli, tmp_path, "teacher.pt2")
    assert doc["frontend"] == "torch.export" and doc["input_shape"] == [1, 6, 8]
    plan = json.loads((tmp_path / "ndc-work" / "plan.json").read_text())
    assert plan["source"]["kind"] == "export"
    x = torch.randn(3, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_pt2_with_a_fixed_batch_says_how_to_export_it(run_cli, tmp_path):
    program = torch.export.export(m.mha_encoder().eval(), (torch.randn(2, 6, 8),))
    torch.export.save(program, str(tmp_path / "fixed.pt2"))
    r = run_cli("partition", "fixed.pt2")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "fixed batch size 2" in r.stderr
    (tmp_path / "junk.pt2").write_bytes(b"not an archive")
    r = run_cli("partition", "junk.pt2")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "not a readable torch.export archive" in r.stderr


def test_frontend_auto_says_which_it_used(run_cli):
    r = run_cli("partition", f"{TESTS}:with_branchy", "--input-shape", "1,3,8,8", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["frontend"] == "torch.fx"  # export cannot do better here
    assert "b (Branchy) could not be traced" in r.stderr
    r = run_cli("partition", f"{TESTS}:tuple_out", "--frontend", "export", "--leaf", "body")
    assert r.exit_code == 1 and "--leaf goes with --frontend fx" in r.stderr


def test_export_frontend_names_neighbourhoods_after_the_models_modules():
    traced = trace(m.mha_encoder(), (1, 6, 8), frontend="export")
    assert traced.frontend == "export"
    linear = next(n for n in traced.gm.graph.nodes if "linear" in str(n.target))
    assert list(linear.meta["nn_module_stack"]) == ["embed"]
    assert traced.settings()["frontend"] == "torch.export"

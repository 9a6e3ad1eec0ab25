"""Transformers through the CLI: partition -> distill --data-free -> stitch -> ONNX, as a user runs it.

Tiny Hugging Face models built from configs in code (BERT, ViT, GPT-2, Llama
with grouped-query attention) go through the torch.export frontend; an
``nn.MultiheadAttention`` encoder goes through torch.fx. At width 1.0 the
ONNX file computes the teacher's logits on fresh inputs; at width 0.5 it is a
valid ONNX model with the same output shape and fewer parameters.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from ndc.cli import main  # noqa: E402
from ndc.report import ort_session  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
HF = ROOT / "examples" / "transformers_models.py"
TESTS = ROOT / "tests" / "models_for_tests.py"

# name -> (MODEL, --input-shape, frontend the plan must record, trainable neighbourhoods)
MODELS = {
    "bert": (f"{HF}:bert", "1,8", "torch.export", 4),
    "vit": (f"{HF}:vit", "1,3,16,16", "torch.export", 4),
    "gpt2": (f"{HF}:gpt2", "1,8", "torch.export", 4),
    "llama": (f"{HF}:llama", "1,8", "torch.export", 4),
    "mha": (f"{TESTS}:mha_encoder", "1,6,8", "torch.fx", 4),
}
DISTILL = ["--data-free", "--width", "1.0,0.5", "--steps", "3", "--batch-size", "8", "--val-size", "16", "--quiet"]


def _cli(*args) -> dict:
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--format", "json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def _teacher(name: str) -> torch.nn.Module:
    from ndc.load import load_model

    return load_model(MODELS[name][0]).model.eval()


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module", params=sorted(MODELS))
def workspace(request, tmp_path_factory):
    name = request.param
    model, shape, frontend, trainable = MODELS[name]
    ws = tmp_path_factory.mktemp(name) / "ws"
    doc = _cli("partition", model, "--input-shape", shape, "-w", ws)
    assert doc["frontend"] == frontend and doc["strategy"] == "residual"
    assert sum(not n["kept"] for n in doc["neighbourhoods"]) == trainable
    if name in ("bert", "gpt2", "llama"):
        assert doc["input_dtype"] == "int64" and doc["output"] == "logits"
    rows = _cli("distill", *DISTILL, "-w", ws)["candidates"]
    assert [r["status"] for r in rows] == ["done"] * 2 * trainable
    return name, ws


def test_width_one_onnx_reproduces_the_teacher(workspace):
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    name, ws = workspace
    doc = _cli("stitch", "-o", ws / "s1.onnx", "--width", "1.0", "-w", ws)
    assert doc["params"] == doc["teacher_params"]
    onnx.checker.check_model(str(ws / "s1.onnx"))
    plan = load_teacher(Workspace(ws)).plan
    x = plan.inputs.sample((5, *plan.input_shape[1:]), torch.Generator().manual_seed(7))  # fresh inputs
    session = ort_session(str(ws / "s1.onnx"), 1)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = _logits(_teacher(name)(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_width_half_is_a_smaller_valid_onnx_model(workspace):
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    name, ws = workspace
    doc = _cli("stitch", "-o", ws / "s5.onnx", "--width", "0.5", "-w", ws)
    assert doc["params"] < doc["teacher_params"]
    onnx.checker.check_model(str(ws / "s5.onnx"))
    plan = load_teacher(Workspace(ws)).plan
    x = plan.inputs.sample((3, *plan.input_shape[1:]), torch.Generator().manual_seed(8))
    session = ort_session(str(ws / "s5.onnx"), 1)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert got.shape == tuple(_logits(_teacher(name)(x)).shape)

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
    for noise in ("Evaluation failed", "FutureWarning"):  # the exporters' internal chatter stays theirs
        assert noise not in r.stderr, r.stderr
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
    tied = [note for note in doc["notes"] if "tied weights" in note]  # GPT-2's embedding is its output head's weight
    assert tied == ([f"stem and head share lm_head.weight ({100 * 32:,} parameters, tied weights): each counts it, "
                     "the teacher once"] if name == "gpt2" else [])
    counted = sum(n["params"] for n in doc["neighbourhoods"])
    assert counted == doc["teacher"]["params"] + (100 * 32 if name == "gpt2" else 0)
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


# ------------------------------------------------------------- loading and errors (no distillation)


def _hf(name: str) -> torch.nn.Module:
    from ndc.load import load_model

    model = load_model(f"{HF}:{name}").model
    model.config.use_cache = False
    return model


def test_tied_weights_saved_by_hugging_face_load(tmp_path):
    from safetensors.torch import save_model

    from ndc.load import load_model

    source = _hf("gpt2")
    source.save_pretrained(tmp_path / "hf")  # keeps transformer.wte.weight, drops the tied lm_head.weight
    save_model(source, str(tmp_path / "st.safetensors"))  # keeps lm_head.weight instead
    x = torch.randint(0, 100, (2, 8))
    for weights in (tmp_path / "hf" / "model.safetensors", tmp_path / "st.safetensors"):
        model = load_model(f"{HF}:gpt2", weights=str(weights)).model
        with torch.no_grad():
            assert torch.equal(model(x).logits, source(x).logits)


def _save_program(model, path):
    program = torch.export.export(model.eval(), (torch.randint(0, 100, (2, 8)),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(x).logits


def test_gpt2_archive_reads_ids_through_a_view(tmp_path):
    from ndc.load import load_model

    _save_program(_Logits(_hf("gpt2")), tmp_path / "gpt2.pt2")  # GPT-2 embeds input_ids.view(-1, L)
    loaded = load_model(str(tmp_path / "gpt2.pt2"))
    assert loaded.inputs.dtype == "int64" and loaded.inputs.high == 100


def test_archive_exported_straight_from_hugging_face_loads(tmp_path):
    import subprocess
    import sys

    _save_program(_hf("gpt2"), tmp_path / "raw.pt2")  # returns a CausalLMOutputWithCrossAttentions
    # A fresh process, where transformers' output classes are not imported (so not registered with pytree) yet.
    code = (f"from ndc.load import load_model; l = load_model({str(tmp_path / 'raw.pt2')!r}); "
            "print(l.input_shape, l.inputs.dtype, l.inputs.high)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["(1,", "8)", "int64", "100"], r.stderr
    assert r.stderr == ""


@pytest.mark.parametrize("args, expected", [
    (["vit", "--input-shape", "1,3,32,32"], "Input image size (32*32) doesn't match model (16*16) in module vit.embeddings"),
    (["gpt2", "--input-dtype", "float32"], ("in module transformer.wte (Embedding); check --input-shape / --input-dtype "
                                            "(token ids? pass --input-dtype int64)")),
])
def test_an_input_a_hugging_face_model_rejects_is_said_first(args, expected, tmp_path):
    r = CliRunner().invoke(main, ["partition", f"{HF}:{args[0]}", *args[1:], "-w", str(tmp_path / "ws")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: the model does not run on the example input") and expected in error
    assert "rewrite" not in error and "torch.fx" not in error


def test_fx_failing_inside_transformers_does_not_advise_rewriting_it():
    from ndc.errors import NdcError
    from ndc.passes.trace import trace

    with pytest.raises(NdcError) as e:
        trace(_hf("vit"), (1, 3, 16, 16), frontend="fx")
    msg = str(e.value)
    assert "at generic.py:" in msg and "installed package transformers" in msg and "--frontend export" in msg
    assert "rewrite that line" not in msg


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_cuts_by_layers_keep_only_the_embedding_lookup_with_the_teacher(name, tmp_path):
    # a cut right after the token lookup: the first attention block is distilled, not kept in the stem with the table
    out = _cli("partition", MODELS[name][0], "--input-shape", MODELS[name][1], "--by", "layers", "-w", tmp_path)
    stem, first = out["neighbourhoods"][:2]
    assert stem["kept"] and stem["params"] == 100 * 32  # the vocabulary's table alone
    assert not first["kept"] and first["input_shape"] == [1, 8, 32]


def test_cut_at_a_module_of_an_exported_graph(tmp_path):
    # an exported graph keeps no submodules, only each node's module path: a module name is still a cut
    out = _cli("partition", MODELS["gpt2"][0], "--input-shape", "1,8", "--by", "cuts", "--cut", "transformer.drop",
               "--cut", "transformer.h.0", "-w", tmp_path)
    assert [nb["name"] for nb in out["neighbourhoods"]][:2] == ["stem", "transformer.h.0"]


def test_a_width_that_shrinks_nothing_is_said(tmp_path):
    ws = tmp_path / "ws"
    _cli("partition", MODELS["mha"][0], "--input-shape", MODELS["mha"][1], "-w", ws)
    preview = _cli("distill", "--width", "0.5", "--dry-run", "--only", "layers.0.attn", "-w", ws)["candidates"][0]
    assert preview["student_params"] == preview["teacher_params"]
    assert "also layers.0.attn (nn.MultiheadAttention) keeps its width" in preview["kept_dims"][0]["why"]
    r = CliRunner().invoke(main, ["distill", "--width", "0.5", "--only", "layers.0.attn", "--data-free", "--steps", "2",
                                  "--batch-size", "8", "--val-size", "16", "--quiet", "-w", str(ws)])
    assert r.exit_code == 0, r.stderr
    assert ("warning: width=0.5 shrank nothing in layers.0.attn: the student is the teacher's size "
            "(ndc distill --dry-run says what kept each dimension)") in r.stderr


def test_the_library_result_keeps_why_its_source_was_chosen(tmp_path):
    # the warning loop's own 'why' once replaced DistillResult.source_reason
    from ndc import stages
    from ndc.distill import DistillConfig
    from ndc.ir import Spec
    from ndc.workspace import Workspace

    ws = tmp_path / "ws"
    _cli("partition", MODELS["mha"][0], "--input-shape", MODELS["mha"][1], "-w", ws)
    said = []
    result = stages.distill(Workspace(ws), [Spec(width=0.5)], DistillConfig(source="noise", steps=2, batch_size=8, val_size=16),
                            only=("layers.0.attn",), warn=said.append)
    assert any("shrank nothing in layers.0.attn" in line for line in said)
    assert result.source == "noise" and "shrank" not in result.source_reason and "dry-run" not in result.source_reason

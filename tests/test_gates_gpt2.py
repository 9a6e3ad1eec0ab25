"""Gates on exported graphs: GPT-2's Conv1D (``aten.addmm`` by an ``(in, out)`` weight) and exported convolutions.

An exported graph has no ``nn.Linear``/``nn.Conv2d`` modules: its layers are
ATen functions on ``get_attr`` weights. GPT-2's MLP multiplies by its
``Conv1D`` weights with ``addmm``; its hidden features carry gates as an
``nn.Linear`` MLP's do.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from ndc.distill.gates import GatedStudent
from ndc.metrics import count_params
from tests.test_gates import published
from tests.conftest import distill_json

pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parent.parent
HF = ROOT / "examples" / "transformers_models.py"


def _part(factory: str, nb: str, shape, frontend: str = "auto"):
    from ndc.load import LoadedModel, load_model
    from ndc.passes.inputs import InputSpec
    from ndc.plan import Teacher, partition_model

    if factory == "tiny_resnet":
        from tests.models_for_tests import tiny_resnet

        plan, traced = partition_model(LoadedModel(tiny_resnet().eval(), {"kind": "test"}), shape, frontend=frontend)
    else:
        plan, traced = partition_model(load_model(f"{HF}:{factory}"), shape, inputs=InputSpec("int64", 100))
    return Teacher(plan, traced).part(nb), plan[nb].input_shape


@pytest.mark.parametrize("factory, nb, shape, frontend, groups", [
    ("gpt2", "transformer.h.0.mlp", (1, 8), "auto", ["transformer.h.0.mlp.c_fc.out_features"]),
    # SDPA keeps heads apart: whole heads are gated through c_proj (addmm), as BERT's through its nn.Linear
    ("gpt2", "transformer.h.0.attn", (1, 8), "auto", ["transformer.h.0.attn.c_attn.out_features[0:32] in blocks of 8"]),
    ("tiny_resnet", "layer1.0", (1, 3, 16, 16), "export", ["layer1.0.conv1.out_channels"]),  # aten.conv2d
], ids=["gpt2-mlp", "gpt2-attn", "resnet-export"])
def test_exported_layers_carry_gates_and_closed_gates_remove_exactly_their_channels(factory, nb, shape, frontend, groups):
    part, input_shape = _part(factory, nb, shape, frontend)
    gated = GatedStudent(part)
    assert [gated.an.name(g) for g in gated.groups] == groups and gated.ungated == {}
    with torch.no_grad():
        gated.log_alpha[0].copy_(torch.linspace(-3, 3, len(gated.log_alpha[0])))  # the first half closed
    rebuilt = published(part, gated)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *input_shape[1:], generator=g)  # a block of the residual stream reads hidden states, not ids
    assert torch.allclose(rebuilt.eval()(x), gated(x), atol=1e-5)
    assert count_params(rebuilt) < count_params(part)


def test_gpt2_mlp_gates_close_under_a_large_penalty(run_cli, tmp_path):
    """The QA repro: ``ndc distill --gates --gate-penalty 10 --only transformer.h.0.mlp`` on token data shrinks the MLP."""
    r = run_cli("partition", f"{HF}:gpt2", "--input-shape", "1,16")
    assert r.exit_code == 0, r.stderr
    ids = np.random.default_rng(0).integers(0, 100, (96, 16))
    np.savez(tmp_path / "ids.npz", x=ids)
    r, doc = distill_json(run_cli, "--gates", "--gate-penalty", "10", "--only", "transformer.h.0.mlp", "--data",
                          str(tmp_path / "ids.npz"), "--steps", "150", "--batch-size", "8", "--val-size", "16",
                          "--lr", "3e-3", "--quiet")
    assert r.exit_code == 0, r.stderr
    (row,) = doc["candidates"]
    assert row["status"] == "done" and "shrank nothing" not in r.stderr, r.stderr
    groups = row["gates"]["groups"]
    assert list(groups) == ["transformer.h.0.mlp.c_fc.out_features"] and row["gates"]["ungated"] == {}
    assert groups["transformer.h.0.mlp.c_fc.out_features"]["teacher"] == 128
    assert groups["transformer.h.0.mlp.c_fc.out_features"]["kept"] < 128
    assert row["student_params"] < row["teacher_params"]
    metrics = json.loads((tmp_path / "ndc-work" / "jobs" / "transformer.h.0.mlp" / "gates-10.0" / "metrics.json").read_text())
    assert metrics["gates"]["groups"] == groups

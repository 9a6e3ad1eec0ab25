"""Gated neighbourhoods: learned channel gates choose each neighbourhood's width; the result is an ordinary candidate."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from ndc.distill.config import DistillConfig
from ndc.distill.gates import GatedStudent
from ndc.ir import Spec
from ndc.metrics import count_params
from ndc.passes.rewrite import rebuild_student
from tests.conftest import distill_json, train_steps
from tests.test_rewrite import CASES, IDS, get_part

FAST = ["--data", "digits", "--limit", "200", "--steps", "120", "--batch-size", "32", "--val-size", "64", "--lr", "3e-3",
        "--quiet"]
NBS = ("layer1.0", "layer2.0", "layer3.0")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def published(part, gated: GatedStudent):
    """What stitch rebuilds from the student a gated job publishes (gates fixed, closed channels cut)."""
    gated.fix()
    gated.eval()
    spec = Spec(gates=0.5)
    module, record, _ = gated.student(part, spec, "teacher", 1, 0)
    rebuilt = rebuild_student(part, spec, record)
    rebuilt.load_state_dict(module.state_dict())
    return rebuilt


@pytest.mark.parametrize("family, name", CASES, ids=IDS)
def test_closed_gates_remove_exactly_their_channels(family, name):
    """The published student (closed channels cut, open gates folded) computes what the gated student computes."""
    part, shape = get_part(family, name)
    gated = GatedStudent(part)
    torch.manual_seed(0)
    with torch.no_grad():
        for la in gated.log_alpha:
            la.uniform_(-3, 3)  # about half the gates closed, the rest partly or fully open
    rebuilt = published(part, gated)
    x = torch.randn(3, *shape[1:])
    assert torch.allclose(rebuilt.eval()(x), gated(x), atol=1e-4, rtol=1e-4)
    if gated.groups:
        assert count_params(rebuilt) < count_params(part)
        assert all(0 < len(k) for k in gated.kept)


def test_the_mlp_hidden_features_are_gated():
    # (attention heads, and what keeps a group ungated: tests/test_gates_attention.py)
    part, _ = get_part("vit", "blocks.0.mlp")  # the MLP's hidden features are consumed by fc2 alone: gated
    assert [GatedStudent(part).an.name(g) for g in GatedStudent(part).groups] == ["blocks.0.mlp.fc1.out_features"]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_exported_graphs_gate_their_linear_layers_as_fx_graphs_do(frontend):
    # torch.export graphs (every Hugging Face model) call aten.linear with the weight as an attribute, not a module
    from ndc.load import LoadedModel
    from ndc.plan import Teacher, partition_model
    from tests import models_for_tests as m

    plan, traced = partition_model(LoadedModel(m.mha_encoder().eval(), {"kind": "test"}), (1, 6, 8), by="residual",
                                   frontend=frontend)
    part = Teacher(plan, traced).part("layers.0.fc1")
    gated = GatedStudent(part)
    assert [gated.an.name(g) for g in gated.groups] == ["layers.0.fc1.out_features"]
    with torch.no_grad():
        gated.log_alpha[0].copy_(torch.linspace(-3, 3, len(gated.log_alpha[0])))  # the first half closed
    gated.fix()
    spec = Spec(gates=0.5)
    module, record, _ = gated.eval().student(part, spec, "teacher", 1, 0)
    rebuilt = rebuild_student(part, spec, record)
    rebuilt.load_state_dict(module.state_dict())
    x = torch.randn(3, *plan["layers.0.fc1"].input_shape[1:])
    assert torch.allclose(rebuilt.eval()(x), gated(x), atol=1e-5)
    assert count_params(rebuilt) < count_params(part)


def test_the_penalty_sets_the_size_and_the_students_stitch_and_search(run_cli, ws, tmp_path):
    r, doc = distill_json(run_cli, "--gates", "--gate-penalty", "0,1,3", *FAST)
    assert r.exit_code == 0, r.stderr
    found = {(row["neighbourhood"], row["spec"]): row for row in doc["candidates"]}
    assert {row["status"] for row in doc["candidates"]} == {"done"}
    for nb in NBS:
        sizes = [found[nb, f"gates={p}"]["student_params"] for p in ("0.0", "1.0", "3.0")]
        assert sizes[0] == found[nb, "gates=0.0"]["teacher_params"]  # nothing to pay for: every channel stays
        free = found[nb, "gates=0.0"]  # ... and the teacher's own weights are the best student of its size
        assert free["final_error"] == free["initial_error"] < 1e-3
        assert sizes[0] >= sizes[1] >= sizes[2] and sizes[2] < sizes[0], (nb, sizes)
        row = found[nb, "gates=3.0"]
        assert row["job"] == {"kind": "gates", "penalty": 3.0, "gate_steps": 84}
        kept = row["gates"]["groups"]
        student = json.loads((ws / "jobs" / nb / "gates-3.0" / "student.json").read_text())
        assert {k: len(v["kept"]) for k, v in student["record"]["dims"].items()} == \
               {k: v["kept"] for k, v in kept.items() if v["kept"] < v["teacher"]}
    assert ("gates=0.0 shrank nothing in layer1.0, layer2.0, layer3.0: the student is the teacher's size (no gate "
            "closed; a larger --gate-penalty closes more)") in r.stderr
    total = [sum(found[nb, f"gates={p}"]["student_params"] for nb in NBS) for p in ("0.0", "1.0", "3.0")]
    assert total[0] > total[1] > total[2]
    # gate-derived candidates are candidates like any other: stitched, exported, chosen by search under a budget
    r = run_cli("stitch", "-o", str(tmp_path / "s.onnx"), "--spec", "gates=3.0", "--data", "digits", "--limit", "300",
                "--format", "json", "-w", str(ws))
    assert r.exit_code == 0, r.stderr
    stitched = json.loads(r.stdout)["params"]
    assert stitched < json.loads(r.stdout)["teacher_params"]
    r = run_cli("kd", "--spec", "gates=3.0", "--data", "digits", "--limit", "200", "--epochs", "1", "--format", "json",
                "-w", str(ws))  # the baseline trains the same learned architecture from scratch
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["params"] == stitched
    budget = total[1] + 1000  # the stem and head are kept with the teacher
    r = run_cli("search", "--budget", f"params={budget}", "--data", "digits", "--limit", "300", "--eval-size", "100",
                "--format", "json", "-w", str(ws))
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["params"] <= budget and any(s.startswith("gates=") for s in result["selection"].values())


def test_attention_alone_carries_no_gate_and_keeps_the_teachers_weights(run_cli, tmp_path):
    r = run_cli("partition", f"{ROOT / 'tests' / 'models_for_tests.py'}:mha_encoder", "--input-shape", "1,6,8")
    assert r.exit_code == 0, r.stderr
    r, doc = distill_json(run_cli, "--gates", "--only", "layers.0.attn", "--data-free", "--steps", "6", "--batch-size", "8",
                          "--val-size", "16", "--quiet")
    assert r.exit_code == 0, r.stderr
    row = doc["candidates"][0]
    assert row["gates"]["groups"] == {} and row["student_params"] == row["teacher_params"]
    assert row["final_error"] == row["initial_error"] < 1e-3  # trained gateless, it only drifted from the teacher
    assert ("gates=0.3 shrank nothing in layers.0.attn: the student is the teacher's size (no channel group there can "
            "shrink: ndc distill --dry-run --width 0.5 says what keeps each dimension)") in r.stderr


def test_a_resumed_gated_job_continues_exactly_across_the_gate_phase(partitioned):
    from ndc.distill.engine import Item
    from ndc.distill.kinds import make_trainer
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    part = load_teacher(Workspace(partitioned)).part("layer2.0")
    cfg = DistillConfig(data="digits", lr=3e-3)
    item = Item("layer2.0", "gates=1.0", "cd" * 32)
    a = make_trainer(part, item, 2, [], cfg, 10, "cpu")  # gate phase: steps 1-7
    a.start({"mse": 1.0, "relative": 1.0})
    train_steps(a, part, range(4))
    tensors, meta = a.state()
    b = make_trainer(part, item, 2, [], cfg, 10, "cpu")
    b.load_state({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    train_steps(a, part, range(4, 9))
    train_steps(b, part, range(4, 9))
    assert a.model.fixed is not None and b.model.fixed is not None
    for (n, v), (m, w) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert n == m and torch.allclose(v, w, atol=1e-6), n
    assert [k.tolist() for k in a.model.kept] == [k.tolist() for k in b.model.kept]


@pytest.mark.parametrize("args, message", [
    (["--gate-penalty", "1"], "--gate-penalty goes with --gates"),
    (["--gates", "--gate-penalty", "-1"], "gates (the gate penalty) must be 0 or more"),
    (["--gates", "--gate-penalty", "nan"], "gates (the gate penalty) must be 0 or more"),
    (["--spec", "width=0.5,gates=1"], "gates learn the width themselves"),
])
def test_user_errors_are_one_line(run_cli, ws, args, message):
    r, _ = distill_json(run_cli, *args, *FAST)
    assert r.exit_code != 0 and message in r.stderr, r.stderr
    assert not list(ws.glob("jobs/*/*/weights.safetensors"))

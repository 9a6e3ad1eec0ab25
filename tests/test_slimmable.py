"""Slimmable neighbourhoods: one weight-shared job per neighbourhood makes every width a candidate of its own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ndc.distill.config import DistillConfig
from ndc.ir import Spec
from tests.conftest import NoiseBatch, distill_json, train_steps
from ndc.workspace import sha256_file

FAST = ["--data", "digits", "--limit", "200", "--steps", "40", "--batch-size", "32", "--val-size", "64", "--lr", "3e-3",
        "--quiet"]
NBS = ("layer1.0", "layer2.0", "layer3.0")


def rows(doc) -> dict:
    return {(row["neighbourhood"], row["spec"]): row for row in doc["candidates"]}


def test_the_shared_student_of_each_width_is_the_width_student_rewrite_makes(partitioned):
    """Width k of a slimmable job starts as exactly the separately made width-k student: same channels, same weights."""
    from ndc.distill.slimmable import SlimmableStudent
    from ndc.passes.rewrite import make_student
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    part = load_teacher(Workspace(partitioned)).part("layer2.0")
    members = [Spec(width=k, slim="chain") for k in (1.0, 0.75, 0.5, 0.25)]
    shared = SlimmableStudent(part, [make_student(part, s) for s in members], fixed_widest=True).eval()
    x = torch.randn(4, *part.graph.find_nodes(op="placeholder")[0].meta["tensor_meta"].shape[1:])
    for k, spec in enumerate(members):
        alone = make_student(part, Spec(width=spec.width)).module.eval()
        state = shared.state_of(k)
        assert {n: v.shape for n, v in state.items()} == {n: v.shape for n, v in alone.state_dict().items()}
        assert all(torch.equal(state[n], v) for n, v in alone.state_dict().items())
        assert torch.allclose(shared.run(k, x), alone(x), atol=1e-6)
    # the narrower widths' weights are slices of one set of shared parameters
    shared.train()
    loss = sum(shared.run(k, x).square().mean() for k in range(1, len(members)))
    loss.backward()
    assert all(p.grad is None for p in shared.widths[0].parameters())  # the widest is the teacher's part, frozen
    assert shared.full.get_parameter("layer2.0.conv1.weight").grad.abs().sum() > 0


def test_one_job_per_neighbourhood_makes_every_width_a_candidate(run_cli, ws, tmp_path):
    r, doc = distill_json(run_cli, "--slimmable", "0.25,0.5,1.0", "--width", "0.5", *FAST)
    assert r.exit_code == 0, r.stderr
    found = rows(doc)
    assert set(found) == {(nb, s) for nb in NBS for s in ("width=0.25,slim=chain", "width=0.5,slim=chain",
                                                           "width=1.0,slim=chain", "width=0.5")}
    for nb in NBS:
        slim = [found[nb, f"width={k},slim=chain"] for k in ("0.25", "0.5", "1.0")]
        assert all(row["status"] == "done" and row["job"]["kind"] == "slimmable" for row in slim)
        assert slim[0]["job"] == slim[1]["job"] and slim[0]["job"]["assistant"] == "chain"
        assert slim[0]["student_params"] < slim[1]["student_params"] < slim[2]["student_params"]
        assert slim[1]["student_params"] == found[nb, "width=0.5"]["student_params"]  # the same architecture
        assert slim[2]["final_error"] < 1e-2  # width 1.0 is the teacher's part itself
        assert all(row["final_error"] < 0.9 * row["initial_error"] for row in slim[:2])
        metrics = [json.loads((ws / "jobs" / nb / f"width-{k}_slim-chain" / "metrics.json").read_text())
                   for k in ("0.25", "0.5", "1.0")]
        assert len({m["key"] for m in metrics}) == 1  # one job: one key for all its widths
        separate = json.loads((ws / "jobs" / nb / "width-0.5" / "metrics.json").read_text())
        assert separate["key"] != metrics[0]["key"] and "job" not in separate  # never confused with the separate job
    # every width is an ordinary candidate: search compares them with the separate one, stitch exports them
    r = run_cli("search", "--data", "digits", "--limit", "300", "--eval-size", "100", "--format", "json", "-w", str(ws))
    assert r.exit_code == 0, r.stderr
    labels = {o["spec"] for o in json.loads(r.stdout)["table"]["layer1.0"]}
    assert {"width=0.5", "width=0.5,slim=chain", "width=0.25,slim=chain"} <= labels
    r = run_cli("stitch", "-o", str(tmp_path / "s.onnx"), "--spec", "width=0.25,slim=chain", "--data", "digits",
                "--limit", "300", "--format", "json", "-w", str(ws))
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["selection"] == {nb: "width=0.25,slim=chain" for nb in NBS}
    r = run_cli("eval", str(tmp_path / "s.onnx"), "--data", "digits", "--limit", "300", "-w", str(ws))
    assert r.exit_code == 0, r.stderr


def test_the_key_covers_every_width_and_the_assistant(run_cli, ws):
    assert distill_json(run_cli, "--slimmable", "0.25,0.5", *FAST)[0].exit_code == 0
    _, doc = distill_json(run_cli, "--slimmable", "0.25,0.5", *FAST)
    assert {row["status"] for row in doc["candidates"]} == {"skipped"}
    _, doc = distill_json(run_cli, "--slimmable", "0.25,0.5,0.75", *FAST)  # another set of widths: another job
    assert {row["status"] for row in doc["candidates"]} == {"done"}
    r, doc = distill_json(run_cli, "--slimmable", "0.25,0.5", "--assistant", "none", *FAST)
    assert r.exit_code == 0, r.stderr
    assert {row["spec"] for row in doc["candidates"]} == {"width=0.25,slim=teacher", "width=0.5,slim=teacher"}
    assert {row["job"]["assistant"] for row in doc["candidates"]} == {"none"}
    assert (ws / "jobs" / "layer1.0" / "width-0.5_slim-chain").is_dir()  # the chain job's students are kept


@pytest.mark.xdist_group("ray")
def test_fused_engine_and_ray_train_slimmable_and_gated_jobs(run_cli, ws, tmp_path):
    pytest.importorskip("ray")
    other = tmp_path / "other"
    shutil.copytree(ws, other)
    args = ["--slimmable", "0.25,0.5", "--gates", "--gate-penalty", "1", "--width", "0.5", *FAST]
    r, local = distill_json(run_cli, *args)
    assert r.exit_code == 0, r.stderr
    r, ray = distill_json(run_cli, *args, "--backend", "ray", "--workers", "2", "-w", str(other))
    assert r.exit_code == 0, r.stderr
    assert ray["backend"] == "ray" and {row["status"] for row in ray["candidates"]} == {"done"}
    for p in ws.glob("jobs/*/*/weights.safetensors"):  # units are deterministic: the same students wherever they ran
        assert sha256_file(p) == sha256_file(other / p.relative_to(ws))
    r, fused = distill_json(run_cli, *args, "--engine", "fused", "--force")
    assert r.exit_code == 0, r.stderr
    assert fused["engine"] == "fused" and {row["status"] for row in fused["candidates"]} == {"done"}
    for key, row in rows(fused).items():
        assert row["final_error"] <= 1.1 * rows(local)[key]["final_error"] + 1e-3, key


def test_a_resumed_slimmable_job_continues_exactly(partitioned):
    """state() and load_state() carry the shared weights, every width's best weights and histories."""
    from ndc.distill.kinds import make_trainer
    from ndc.distill.engine import Item
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    teacher = load_teacher(Workspace(partitioned))
    part = teacher.part("layer1.0")
    cfg = DistillConfig(data="digits", lr=3e-3)
    item = Item("layer1.0", "width=1.0,slim=chain", "ab" * 32, 0.0, {"members": ["width=1.0,slim=chain", "width=0.5,slim=chain"]})
    from ndc.distill.trainer import heldout_errors

    a = make_trainer(part, item, 1, [], cfg, 10, "cpu")
    a.start(heldout_errors([a], [NoiseBatch(part, 100)])[0])
    train_steps(a, part, range(3))
    a.evaluate(heldout_errors([a], [NoiseBatch(part, 100)])[0])
    tensors, meta = a.state()
    b = make_trainer(part, item, 1, [], cfg, 10, "cpu")
    b.load_state({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    train_steps(a, part, range(3, 6))
    train_steps(b, part, range(3, 6))
    for (n, v), (m, w) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert n == m and torch.allclose(v, w, atol=1e-6), n
    assert [e for e, _ in a.width_best] == [e for e, _ in b.width_best] and a.member_history == b.member_history


@pytest.mark.parametrize("args, message", [
    (["--assistant", "none"], "--assistant goes with --slimmable"),
    (["--slimmable", "1.0"], "needs a width below 1.0"),
    (["--slimmable", "0,0.5"], "width must be in (0, 1]"),
    (["--slimmable", "0.5,x"], "bad --slimmable"),
    (["--slimmable", "0.5", "--assistant", "both"], "Invalid value for '--assistant'"),
    (["--spec", "width=0.5,slim=chain,sparsity=0.5"], "cannot be combined with sparsity"),
])
def test_user_errors_are_one_line(run_cli, ws, args, message):
    r, _ = distill_json(run_cli, *args, *FAST)
    assert r.exit_code != 0 and message in r.stderr, r.stderr
    assert not list(ws.glob("jobs/*/*/weights.safetensors"))

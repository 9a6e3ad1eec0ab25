"""`ndc partition` as a user runs it: output, files, exit codes, determinism."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import torch

from ndc.zoo import resnet20

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "models.py"


def test_resnet20_residual_json(run_cli, tmp_path):
    r = run_cli("partition", f"{EXAMPLES}:resnet20", "--input-shape", "1,3,32,32", "--by", "residual", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    trainable = [n for n in doc["neighbourhoods"] if not n["kept"]]
    kept = [n["name"] for n in doc["neighbourhoods"] if n["kept"]]
    assert len(trainable) == 9 and kept == ["stem", "head"]
    for n in doc["neighbourhoods"]:
        assert {"name", "kept", "params", "flops", "input_shape", "output_shape"} <= set(n)
    plan = json.loads((tmp_path / "ndc-work" / "plan.json").read_text())
    assert plan["source"]["kind"] == "factory" and len(plan["neighbourhoods"]) == 11
    assert (tmp_path / "ndc-work" / "teacher.safetensors").is_file()


def test_text_table_and_explain(run_cli):
    r = run_cli("partition", "ndc.zoo:resnet20", "--input-shape", "1,3,32,32", "--explain")
    assert r.exit_code == 0
    assert "layer1.0" in r.stdout and "kept" in r.stdout and "9 neighbourhoods to distil, 2 kept" in r.stdout
    assert "layer1.0: could also be cut at add" in r.stdout
    assert "relu stays alive until layer1_0_shortcut" in r.stdout


def test_a_model_no_cut_divides_is_one_neighbourhood_and_said_so(run_cli, tmp_path):
    (tmp_path / "linear.py").write_text("import torch.nn as nn\n\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    r = run_cli("partition", "linear.py:make", "--input-shape", "1,1,8,8")
    assert r.exit_code == 0, r.stderr
    assert "warning: no cut could be made (--by layers): the whole model is one neighbourhood" in r.stderr
    assert "1 neighbourhood to distil, 0 kept" in r.stdout


def test_input_shape_is_guessed_with_a_warning(run_cli):
    r = run_cli("partition", "ndc.zoo:resnet20", "--format", "json", "--depth", "2", "--cut", "layer2.0")
    assert r.exit_code == 0
    assert ("no --input-shape given; guessing 1,3,32,32: the channels are the first layer's, 32x32 is a guess (give "
            "--input-shape with the size the teacher was trained on)") in r.stderr
    assert "--depth is ignored with --by auto: it goes with --by module" in r.stderr
    assert "--cut is ignored with --by auto: it goes with --by cuts" in r.stderr
    assert json.loads(r.stdout)["input_shape"] == [1, 3, 32, 32]
    # a guessed size that the data does not have is doubted wherever the teacher meets the data (a 28x28 teacher
    # padded to 32x32 can lose most of its accuracy)
    doubt = ("ndc partition guessed the teacher's input shape 3x32x32 (32x32 is a guess), but the examples of digits "
             "are 1x8x8, fitted to it: if the teacher was trained on them, partition again with --input-shape 1,3,8,8")
    r = run_cli("eval", "--data", "digits", "--limit", "50")
    assert r.exit_code == 0 and doubt in r.stderr, r.stderr
    r = run_cli("partition", "ndc.zoo:resnet20", "--input-shape", "1,3,8,8")
    assert r.exit_code == 0 and "guess" not in r.stderr
    r = run_cli("eval", "--data", "digits", "--limit", "50")
    assert r.exit_code == 0 and "guessed" not in r.stderr, r.stderr


def test_pickled_model_needs_trust(run_cli, tmp_path):
    torch.save(resnet20(), tmp_path / "model.pt")
    r = run_cli("partition", "model.pt", "--input-shape", "1,3,32,32")
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "--trust-pickle" in r.stderr
    assert not (tmp_path / "ndc-work" / "plan.json").exists()
    r = run_cli("partition", "model.pt", "--input-shape", "1,3,32,32", "--trust-pickle", "--format", "json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["neighbourhoods"]) == 11


def test_user_errors_are_one_line(run_cli):
    cases = [
        (["partition", "missing.pt"], "no such file"),
        (["partition", "ndc.zoo:resnet20", "--by", "blocks"], "valid strategies: auto, residual, module, layers, cuts"),
        (["partition", "ndc.zoo:resnet20", "--input-shape", "1,3,x"], "bad --input-shape"),
        (["partition", "ndc.zoo:resnet20", "--input-shape", "1,5,32,32"], "check --input-shape"),
        (["partition", "ndc.zoo:resnet20", "--input-shape", "1,3,32,32", "--by", "cuts", "--cut", "layer1.0.conv1"], "cannot cut at layer1.0.conv1"),
        (["partition", f"{ROOT / 'tests' / 'models_for_tests.py'}:root_branch", "--input-shape", "1,3,4,4"], "cannot trace RootBranch.forward"),
        (["partition", "weights.safetensors"], "weights.safetensors is weights without an architecture; give a factory"),
        (["partition", "hf"], "hf is a folder; give a factory that builds the model and the weights file: "
                              "ndc partition my_model.py:make --weights hf/model.safetensors"),
    ]
    pathlib.Path("hf").mkdir()
    pathlib.Path("weights.safetensors").write_bytes(b"")
    for args, needle in cases:
        r = run_cli(*args)
        assert r.exit_code == 1, args
        assert needle in r.stderr and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr


def test_failed_partition_keeps_the_previous_plan(run_cli, tmp_path):
    assert run_cli("partition", "ndc.zoo:resnet20", "--input-shape", "1,3,32,32").exit_code == 0
    before = (tmp_path / "ndc-work" / "plan.json").read_bytes()
    assert run_cli("partition", "ndc.zoo:resnet20", "--input-shape", "1,5,32,32").exit_code == 1
    assert (tmp_path / "ndc-work" / "plan.json").read_bytes() == before


def test_plan_is_byte_identical_across_hash_seeds(tmp_path):
    torch.save(resnet20(), tmp_path / "model.pt")
    plans = []
    for seed in ("1", "2"):
        ws = tmp_path / f"ws{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-m", "ndc", "partition", "model.pt", "--trust-pickle", "--input-shape", "1,3,32,32",
                        "-w", str(ws)], cwd=tmp_path, env=env, check=True, capture_output=True)
        plans.append((ws / "plan.json").read_bytes())
    assert plans[0] == plans[1]


def test_an_unknown_leaf_is_the_whole_error_under_frontend_auto(run_cli):
    # auto went on to torch.export, which takes no --leaf, and appended its failure in brackets
    r = run_cli("partition", "ndc.zoo:resnet20", "--input-shape", "1,3,32,32", "--leaf", "nosuch")
    assert r.exit_code == 1 and "--leaf nosuch: the model has no submodule of that name" in r.stderr, r.stderr
    assert "torch.export" not in r.stderr and r.stderr.count("\n") == 1, r.stderr

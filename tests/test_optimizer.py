"""End-to-end training of a transformer takes AdamW: SGD at a CNN's rate collapses it.

A small BERT fine-tuned with SGD at 1e-2 (the paper's rate for ResNets)
fell to its majority class, and trained from scratch at 0.1 it never left
it; ``--optimizer auto`` gives a model with attention or layer norms and no
batch norm AdamW (1e-4 to fine-tune, 1e-3 from scratch), and says so.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch.nn as nn

from ndc.errors import NdcError
from ndc.training import choose_optimizer

ATTENTION = pathlib.Path(__file__).resolve().parent / "test_gates_attention.py"


@pytest.mark.parametrize("factory, expected", [("resnet20", "sgd"), ("vit", "adamw"), ("residual_mlp", "sgd")])
def test_auto_takes_adamw_for_transformers_and_sgd_for_the_rest(factory, expected):
    from ndc import zoo

    assert choose_optimizer("auto", getattr(zoo, factory)())[0] == expected
    assert choose_optimizer("sgd", getattr(zoo, factory)()) == ("sgd", None)  # asked for: no reason given


def test_exported_transformer_graphs_hold_their_norms_as_aten_operators():
    import torch

    from tests.test_gates_attention import Encoder

    exported = torch.export.export(Encoder().eval(), (torch.randn(2, 6, 8),)).module()
    assert choose_optimizer("auto", exported)[0] == "adamw"
    with pytest.raises(NdcError, match="unknown --optimizer 'adam'"):
        choose_optimizer("adam", nn.Linear(2, 2))


def test_finetune_and_kd_of_a_transformer_take_adamw(run_cli, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tokens.npz", x=rng.standard_normal((160, 6, 8)).astype(np.float32),
             y=rng.standard_normal((160, 3)).astype(np.float32))
    data = ["--data", str(tmp_path / "tokens.npz")]
    for args in (["partition", f"{ATTENTION}:two_useful_heads", "--input-shape", "1,6,8"],
                 ["distill", "--width", "0.5", *data, "--steps", "5", "--quiet"],
                 ["stitch", "--width", "0.5", "-o", str(tmp_path / "s.onnx"), *data]):
        r = run_cli(*args)
        assert r.exit_code == 0, r.stderr

    def run(*args):
        r = run_cli(*args, "--epochs", "1", "--restart", "--format", "json")
        assert r.exit_code == 0, r.stderr
        return r, json.loads(r.stdout)

    r, doc = run("finetune")
    assert (doc["optimizer"], doc["lr"]) == ("adamw", 1e-4)
    assert "optimizer adamw: the model has attention or layer norms and no batch norm (a transformer)" in r.stderr
    assert doc["augment"] is False  # not images: nothing was translated
    doc = run("kd", "--width", "0.5")[1]
    assert (doc["optimizer"], doc["lr"]) == ("adamw", 1e-3)  # from scratch
    doc = run("finetune", "--optimizer", "sgd", "--lr", "0.005")[1]
    assert (doc["optimizer"], doc["lr"]) == ("sgd", 0.005)

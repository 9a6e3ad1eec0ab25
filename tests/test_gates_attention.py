"""Hand-written attention is gated per head, as ``F.scaled_dot_product_attention`` is.

``(q @ kᵀ / √d).softmax(-1) @ v`` with heads split by ``view`` and
``transpose`` (classic BERT and ViT code): a softmax mixes only along its
``dim``, so the heads, on another axis of the scores, pass through it. A
softmax over the heads' axis, or a layer norm over the channels before the
split, still stops them.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ndc.distill.gates import GatedStudent
from ndc.ir import Spec
from ndc.metrics import count_params
from tests.conftest import distill_json
from tests.test_gates import published

HERE = pathlib.Path(__file__).resolve()
HEADS, DIM = 4, 16


class HandAttention(nn.Module):
    """Pre-norm multi-head attention written out: the softmax as a method, a function or a module, along ``axis``."""

    def __init__(self, softmax: str = "method", axis: int = -1, norm_v: bool = False):
        super().__init__()
        self.head_dim, self.softmax, self.axis = DIM // HEADS, softmax, axis
        self.norm = nn.LayerNorm(DIM)
        self.q, self.k, self.v, self.proj = (nn.Linear(DIM, DIM) for _ in range(4))
        self.v_norm = nn.LayerNorm(DIM) if norm_v else nn.Identity()  # over the channels of every head together
        self.module = nn.Softmax(dim=axis)

    def split(self, t):
        b, n = t.shape[:2]
        return t.view(b, n, HEADS, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, n, c = x.shape
        y = self.norm(x)
        q, k, v = self.split(self.q(y)), self.split(self.k(y)), self.split(self.v_norm(self.v(y)))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.softmax == "method":
            attn = scores.softmax(self.axis)
        elif self.softmax == "function":
            attn = F.softmax(scores, dim=self.axis)
        else:
            attn = self.module(scores)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Encoder(nn.Module):
    """Tokens (B, 6, 8) -> 3 values through one attention block (the neighbourhood ``attn``)."""

    def __init__(self, **attention):
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.attn = HandAttention(**attention)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)).mean(1))


def two_useful_heads() -> Encoder:
    """The CLI's teacher: heads 0 and 1 carry the block's output, heads 2 and 3 next to nothing."""
    torch.manual_seed(0)
    model = Encoder()
    with torch.no_grad():
        model.attn.proj.weight[:, : 2 * DIM // HEADS] *= 3
        model.attn.proj.weight[:, 2 * DIM // HEADS:] *= 0.01
    return model


def attention_part(**attention):
    from ndc.load import LoadedModel
    from ndc.plan import Teacher, partition_model

    torch.manual_seed(0)
    plan, traced = partition_model(LoadedModel(Encoder(**attention).eval(), {"kind": "test"}), (1, 6, 8), by="residual")
    return Teacher(plan, traced).part("attn")


@pytest.mark.parametrize("attention", [dict(softmax="method"), dict(softmax="function"), dict(softmax="module"),
                                       dict(axis=-2)],  # over the queries: the heads are as far from it
                         ids=["method", "function", "module", "over-queries"])
def test_heads_pass_a_softmax_over_another_axis_and_closed_heads_are_cut_exactly(attention):
    part = attention_part(**attention)
    gated = GatedStudent(part)
    assert [gated.an.name(g) for g in gated.groups] == ["attn.q.out_features in blocks of 4"]  # q, k, v: whole heads
    assert gated.ungated == {}
    with torch.no_grad():
        gated.log_alpha[0].copy_(torch.tensor([3.0, -3.0, 3.0, -3.0]))  # heads 1 and 3 closed
    rebuilt = published(part, gated)
    x = torch.randn(3, 6, DIM, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rebuilt.eval()(x), gated(x), atol=1e-5)
    assert rebuilt.get_submodule("attn.q").out_features == rebuilt.get_submodule("attn.proj").in_features == 8
    assert count_params(rebuilt) < count_params(part)


@pytest.mark.parametrize("attention, stop", [
    (dict(softmax="method", axis=1), "it meets softmax (call_method softmax), taken to mix its channels"),
    (dict(softmax="function", axis=1), "it meets softmax (call_function softmax), taken to mix its channels"),
    (dict(softmax="module", axis=-3), "it meets attn.module (call_module Softmax), taken to mix its channels"),
    (dict(norm_v=True), "it meets attn.v_norm (call_module LayerNorm), taken to mix its channels"),
], ids=["method-over-heads", "function-over-heads", "module-over-heads", "layer-norm-over-channels"])
def test_a_softmax_or_norm_over_the_heads_keeps_them(attention, stop):
    part = attention_part(**attention)
    gated = GatedStudent(part)
    assert gated.an.free_groups() and not gated.groups
    ((group, why),) = gated.ungated.items()
    assert why.startswith(stop), why
    gated.fix()
    _, _, rows = gated.eval().student(part, Spec(gates=1.0), "teacher", 1, 0)  # the report says what stopped the heads
    assert [row["why"] for row in rows if row["dim"] == gated.an.keys()[group]] == [f"not gated: {why}"]


def test_the_zoo_vits_attention_is_gated_per_head():
    from tests.test_rewrite import get_part

    gated = GatedStudent(get_part("vit", "blocks.0.attn")[0])  # ``(q @ k.transpose(-2, -1) * scale).softmax(dim=-1)``
    assert [gated.an.name(g) for g in gated.groups] == ["blocks.0.attn.qkv.out_features in blocks of 16[0:4]"]
    assert gated.ungated == {}


def test_a_computed_view_shape_keeps_the_heads_instead_of_failing_to_publish():
    """BERT's ``x.view(x.size()[:-1] + (heads, head_dim))``: the rewrite cannot resize that shape, so no head closes."""
    from ndc.passes.rewrite import make_student

    class Bert(HandAttention):
        def split(self, t):
            return t.view(t.size()[:-1] + (HEADS, self.head_dim)).permute(0, 2, 1, 3)

    from ndc.load import LoadedModel
    from ndc.plan import Teacher, partition_model

    model = Encoder()
    model.attn = Bert()
    plan, traced = partition_model(LoadedModel(model.eval(), {"kind": "test"}), (1, 6, 8), by="residual")
    part = Teacher(plan, traced).part("attn")
    assert GatedStudent(part).groups == []
    assert make_student(part, Spec(width=0.5)).record["dims"] == {}


def gated_heads(run_cli, penalty: str, steps: str):
    """``two_useful_heads`` partitioned and its attention distilled with gates on noise: the result and its row."""
    r = run_cli("partition", f"{HERE}:two_useful_heads", "--input-shape", "1,6,8")
    assert r.exit_code == 0, r.stderr
    r, doc = distill_json(run_cli, "--gates", "--gate-penalty", penalty, "--only", "attn", "--data-free",
                          "--steps", steps, "--batch-size", "16", "--val-size", "32", "--lr", "1e-3", "--quiet")
    assert r.exit_code == 0, r.stderr
    (row,) = doc["candidates"]
    return r, row


def test_the_cli_drops_the_idle_heads_and_the_student_matches_the_teacher(run_cli):
    r, row = gated_heads(run_cli, "0.1", "120")
    assert row["status"] == "done" and "shrank nothing" not in r.stderr, r.stderr
    heads = row["gates"]["groups"]["attn.q.out_features in blocks of 4"]
    assert heads == {"teacher": 4, "kept": 2}, heads
    assert row["student_params"] < row["teacher_params"]
    assert row["final_error"] < 0.03, row  # ‖S − T‖ / ‖T‖: 0.008 measured; 0.24 or more without a useful head
    metrics = json.loads((pathlib.Path("ndc-work") / "jobs" / "attn" / "gates-0.1" / "metrics.json").read_text())
    assert metrics["gates"]["groups"] == row["gates"]["groups"]
    assert metrics["gates"]["ungated"] == {}

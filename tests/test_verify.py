"""Never a wrong cut: the plan verifier, --by auto, and a property test over random models.

The property: for a random model built from a grammar of blocks (residual
MLPs, pre-norm attention on ``nn.MultiheadAttention`` leaves that return
tuples, concatenation, squeeze-and-excitation gating, chunk/shuffle, plain
GELU layers), every strategy either gives a plan whose neighbourhoods start
and end at boundaries and recompose the teacher exactly, or one clear
``NdcError`` line.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ndc.errors import NdcError
from ndc.load import LoadedModel
from ndc.passes.boundaries import boundaries
from ndc.passes.extract import compose, extract
from ndc.passes.partition import GraphFacts, partition
from ndc.passes.trace import trace
from ndc.passes.verify import verify_segments
from ndc.ir import Spec
from ndc.passes.rewrite import preview
from ndc.plan import Teacher, partition_model
from tests import models_for_tests as m

DIM = 16


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(DIM), nn.MultiheadAttention(DIM, 2, batch_first=True)

    def forward(self, x):
        y = self.norm(x)
        return x + self.attn(y, y, y, need_weights=False)[0]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(DIM, DIM // 2), nn.Linear(DIM, DIM // 2)

    def forward(self, x):
        return torch.cat([self.a(x), F.relu(self.b(x))], dim=-1)


class Gate(nn.Module):
    """Squeeze-and-excitation over tokens."""

    def __init__(self):
        super().__init__()
        self.squeeze, self.excite = nn.Linear(DIM, DIM // 4), nn.Linear(DIM // 4, DIM)

    def forward(self, x):
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean(1)))))[:, None, :]


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=-1)
        return torch.cat([b, a], dim=-1)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x):
        return F.gelu(self.fc(x))


BLOCKS = {"residual": Residual, "attention": Attention, "concat": Concat, "gate": Gate, "shuffle": Shuffle, "plain": Plain}


class Grammar(nn.Module):
    def __init__(self, kinds: list[str]):
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.blocks = nn.Sequential(*[BLOCKS[k]() for k in kinds])
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


def _check_plan(model, shape, **kw) -> None:
    plan, traced = partition_model(LoadedModel(model, {"kind": "test"}), shape, **kw)
    cuts = {b.name for b in boundaries(traced.gm.graph)}
    for nb in plan.neighbourhoods:
        assert nb.input in cuts and (nb.output in cuts or nb.output == "output")
    parts = [extract(traced.gm, nb.input, nb.output, nb.nodes) for nb in plan.neighbourhoods]
    x = torch.randn(3, *shape[1:])
    with torch.no_grad():
        got = compose(parts)(x)
        assert torch.equal(got, traced.gm(x))
        # The traced graph is the model (ATen kernels may round the last bit differently from eager ones).
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=5),
       by=st.sampled_from(["auto", "residual", "module", "layers"]), depth=st.integers(1, 3), every=st.integers(1, 3),
       seed=st.integers(0, 3))
def test_every_strategy_gives_a_proven_plan_or_one_clear_line(kinds, by, depth, every, seed):
    torch.manual_seed(seed)
    model = Grammar(kinds).eval()
    try:
        _check_plan(model, (1, 5, 4), by=by, depth=depth, every=every, frontend="fx")
    except NdcError as e:
        assert "\n" not in str(e) and "proposed an invalid plan" not in str(e)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=4), pick=st.integers(0, 1000))
def test_any_boundary_is_a_valid_explicit_cut(kinds, pick):
    model = Grammar(kinds).eval()
    traced = trace(model, (1, 5, 4))
    names = [b.name for b in boundaries(traced.gm.graph)][1:]
    if names:
        _check_plan(model, (1, 5, 4), by="cuts", cuts=(names[pick % len(names)],), frontend="fx")


def test_the_export_frontend_cuts_the_same_grammar():
    model = Grammar(["attention", "residual", "gate", "shuffle"]).eval()
    _check_plan(model, (1, 5, 4), frontend="export")


def test_mha_encoder_cuts_at_the_residual_stream():
    plan, _ = partition_model(LoadedModel(m.mha_encoder().eval(), {"kind": "test"}), (1, 6, 8), by="residual", frontend="fx")
    assert plan.names == ["stem", "layers.0.attn", "layers.0.fc1", "layers.1.attn", "layers.1.fc1", "head"]
    assert len(plan.trainable) == 4
    _check_plan(m.mha_encoder().eval(), (1, 6, 8), by="residual", frontend="fx")


def test_auto_cuts_a_plain_chain_by_layers_and_says_so():
    # two weight layers per neighbourhood, so the channels between them can narrow (one layer has only boundaries)
    plan, _ = partition_model(LoadedModel(m.chain().eval(), {"kind": "test"}), (1, 3, 8, 8))
    assert plan.partition == {"by": "auto", "chose": "layers", "every": 2, "boundaries": plan.partition["boundaries"]}
    assert len(plan.trainable) == 2 and any("cut every 2 weight layers" in n for n in plan.notes)
    teacher = Teacher(plan, _)
    assert all(preview(teacher.part(nb.name), Spec(width=0.5), nb.name, nb.input_shape)["shrunk_dims"] for nb in plan.trainable)
    ones, _ = partition_model(LoadedModel(m.chain().eval(), {"kind": "test"}), (1, 3, 8, 8), every=1)
    assert ones.partition["every"] == 1 and len(ones.trainable) == 4
    resnet, _ = partition_model(LoadedModel(m.tiny_resnet().eval(), {"kind": "test"}), (1, 3, 16, 16))
    assert resnet.partition["chose"] == "residual" and len(resnet.trainable) == 3
    kept, _ = partition_model(LoadedModel(m.chain().eval(), {"kind": "test"}), (1, 3, 8, 8), by="residual")
    assert not kept.trainable and any("found no residual block" in n for n in kept.notes)


def test_the_verifier_names_the_strategy_and_the_node():
    traced = trace(m.mha_encoder(), (1, 6, 8))
    facts = GraphFacts(traced)
    segs = partition(traced, by="residual").segments
    # Move the first block's end back onto a node inside it: not a boundary.
    bad = segs[1].nodes[0]
    segs[1].end = facts.index[bad]
    with pytest.raises(NdcError, match=r"partition --by residual proposed an invalid plan: neighbourhood layers\.0\.attn "
                                       r"ends at layers_0_norm1, which is not a boundary"):
        verify_segments(facts, segs, "residual")


def test_a_model_whose_input_is_no_boundary_is_one_line():
    class TwoUses(nn.Module):  # the input goes into untraced code (a leaf) and around it: no cut is possible at all
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    traced = trace(TwoUses(), (1, 4))
    traced.input_node.meta.pop("tensor_meta")  # as an input read only by an opaque value would look
    traced.input_node.meta.pop("ndc_has_tensor")
    with pytest.raises(NdcError, match="its input is not a single-tensor boundary"):
        partition(traced)

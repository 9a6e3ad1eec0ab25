"""partition: strategies, names, kept regions, and exact recomposition on every model family."""

from __future__ import annotations

import pytest
import torch

from ndc.errors import NdcError
from ndc.load import LoadedModel
from ndc.passes.extract import compose, extract
from ndc.plan import partition_model
from ndc.zoo import FAMILIES
from tests import models_for_tests as m

# family -> (neighbourhoods to distil, kept) under --by residual
RESIDUAL_COUNTS = {
    "resnet20": (9, 2),
    "resnet20b": (9, 2),
    "bottleneck": (4, 2),
    "mobilenetv2": (5, 5),
    "densenet": (6, 4),
    "vit": (4, 2),
    "mlp": (0, 1),
}


def _plan(model, shape, **kw):
    return partition_model(LoadedModel(model, {"kind": "test"}), shape, **kw)


def _parts(plan, traced):
    return [extract(traced.gm, nb.input, nb.output, nb.nodes) for nb in plan.neighbourhoods]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_residual_counts_and_exact_recomposition(family):
    factory, shape = FAMILIES[family]
    model = factory().eval()
    plan, traced = _plan(model, shape, by="residual")
    trainable, kept = RESIDUAL_COUNTS[family]
    assert (len(plan.trainable), len(plan.neighbourhoods) - len(plan.trainable)) == (trainable, kept)
    x = torch.randn(3, *shape[1:])
    with torch.no_grad():
        assert torch.equal(compose(_parts(plan, traced))(x), model(x))
    # neighbourhoods tile the graph: consecutive ones share one boundary, nodes are owned once
    for a, b in zip(plan.neighbourhoods, plan.neighbourhoods[1:]):
        assert a.output == b.input and a.output_shape == b.input_shape
    owned = [n for nb in plan.neighbourhoods for n in nb.nodes]
    assert len(owned) == len(set(owned))
    assert sum(nb.params for nb in plan.neighbourhoods) == plan.teacher["params"]


def test_resnet20_names_shapes_and_sizes():
    plan, _ = _plan(FAMILIES["resnet20"][0](), (1, 3, 32, 32))
    assert plan.names == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["head"]
    block = plan["layer1.0"]
    assert block.params == 4672 and block.input_shape == block.output_shape == [1, 16, 32, 32]
    assert plan["layer2.0"].output_shape == [1, 32, 16, 16]
    assert plan["stem"].kept and plan["head"].kept and not block.kept
    assert block.flops > 0


def test_relu_after_add_joins_the_block_before_it():
    plan, traced = _plan(FAMILIES["resnet20"][0](), (1, 3, 32, 32))
    last = traced.node(plan["layer1.0"].output)
    assert last.target.__name__ == "relu" and last.args[0].target.__name__ == "add"


def test_extracted_neighbourhoods_are_deep_copies():
    model = FAMILIES["resnet20"][0]().eval()
    plan, traced = _plan(model, (1, 3, 32, 32))
    part = extract(traced.gm, plan["layer1.0"].input, plan["layer1.0"].output, plan["layer1.0"].nodes)
    before = {k: v.clone() for k, v in traced.gm.state_dict().items()}
    with torch.no_grad():
        for p in part.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in traced.gm.state_dict().items())
    assert part.get_submodule("layer1.0.conv1").weight.shape == (16, 16, 3, 3)  # the teacher's module names


def test_shape_read_across_cuts_is_recomputed():
    model = m.ShapeAcross().eval()
    plan, traced = _plan(model, (2, 3, 8, 8))
    assert plan.names == ["stem", "block1", "block2", "head"]
    parts = _parts(plan, traced)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(compose(parts)(x), model(x))


def test_inplace_op_never_writes_into_a_neighbourhood_input():
    model = m.InplaceInput().eval()
    plan, traced = _plan(model, (1, 3, 4, 4))
    assert len(plan.trainable) == 1
    nb = plan.trainable[0]
    part = extract(traced.gm, nb.input, nb.output, nb.nodes)
    a = torch.randn(2, 4, 4, 4)
    kept = a.clone()
    with torch.no_grad():
        out = part(a)
        expected = torch.relu(kept) + traced.gm.get_submodule("conv")(torch.relu(kept))
    assert torch.equal(a, kept)
    assert torch.allclose(out, expected)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(compose(_parts(plan, traced))(x), model(x))


def test_module_strategy_cuts_after_submodules():
    model = FAMILIES["resnet20"][0]().eval()
    plan, traced = _plan(model, (1, 3, 32, 32), by="module", depth=2)
    assert plan.names[:3] == ["conv1", "bn1", "layer1.0"]
    assert "layer3.2" in plan.names and plan.names[-1] == "fc"
    assert plan.partition == {"by": "module", "depth": 2, "boundaries": plan.partition["boundaries"]}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(compose(_parts(plan, traced))(x), model(x))


def test_a_module_list_looped_over_is_cut_after_and_layers_are_named_by_their_weights():
    plan, traced = _plan(m.LoopedViT(depth=2).eval(), (1, 3, 32, 32), by="module")
    assert [nb.name for nb in plan.neighbourhoods] == ["patch_embed", "blocks", "norm", "head"] and not plan.notes
    assert plan["blocks"].output_shape == [1, 65, 64]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(compose(_parts(plan, traced))(x), traced.gm(x))
    plan, _ = _plan(m.LoopedViT(depth=2).eval(), (1, 3, 32, 32), by="layers")  # the last MLP holds the final norm and select too
    assert [nb.name for nb in plan.neighbourhoods] == ["patch_embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn",
                                                       "blocks.1.mlp", "head"]


def test_module_strategy_reports_cuts_it_cannot_make():
    plan, _ = _plan(FAMILIES["resnet20"][0](), (1, 3, 32, 32), by="module", depth=3)
    assert any(n.startswith("cannot cut after module layer1.0.conv1: relu stays alive") for n in plan.notes)


def test_layers_strategy_on_an_mlp_gives_one_layer_neighbourhoods():
    factory, shape = FAMILIES["mlp"]
    model = factory().eval()
    plan, traced = _plan(model, shape, by="layers", every=1)
    assert len(plan.neighbourhoods) == 3 and not plan.notes
    assert all(not nb.kept for nb in plan.neighbourhoods)
    plan2, _ = _plan(model, shape, by="layers", every=2)
    assert len(plan2.neighbourhoods) == 2


def test_layers_strategy_reports_residual_blocks_it_cannot_split():
    plan, _ = _plan(FAMILIES["resnet20"][0](), (1, 3, 32, 32), by="layers", every=1)
    assert plan.notes == ["cannot cut 9 times (--explain says why each neighbourhood is not cut further), e.g. between "
                          "layer1.0.conv1 and layer1.0.conv2: relu stays alive across it; those layers share neighbourhoods"]
    from tests.models_for_tests import mha_encoder

    plan, _ = _plan(mha_encoder(), (1, 6, 8), by="layers", every=1)  # a few: each said
    assert plan.notes == [f"cannot cut between layers.{i}.fc1 and layers.{i}.fc2: {add} stays alive across it; they share a "
                          "neighbourhood" for i, add in ((0, "add"), (1, "add_2"))]


def test_cuts_strategy():
    model = FAMILIES["resnet20"][0]().eval()
    plan, traced = _plan(model, (1, 3, 32, 32), by="cuts", cuts=("layer2.0", "layer3"))
    assert len(plan.neighbourhoods) == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(compose(_parts(plan, traced))(x), model(x))


def test_cuts_strategy_refuses_a_cut_inside_a_block():
    with pytest.raises(NdcError, match="cannot cut at layer1.0.conv1: relu stays alive across it"):
        _plan(FAMILIES["resnet20"][0](), (1, 3, 32, 32), by="cuts", cuts=("layer1.0.conv1",))
    with pytest.raises(NdcError, match="no node or module"):
        _plan(FAMILIES["resnet20"][0](), (1, 3, 32, 32), by="cuts", cuts=("nope",))


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(NdcError, match="valid strategies: auto, residual, module, layers, cuts"):
        _plan(FAMILIES["mlp"][0](), FAMILIES["mlp"][1], by="blocks")


def test_plan_json_round_trip():
    from ndc.ir import Plan

    plan, _ = _plan(FAMILIES["vit"][0](), (1, 3, 32, 32))
    again = Plan.from_json(__import__("json").loads(plan.dumps()))
    assert again.dumps() == plan.dumps()
    assert again["blocks.0.mlp"].params == plan["blocks.0.mlp"].params


def test_layers_every_n_cuts_at_the_next_gap_where_a_residual_block_has_none():
    """ResNet-20 --every 2: the wanted cut after the stem and the first conv of layer1.0 falls inside the block; the
    cut moves to the block's end and counting starts again there (it used to give one neighbourhood)."""
    model = FAMILIES["resnet20"][0]().eval()
    plan, traced = _plan(model, (1, 3, 32, 32), by="layers", every=2)
    assert [nb.name for nb in plan.neighbourhoods] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1",
                                                       "layer2.2", "layer3.0", "layer3.1", "layer3.2", "fc"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(compose(_parts(plan, traced))(x), model(x))
    plan3, _ = _plan(model, (1, 3, 32, 32), by="layers", every=3)
    assert len(plan3.neighbourhoods) == 6

"""trace: fx tracing in eval mode with automatic leaves, bound arguments and shapes."""

from __future__ import annotations

import pytest
import torch

from ndc.errors import NdcError
from ndc.passes.trace import tensor_shape, trace
from ndc.zoo import FAMILIES
from tests import models_for_tests as m


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_traced_graph_reproduces_the_model(family):
    factory, shape = FAMILIES[family]
    model = factory().eval()
    traced = trace(model, shape)
    x = torch.randn(3, *shape[1:])  # another batch size than traced
    with torch.no_grad():
        assert torch.equal(traced.gm(x), model(x))
    assert not traced.gm.training


def test_every_tensor_node_has_a_shape():
    traced = trace(m.WithBranchy(), (2, 3, 8, 8))
    out = next(n for n in traced.gm.graph.nodes if n.op == "output").args[0]
    assert tensor_shape(out) == [2, 2, 8, 8]


def test_untraceable_submodule_becomes_a_leaf():
    model = m.WithBranchy().eval()
    traced = trace(model, (1, 3, 8, 8))
    assert traced.leaves == ["b"]
    assert any(n.op == "call_module" and n.target == "b" for n in traced.gm.graph.nodes)
    assert "b (Branchy) could not be traced" in traced.notes[0]
    assert "models_for_tests.py" in traced.notes[0]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(traced.gm(x), model(x))


def test_untraceable_root_names_the_line_and_what_to_do():
    with pytest.raises(NdcError) as e:
        trace(m.RootBranch(), (1, 3, 4, 4))
    msg = str(e.value)
    assert "cannot trace RootBranch.forward" in msg
    assert "models_for_tests.py" in msg and "if x.mean() > 0" in msg
    assert "torch.where" in msg
    assert "\n" not in msg


def test_optional_arguments_are_bound_not_traced():
    traced = trace(m.OptionalArg(), (2, 8))
    placeholders = [n for n in traced.gm.graph.nodes if n.op == "placeholder"]
    assert [p.name for p in placeholders] == ["x"]
    model = m.OptionalArg().eval()
    model.load_state_dict(traced.gm.state_dict())
    x = torch.randn(2, 8)
    assert torch.equal(traced.gm(x), model(x))


def test_requested_leaf():
    traced = trace(FAMILIES["resnet20"][0](), (1, 3, 32, 32), leaves=["layer1.0"])
    assert any(n.op == "call_module" and n.target == "layer1.0" for n in traced.gm.graph.nodes)


def test_unknown_leaf_is_an_error():
    with pytest.raises(NdcError, match="no submodule"):
        trace(m.OptionalArg(), (2, 8), leaves=["nope"])


def test_wrong_input_shape_is_one_line():
    with pytest.raises(NdcError) as e:
        trace(m.OptionalArg(), (2, 9))
    assert "check --input-shape" in str(e.value) and "fc" in str(e.value)


def test_bad_input_shape_values():
    with pytest.raises(NdcError, match="bad input shape"):
        trace(m.OptionalArg(), (0, 8))


def test_an_input_the_model_itself_rejects_is_reported_before_tracing_failures():
    with pytest.raises(NdcError) as e:  # fx cannot trace RootBranch, and the model cannot run on 4 channels either
        trace(m.RootBranch(), (1, 4, 4, 4), frontend="auto")
    msg = str(e.value)
    assert msg.startswith("the model does not run on the example input [1, 4, 4, 4] (float32)")
    assert "in module conv (Conv2d)" in msg and "check --input-shape / --input-dtype" in msg
    assert "torch.where" not in msg and "\n" not in msg

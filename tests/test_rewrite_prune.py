"""Sparse students: magnitude masks, N:M patterns and the Zhu & Gupta schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.load import LoadedModel
from ndc.passes.extract import extract
from ndc.passes.rewrite import Pruner, make_student, sparsity_schedule
from ndc.plan import partition_model
from ndc.zoo import resnet20


@pytest.fixture(scope="module")
def one_layer_parts():
    """ResNet-20 cut ``--by layers --every 1``, the paper's sparsification setting (a residual block has no
    single-tensor cut inside, so blocks stay whole; the stem is one conv)."""
    torch.manual_seed(0)
    plan, traced = partition_model(LoadedModel(resnet20(), {"kind": "test"}), (1, 3, 32, 32), by="layers", every=1)
    return [(nb, extract(traced.gm, nb.input, nb.output, nb.nodes)) for nb in plan.trainable[:4]]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_every_layer_reaches_the_requested_sparsity(one_layer_parts, sparsity):
    for nb, part in one_layer_parts:
        student = make_student(part, Spec(sparsity=sparsity))
        pruner = student.pruner
        assert pruner is not None and pruner.target == sparsity
        assert all(v < 0.05 for v in pruner.sparsity().values())  # starts dense, from the teacher's weights
        pruner.update(sparsity)
        for name, achieved in pruner.sparsity().items():
            numel = student.module.get_parameter(name).numel()
            assert abs(achieved - sparsity) <= 1 / numel + 1e-9, (nb.name, name)


def test_masks_are_by_magnitude_and_stay_zero_after_training(one_layer_parts):
    _, part = one_layer_parts[0]
    student = make_student(part, Spec(sparsity=0.5))
    pruner = student.pruner
    (name,) = pruner.names
    w0 = part.get_parameter(name).detach().abs().flatten()
    pruner.update(0.5)
    mask = pruner.masks[name].flatten()
    assert w0[~mask].max() <= w0[mask].min()  # the smallest weights went
    opt = torch.optim.SGD(student.module.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(2, *part.graph.find_nodes(op="placeholder")[0].meta["tensor_meta"].shape[1:])
    for _ in range(3):
        opt.zero_grad()
        student.module(x).pow(2).mean().backward()
        opt.step()
        pruner.apply()
    w = student.module.get_parameter(name)
    assert torch.all(w.flatten()[~mask] == 0)
    assert pruner.sparsity()[name] >= 0.5
    state = student.module.state_dict()
    assert torch.all(state[name].flatten()[~mask] == 0)  # what gets exported is sparse
    assert not any("mask" in k for k in state)  # masks live in the pruner, not the module


def test_nm_pattern_along_the_input_dimension():
    torch.manual_seed(0)
    lin = nn.Linear(16, 6)
    conv = nn.Conv2d(8, 4, 3)
    model = nn.ModuleDict({"lin": lin, "conv": conv})
    pruner = Pruner(model, 0.0, nm=(2, 4))
    pruner.update(0.0)
    assert set(pruner.sparsity()) == {"lin.weight", "conv.weight"}
    assert all(v == pytest.approx(0.5) for v in pruner.sparsity().values())
    assert (lin.weight.reshape(6, 4, 4) != 0).sum(-1).max() <= 2
    assert (conv.weight.permute(0, 2, 3, 1).reshape(-1, 2, 4) != 0).sum(-1).max() <= 2


def test_nm_with_a_short_last_group_and_more_sparsity():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)  # groups of 4 and 2 along the input
    pruner = Pruner(lin, 0.8, nm=(2, 4))
    pruner.update(0.8)
    assert (lin.weight[:, :4] != 0).sum(1).max() <= 2
    assert pruner.sparsity()["weight"] >= 0.8 - 1 / 18  # 0.8 of 18 weights rounds to 14


def test_width_and_sparsity_combine():
    torch.manual_seed(0)
    plan, traced = partition_model(LoadedModel(resnet20(), {"kind": "test"}), (1, 3, 32, 32))
    nb = plan["layer1.0"]
    part = extract(traced.gm, nb.input, nb.output, nb.nodes)
    student = make_student(part, Spec(width=0.5, sparsity=0.5, nm=(2, 4)))
    student.pruner.update(0.5)
    assert set(student.pruner.names) == {"layer1.0.conv1.weight", "layer1.0.conv2.weight"}
    assert all(v >= 0.5 for v in student.pruner.sparsity().values())
    assert make_student(part, Spec(width=0.5)).pruner is None
    assert make_student(part, Spec(nm=(2, 4))).pruner.target == 0.0


def test_pruner_errors_are_one_line():
    lin = nn.Linear(4, 4)
    for args, message in [((lin, 1.0), "target sparsity must be in [0, 1)"),
                          ((lin, 0.5, (4, 2)), "nm must be (N, M) with 0 < N < M"),
                          ((nn.ReLU(), 0.5), "no conv or linear weights")]:
        with pytest.raises(NdcError) as e:
            Pruner(*args)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NdcError, match=r"sparsity must be in \[0, 1\), got -0.1"):
        Pruner(lin, 0.5).update(-0.1)


# ----------------------------------------------------------------- schedule


def test_schedule_ramps_cubically_then_holds():
    assert sparsity_schedule(0, 100, 0.8) == 0.0
    assert sparsity_schedule(25, 100, 0.8) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert sparsity_schedule(10, 100, 0.8) == pytest.approx(0.8 * (1 - 0.8 ** 3))
    assert sparsity_schedule(50, 100, 0.8) == 0.8
    assert sparsity_schedule(99, 100, 0.8) == 0.8
    assert sparsity_schedule(1000, 100, 0.8) == 0.8
    values = [sparsity_schedule(t, 100, 0.8) for t in range(100)]
    assert values == sorted(values)  # never decreases
    steps = [b - a for a, b in zip(values, values[1:51])]
    assert steps == sorted(steps, reverse=True)  # fast at first, slower near the target


def test_schedule_options():
    assert sparsity_schedule(0, 10, 0.5, initial=0.2) == 0.2
    assert sparsity_schedule(0, 10, 0.5, ramp=0.0) == 0.5
    assert sparsity_schedule(5, 10, 0.5, ramp=1.0, power=1) == pytest.approx(0.25)
    assert sparsity_schedule(-3, 10, 0.5) == 0.0


@pytest.mark.parametrize("kwargs,message", [
    ({"total_steps": 0}, "total_steps must be a positive integer"),
    ({"target": 1.0}, "target must be in [0, 1)"),
    ({"initial": -0.5}, "initial must be in [0, 1)"),
    ({"ramp": 1.5}, "ramp must be in [0, 1]"),
    ({"power": 0}, "power must be an integer >= 1"),
])
def test_schedule_errors(kwargs, message):
    args = {"step": 0, "total_steps": 10, "target": 0.5, **kwargs}
    with pytest.raises(NdcError) as e:
        sparsity_schedule(args.pop("step"), args.pop("total_steps"), args.pop("target"), **args)
    assert message in str(e.value)


def test_exported_graphs_prune_the_weights_their_aten_layers_read():
    """An exported graph holds weights in plain containers: the pruner finds them through aten.linear."""
    from ndc.plan import Teacher
    from tests.models_for_tests import mha_encoder

    plan, traced = partition_model(LoadedModel(mha_encoder().eval(), {"kind": "test"}), (1, 6, 8), frontend="export")
    part = Teacher(plan, traced).part("layers.0.fc1")
    pruner = make_student(part, Spec(sparsity=0.5)).pruner
    assert pruner.names == ["layers.0.fc1.weight", "layers.0.fc2.weight"]
    pruner.update(0.5)
    assert all(v == 0.5 for v in pruner.sparsity().values())

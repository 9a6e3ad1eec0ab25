"""fold: conv -> batch-norm folding on hand-written graphs and on real teachers."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from ndc.passes.fold import find_conv_bn, fold_conv_bn
from ndc.passes.trace import trace
from ndc.zoo import FAMILIES


def trained_like(model: nn.Module, seed: int = 0, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Give every batch norm the affine parameters and running statistics training would.

    Random gamma and beta, then running statistics measured on random inputs
    (when ``input_shape`` is given; otherwise random statistics). A freshly
    initialised network in eval mode is a poor test subject: with unit
    running variances the signal vanishes or saturates (MobileNetV2's output
    at init hardly depends on its input), which would hide a wrong fold.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with torch.no_grad():
        for m in norms:
            n = m.num_features
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        if input_shape is not None:
            momentum = [m.momentum for m in norms]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration batches
            model.train()
            for _ in range(2):
                model(torch.randn((32, *input_shape[1:]), generator=gen))
            for m, value in zip(norms, momentum):
                m.momentum = value
    return model.eval()


def kinds(gm: fx.GraphModule) -> list[str]:
    """The graph as a list of op kinds: module class names for call_module, the op otherwise."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(gm.get_submodule(n.target)).__name__)
        elif n.op in ("call_function", "call_method"):
            out.append(getattr(n.target, "__name__", str(n.target)))
        else:
            out.append(n.op)
    return out


class Chain(nn.Module):
    """conv(no bias) -> bn -> relu -> conv(bias) -> bn -> add with a conv whose output two nodes read."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 1, bias=True)
        self.b2 = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.b3 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        z = self.c3(y)  # read by b3 and by the add: not foldable
        return self.b3(z) + z


def test_folds_exactly_the_direct_pairs():
    gm = fx.symbolic_trace(trained_like(Chain()))
    assert [(c.target, b.target) for c, b in find_conv_bn(gm)] == [("c1", "b1"), ("c2", "b2")]
    folded = fold_conv_bn(gm)
    assert folded.count == 2
    assert folded.pairs == [("c1", "b1"), ("c2", "b2")]
    assert kinds(folded.gm) == ["placeholder", "Conv2d", "relu", "Conv2d", "Conv2d", "BatchNorm2d", "add", "output"]
    assert not hasattr(folded.gm, "b1") and not hasattr(folded.gm, "b2")
    assert folded.gm.c1.bias is not None  # a conv without bias gets one
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(folded.gm(x), gm(x), atol=1e-5, rtol=1e-4)


def test_input_module_is_untouched():
    gm = fx.symbolic_trace(trained_like(Chain()))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    fold_conv_bn(gm)
    assert gm.code == code
    assert gm.c1.bias is None
    after = gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class Shared(nn.Module):
    """The same conv called twice, the same BN called twice: folding either would change the other call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.bn(self.conv(x))
        b = self.conv(a)
        return self.bn(self.conv2(b)) + b


class NotFoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn1d = nn.BatchNorm1d(8)  # follows a Linear, not a conv
        self.conv = nn.Conv1d(1, 2, 3)
        self.live = nn.BatchNorm1d(2, track_running_stats=False)  # batch statistics even in eval mode
        self.deconv = nn.ConvTranspose1d(2, 2, 3)
        self.bn_t = nn.BatchNorm1d(2)

    def forward(self, x):
        y = self.bn1d(self.lin(x)).unsqueeze(1)
        return self.bn_t(self.deconv(self.live(self.conv(y))))


@pytest.mark.parametrize("cls", [Shared, NotFoldable])
def test_unsafe_pairs_are_left_alone(cls):
    gm = fx.symbolic_trace(trained_like(cls()))
    assert find_conv_bn(gm) == []
    folded = fold_conv_bn(gm)
    assert folded.count == 0
    assert kinds(folded.gm) == kinds(gm)


def test_conv1d_and_conv3d_fold():
    for conv, bn, shape in ((nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), (4, 2, 9)),
                            (nn.Conv3d(2, 3, 3, bias=False), nn.BatchNorm3d(3), (2, 2, 5, 5, 5))):
        gm = fx.symbolic_trace(trained_like(nn.Sequential(conv, bn)))
        folded = fold_conv_bn(gm)
        assert folded.count == 1
        x = torch.randn(shape)
        torch.testing.assert_close(folded.gm(x), gm(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["resnet20", "mobilenetv2"])
def test_teacher_parity(family):
    factory, shape = FAMILIES[family]
    model = trained_like(factory(), input_shape=shape)
    gm = trace(model, shape).gm
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    folded = fold_conv_bn(gm)
    assert folded.count == norms  # every batch norm of these families follows a conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.gm.modules())
    x = torch.randn(8, *shape[1:])
    with torch.no_grad():
        expected, got = gm(x), folded.gm(x)
    assert expected.std(0).mean() > 1e-2  # the output depends on the input: the comparison means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)

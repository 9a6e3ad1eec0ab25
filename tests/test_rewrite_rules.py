"""Operator rules of the rewrite pass, each on a small hand-written graph.

Each test traces a tiny model (the whole model is the neighbourhood: its input
and output are the boundary), rewrites it at width 0.5, and checks the shapes
the student has, the parameters it sliced and what the report says. Where
the student computes a function of the teacher, it is compared numerically
with the teacher whose dropped channels are silenced.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.metrics import count_params
from ndc.passes.rewrite import RULES, analyse, make_student, rebuild_student
from ndc.passes.rewrite.dims import Dims, Seg
from ndc.passes.trace import trace


def student_of(model: nn.Module, shape, width: float = 0.5, leaves=()):
    torch.manual_seed(0)
    gm = trace(model, shape, list(leaves)).gm
    x = torch.randn(shape)
    student = make_student(gm, Spec(width=width))
    assert student.module(x).shape == gm(x).shape
    assert torch.equal(make_student(gm, Spec(width=1.0)).module(x), gm(x))
    rebuilt = rebuild_student(gm, Spec(width=width), student.record)
    rebuilt.load_state_dict(student.module.state_dict(), strict=True)
    return gm, student, {r["dim"]: r for r in student.report}


def kept(student, dim: str) -> torch.Tensor:
    return torch.tensor(student.record["dims"][dim]["kept"])


def silence(conv: nn.Module, keep: torch.Tensor, n: int) -> None:
    """Zero the filters (and biases) of the channels a student drops: the teacher's view of the student."""
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[keep] = False
    with torch.no_grad():
        conv.weight[dropped] = 0
        if conv.bias is not None:
            conv.bias[dropped] = 0


# ------------------------------------------------------------------ dims


def test_unify_refines_atoms_where_layouts_are_cut_differently():
    d = Dims()
    a, b, c = d.atom(6), d.atom(10), d.atom(16)
    assert d.unify((Seg(a), Seg(b)), (Seg(c),), "add")
    assert [d.sizes[s.atom] for s in d.resolve((Seg(c),))] == [6, 10]
    assert d.leaves((Seg(c),)) == [a, b]


def test_unify_keeps_the_finer_side_in_blocks_of_the_coarser():
    """Four channels owning two elements each tie eight single ones in pairs (a key/value head shared by two query heads)."""
    d = Dims()
    a, b = d.atom(4), d.atom(8)
    assert d.unify((Seg(a, inner=2),), (Seg(b),), "add")
    assert d.resolve((Seg(b),)) == d.resolve((Seg(a, inner=2),)) and not d.pins


def test_unify_pins_layouts_whose_channels_own_different_blocks():
    d = Dims()
    a, b = d.atom(3), d.atom(2)
    assert not d.unify((Seg(a, inner=2),), (Seg(b, inner=3),), "add")
    assert a in d.pins and b in d.pins


def test_cut_refuses_to_split_a_channel_and_changes_nothing():
    d = Dims()
    a = d.atom(4)
    assert d.cut((Seg(a, inner=4),), 2) is None
    assert d.groups() == [a]
    pieces = d.cut((Seg(a),), 2)
    assert [d.numel(p) for p in pieces] == [2, 2]


def test_a_rule_that_describes_a_wrong_shape_fails_loudly(monkeypatch):
    def wrong(an, node):
        an.set(node, [an.fresh(1) for _ in an.shape(node)])

    monkeypatch.setitem(RULES.functions, torch.relu, wrong)

    class M(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    gm = trace(M(), (2, 3)).gm
    with pytest.raises(NdcError, match=r"the rule for relu \(call_function relu\) described shape \[\[1, 1\]\]"):
        analyse(gm)


# ------------------------------------------------------------ conv family


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_flatten_to_linear_keeps_the_spatial_factor():
    gm, student, rows = student_of(FlattenLinear(), (2, 3, 4, 4))
    m = student.module
    assert m.conv.weight.shape == (4, 3, 3, 3)
    assert m.fc.weight.shape == (10, 4 * 16)
    assert "fc.in_features" in rows["conv.out_channels"]["why"]
    keep = kept(student, "conv.out_channels")
    cols = (keep[:, None] * 16 + torch.arange(16)).flatten()
    torch.testing.assert_close(m.fc.weight, gm.fc.weight[:, cols])
    silence(gm.conv, keep, 8)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(m(x), gm(x))


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = self.pool(F.max_pool2d(F.relu(self.a(x)), 2))
        y = F.relu(self.b(y)).mean((2, 3), keepdim=True)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_pooling_and_reductions_pass_channels_through():
    gm, student, rows = student_of(Pooled(), (2, 3, 8, 8))
    m = student.module
    assert m.a.weight.shape == (4, 3, 3, 3) and m.b.weight.shape == (3, 4, 1, 1) and m.fc.weight.shape == (5, 3)
    assert rows["b.out_channels"]["shrunk"] and "fc.in_features" in rows["b.out_channels"]["why"]


class ViewLinear(FlattenLinear):
    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.fc(y.reshape(-1, 128))


def test_reshape_with_a_literal_size_is_rewritten():
    gm, student, _ = student_of(ViewLinear(), (2, 3, 4, 4))
    assert "64" in student.module.code and "128" not in student.module.code


class CatAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 10, 1)
        self.c, self.d = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.d(F.relu(torch.cat([self.a(x), self.b(x)], 1) + self.c(x)))


def test_concat_offsets_split_the_conv_they_are_added_to():
    gm, student, rows = student_of(CatAdd(), (2, 4, 4, 4))
    m = student.module
    assert m.a.weight.shape[0] == 3 and m.b.weight.shape[0] == 5 and m.c.weight.shape[0] == 8
    assert m.d.weight.shape == (4, 8, 1, 1)
    ka, kb = kept(student, "a.out_channels"), kept(student, "b.out_channels")
    torch.testing.assert_close(m.c.weight, gm.c.weight[torch.cat([ka, kb + 6])])
    for conv, k, n in ((gm.a, ka, 6), (gm.b, kb, 10)):
        silence(conv, k, n)
    keep_c = torch.cat([ka, kb + 6])
    silence(gm.c, keep_c, 16)
    x = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(m(x), gm(x))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.d = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.d(self.g(self.a(x)))


def test_grouped_convolutions_keep_their_channels_and_say_so():
    gm, student, rows = student_of(Grouped(), (2, 4, 4, 4))
    assert count_params(student.module) == count_params(gm)
    assert rows["g.out_channels"]["why"] == "grouped convolution g (groups=4) keeps its channels"


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
        self.d = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.d(F.relu(self.dw(F.relu(self.a(x)))))


def test_depthwise_multiplier_ties_each_input_channel_to_its_outputs():
    gm, student, _ = student_of(Depthwise(), (2, 4, 4, 4))
    dw = student.module.dw
    assert dw.weight.shape == (8, 1, 3, 3) and dw.groups == 4 and dw.out_channels == 8
    keep = kept(student, "a.out_channels")
    outputs = (keep[:, None] * 2 + torch.arange(2)).flatten()
    torch.testing.assert_close(dw.weight, gm.dw.weight[outputs])
    silence(gm.a, keep, 8)
    silence(gm.dw, outputs, 16)  # its bias would light up the dropped outputs
    x = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(student.module(x), gm(x))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.d = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 4, 1)
        self.gamma = nn.Parameter(torch.randn(1, 16, 1, 1))

    def forward(self, x):
        return self.d(F.relu(self.a(x) * self.gamma))


def test_broadcast_parameters_are_sliced_with_the_channels_they_scale():
    gm, student, _ = student_of(Scaled(), (2, 4, 4, 4))
    keep = kept(student, "a.out_channels")
    assert student.module.gamma.shape == (1, 8, 1, 1)
    torch.testing.assert_close(student.module.gamma, gm.gamma[:, keep])


class Glu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.d = nn.Conv2d(4, 16, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        return self.d(p * torch.sigmoid(q))


def test_chunk_pieces_keep_the_same_channels():
    gm, student, _ = student_of(Glu(), (2, 4, 4, 4))
    assert student.module.a.weight.shape[0] == 8 and student.module.d.weight.shape[1] == 4


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.d, self.e = nn.Conv2d(4, 16, 1), nn.Conv2d(6, 4, 1), nn.Conv2d(10, 4, 1)

    def forward(self, x):
        p, q = torch.split(self.a(x), [6, 10], dim=1)
        return self.d(p) + self.e(q)


def test_split_sizes_are_rewritten():
    gm, student, rows = student_of(Split(), (2, 4, 4, 4))
    assert student.module.d.weight.shape[1] == 3 and student.module.e.weight.shape[1] == 5
    assert {"a.out_channels[0:6]", "a.out_channels[6:16]"} <= rows.keys()


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.m, self.d = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.d(self.m(F.relu(self.m(self.a(x)))))


def test_a_module_called_twice_ties_both_calls():
    gm, student, _ = student_of(Shared(), (2, 4, 4, 4))
    assert student.module.m.weight.shape == (8, 8, 1, 1)


class GroupNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn, self.d = nn.Conv2d(4, 16, 1), nn.GroupNorm(4, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.d(self.gn(self.a(x)))


def test_group_norm_shrinks_every_group_alike():
    gm, student, _ = student_of(GroupNormBlock(), (2, 4, 4, 4))
    gn = student.module.gn
    assert gn.num_channels == 8 and gn.num_groups == 4 and gn.weight.shape == (8,)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.d = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.d(torch.cumsum(self.a(x), 1))


def test_an_operator_without_a_rule_pins_what_it_touches_and_is_named():
    gm, student, rows = student_of(Unknown(), (2, 4, 4, 4))
    assert count_params(student.module) == count_params(gm)
    assert rows["a.out_channels"]["why"] == "touched by cumsum (call_function cumsum), which has no rewrite rule"


class ShapeRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.d = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.d(y.view(y.size(0), y.size(1), -1).view(y.shape))


def test_reading_a_channel_size_pins_that_axis():
    _, student, rows = student_of(ShapeRead(), (2, 4, 4, 4))
    assert "its size is read by size_1" in rows["a.out_channels"]["why"]


class SliceChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.d = nn.Conv2d(4, 16, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.d(self.a(x)[:, :8])


def test_slicing_channels_pins_them():
    _, _, rows = student_of(SliceChannels(), (2, 4, 4, 4))
    assert rows["a.out_channels"]["why"].startswith("indexed by getitem")


# ------------------------------------------------------------ transformers


class LnMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.gelu(self.ln(self.fc1(x))))


def test_layer_norm_over_a_hidden_dimension_shrinks_with_it():
    _, student, rows = student_of(LnMlp(), (2, 5, 8))
    m = student.module
    assert m.ln.normalized_shape == (16,) and m.ln.weight.shape == (16,) and m.fc2.weight.shape == (8, 16)
    assert "ln.normalized_shape" in rows["fc1.out_features"]["why"]


class Sdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


def test_fused_attention_keeps_fewer_heads_of_the_teacher_size():
    gm, student, _ = student_of(Sdpa(), (2, 5, 16))
    m = student.module
    assert m.qkv.weight.shape == (24, 16) and m.proj.weight.shape == (16, 8)
    assert "scale=" not in m.code  # the head dimension is the teacher's, and so is the default scale
    (entry,) = student.record["dims"].values()
    assert entry["teacher"] == 2 and len(entry["kept"]) == 1  # heads
    dropped = torch.ones(2, dtype=torch.bool)
    dropped[entry["kept"]] = False
    rows = dropped.repeat_interleave(8).repeat(3)  # q, k and v of the dropped head
    with torch.no_grad():
        gm.qkv.weight[rows] = 0
        gm.qkv.bias[rows] = 0
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(m(x), gm(x), rtol=1e-5, atol=1e-5)


class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 16)

    def forward(self, x):
        y = self.fc(x)
        return self.out(self.attn(y, y, y, need_weights=False)[0])


def test_an_opaque_attention_module_is_kept_and_reported():
    _, student, rows = student_of(Mha(), (2, 5, 16))
    why = rows["fc.out_features"]["why"]
    assert why == "attn (nn.MultiheadAttention) keeps its width: PyTorch derives its head size from the input width"


# ----------------------------------------------------------- a new rule


class ChannelScale(nn.Module):
    """The example of docs/rewrite-rules.md: a per-channel scale, kept opaque to the tracer."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.scale, self.d = nn.Conv2d(4, 16, 1), ChannelScale(16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.d(F.relu(self.scale(self.a(x))))


def channel_scale(an, node):
    """The rule from docs/rewrite-rules.md, verbatim."""
    name = node.target
    axes = an.axes(node.args[0])
    channels = axes[1]
    an.param(f"{name}.weight", 0, channels)
    an.label(channels, f"{name}.channels")
    an.same(node, node.args[0])
    an.on_apply(node, lambda rw, n: setattr(rw.module(n), "channels", rw.size(channels)))


def test_registering_a_rule_for_a_new_module(monkeypatch):
    _, _, rows = student_of(WithScale(), (2, 4, 4, 4), leaves=["scale"])
    assert "touched by scale (call_module ChannelScale), which has no rewrite rule" in rows["a.out_channels"]["why"]
    monkeypatch.setitem(RULES.modules, ChannelScale, channel_scale)
    gm, student, rows = student_of(WithScale(), (2, 4, 4, 4), leaves=["scale"])
    scale = student.module.scale
    assert scale.channels == 8 and scale.weight.shape == (8,)
    assert rows["a.out_channels"]["shrunk"] and "scale.channels" in rows["a.out_channels"]["why"]
    keep = kept(student, "a.out_channels")
    silence(gm.a, keep, 16)
    x = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(student.module(x), gm(x))


def test_a_subclass_that_changes_forward_does_not_borrow_its_base_rule():
    class OddConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x).flip(1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.d = OddConv(4, 16, 1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.d(self.a(x))

    _, student, rows = student_of(M(), (2, 4, 4, 4), leaves=["a"])
    assert "touched by a (call_module OddConv), which has no rewrite rule" in rows["d.in_channels"]["why"]

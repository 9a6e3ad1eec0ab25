"""Rules for ATen operators: the graphs of the torch.export frontend.

An exported graph calls ``torch.ops.aten.*`` overloads where an fx graph
calls modules, functions and methods. Most couple channels exactly as their
Python forms do, so they are registered to the same rules
(:mod:`ndc.passes.rewrite.rules`); the few whose arguments differ, or that
only exist at this level (``slice``, ``select``, ``addmm``, ``unflatten``),
get a rule here. Registered into :data:`~ndc.passes.rewrite.registry.RULES`
like every other rule: supporting another ATen operator is one more entry.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ndc.passes.rewrite import rules as r
from ndc.passes.rewrite.analysis import Analysis
from ndc.passes.rewrite.registry import RULES

aten = torch.ops.aten


def _overloads(*packets) -> list:
    """Every overload of each packet (``aten.add`` -> ``aten.add.Tensor``, ``aten.add.Scalar``, ...)."""
    return [getattr(p, name) for p in packets for name in p.overloads()]


RULES.function(*_overloads(
    aten.relu, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.neg, aten.rsqrt, aten.sqrt, aten.exp, aten.log,
    aten.abs, aten.erf, aten.cos, aten.sin, aten.hardtanh, aten.hardswish, aten.hardsigmoid, aten.leaky_relu, aten.elu,
    aten.relu6, aten.mish, aten.softplus, aten.dropout, aten.clone, aten.contiguous, aten.alias, aten.detach,
    aten.to, aten._to_copy, aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.clamp,
    aten.square, aten.pow,
))(r.unary)
RULES.function(*_overloads(
    aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.where, aten.masked_fill,
))(r.broadcast)
RULES.function(*_overloads(aten.linear))(r.linear_function)
RULES.function(*_overloads(aten.layer_norm))(r.layer_norm_function)
RULES.function(*_overloads(aten.mean, aten.sum, aten.amax, aten.amin))(r.reduce)
RULES.function(*_overloads(aten.view, aten.reshape, aten._unsafe_view))(r.reshape)
RULES.function(*_overloads(aten.flatten, aten.unsqueeze, aten.squeeze))(r.reshape_like)
RULES.function(*_overloads(aten.transpose))(r.transpose)
RULES.function(*_overloads(aten.permute))(r.permute)
RULES.function(*_overloads(aten.t))(r.t)
RULES.function(*_overloads(aten.cat))(r.cat)
RULES.function(*_overloads(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind))(r.split)
RULES.function(*_overloads(aten.matmul, aten.bmm))(r.matmul)
RULES.function(*_overloads(aten.expand))(r.expand_rule)
RULES.function(*_overloads(aten.scaled_dot_product_attention))(r.attention)
RULES.function(*_overloads(aten.sym_size))(r.size)


@RULES.function(*_overloads(aten.slice))
def slice_(an: Analysis, node: fx.Node) -> None:
    """``aten.slice(x, dim, start, end, step)``: a full slice passes the axis through; any other keeps it whole.

    Rotary embeddings slice the head dimension in halves: that axis stays the
    teacher's, which is why attention students keep fewer heads, not smaller ones.
    """
    x = node.args[0]
    axes = list(an.axes(x))
    d = r._axis(r._arg(node, 1, "dim", 0), len(axes))
    start, end, step = r._arg(node, 2, "start", 0), r._arg(node, 3, "end", None), r._arg(node, 4, "step", 1)
    size = an.shape(x)[d]
    full = start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and end >= size))
    if not full:
        why = f"sliced by {an.where(node)}"
        an.pin(axes[d], why)
        axes[d] = an.fresh(an.shape(node)[d], why)
    an.set(node, axes)


@RULES.function(*_overloads(aten.select))
def select(an: Analysis, node: fx.Node) -> None:
    """``aten.select(x, dim, index)``: one entry of an axis (the class token); that axis stays whole and goes away."""
    x = node.args[0]
    axes = list(an.axes(x))
    d = r._axis(r._arg(node, 1, "dim", 0), len(axes))
    an.pin(axes[d], f"indexed by {an.where(node)}")
    an.set(node, axes[:d] + axes[d + 1:])


@RULES.function(*_overloads(aten.unflatten))
def unflatten(an: Analysis, node: fx.Node) -> None:
    """``aten.unflatten(x, dim, sizes)``: a split of one axis, as :func:`~ndc.passes.rewrite.rules.reshape_like`; sizes follow."""
    r.reshape_like(an, node)
    layouts = an.layouts[node]
    d = r._axis(node.args[1], len(an.shape(node.args[0])))
    teacher = list(node.args[2])

    def fix(rw, n: fx.Node) -> None:
        new = [rw.size(layouts[d + k]) for k in range(len(teacher))]
        if new != [int(t) for t in teacher]:
            n.args = (n.args[0], n.args[1], new)

    an.on_apply(node, fix)


@RULES.function(*_overloads(aten.addmm))
def addmm(an: Analysis, node: fx.Node) -> None:
    """``aten.addmm(bias, x, weight)`` with ``weight`` of shape ``(in, out)``: GPT-2's ``Conv1D``.

    ``x``'s features bind ``weight[i, :]``; ``weight[:, o]`` produces the output
    features, with ``bias[o]``.
    """
    bias, x, w = node.args[:3]
    if not (an.is_tensor(w) and w.op == "get_attr" and an.is_tensor(x)) or node.kwargs:
        return an.unknown(node, f"{an.where(node)} multiplies by a computed weight")
    axes, waxes = an.axes(x), an.axes(w)
    an.tie(axes[-1], waxes[0], node)
    an.label(axes[-1], r.features(w.target, "in_features"))
    an.produce(waxes[1], r.features(w.target, "out_features"), an.tensor(w.target), 1)
    if an.is_tensor(bias):
        an.tie(waxes[1], an.axes(bias)[-1], node)
    an.set(node, axes[:-1] + [waxes[1]])

"""Rules for ATen operators: the graphs of the torch.export frontend.

An exported graph calls ``torch.ops.aten.*`` overloads where an fx graph
calls modules, functions and methods. Most couple channels exactly as their
Python forms do, so they are registered to the same rules
(:mod:`ndc.passes.rewrite.rules`); the few whose arguments differ, or that
only exist at this level (``slice``, ``select``, ``addmm``, ``unflatten``),
get a rule here. So do the layers that are modules under fx and functions on
``get_attr`` weights here (``conv2d``/``convolution``, ``batch_norm`` and
``_native_batch_norm_legit_no_training``, ``group_norm``): they name their
channels after the parameter's module (``layer1.0.conv1.out_channels``), as the
fx rules do, so both frontends give the same students and reports. Registered into :data:`~ndc.passes.rewrite.registry.RULES`
like every other rule: supporting another ATen operator is one more entry.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from ndc.passes.rewrite import rules as r
from ndc.passes.rewrite.analysis import Analysis
from ndc.passes.rewrite.dims import expand
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
# In-place forms (``nn.ReLU(inplace=True)`` exports as ``aten.relu_``): the output is the input, changed.
_UNARY = ("relu", "gelu", "silu", "sigmoid", "tanh", "neg", "rsqrt", "sqrt", "exp", "log", "abs", "erf", "cos", "sin",
          "hardtanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "relu6", "mish", "softplus", "dropout", "clamp",
          "square", "pow")
_BINARY = ("add", "sub", "mul", "div", "masked_fill", "where")
RULES.function(*_overloads(*(getattr(aten, f"{n}_") for n in _UNARY if hasattr(aten, f"{n}_"))))(r.unary)
RULES.function(*_overloads(*(getattr(aten, f"{n}_") for n in _BINARY if hasattr(aten, f"{n}_"))))(r.broadcast)
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


def _matrix(an: Analysis, w) -> tuple[str, int] | None:
    """The parameter behind the ``(in, out)`` matrix ``w`` of a matrix product, and its output axis; None if computed.

    ``w`` is the parameter itself (GPT-2's ``Conv1D``: output axis 1), or a
    transposed ``nn.Linear`` weight (decomposed graphs: ``permute(weight, [1, 0])``
    or ``t(weight)``: output axis 0).
    """
    if not an.is_tensor(w) or len(an.shape(w)) != 2:
        return None
    if w.op == "get_attr":
        return w.target, 1
    src = w.args[0] if w.op == "call_function" and w.args else None
    swapped = (w.target in (aten.t.default, aten.numpy_T.default)
               or (w.target == aten.transpose.int and len(w.args) == 3 and (w.args[1] - w.args[2]) % 2 == 1)
               or (w.target == aten.permute.default and [d % 2 for d in w.args[1]] == [1, 0]))
    if swapped and isinstance(src, fx.Node) and src.op == "get_attr":
        return src.target, 0
    return None


@RULES.function(*_overloads(aten.addmm, aten.mm))
def addmm(an: Analysis, node: fx.Node) -> None:
    """``aten.addmm(bias, x, weight)`` / ``aten.mm(x, weight)`` with ``weight`` of shape ``(in, out)``.

    GPT-2's ``Conv1D`` multiplies by its parameter; a decomposed ``nn.Linear``
    by its transposed weight (``permute(weight, [1, 0])``). ``x``'s features
    bind ``weight[i, :]``; ``weight[:, o]`` produces the output features, with
    ``bias[o]``.
    """
    bias, x, w = node.args[:3] if node.target in _overloads(aten.addmm) else (None, *node.args[:2])
    found = _matrix(an, w)
    if found is None or not an.is_tensor(x) or node.kwargs:
        return an.unknown(node, f"{an.where(node)} multiplies by a computed weight")
    target, out_axis = found
    axes, waxes = an.axes(x), an.axes(w)
    an.tie(axes[-1], waxes[0], node)
    an.label(axes[-1], r.features(target, "in_features"))
    an.produce(waxes[1], r.features(target, "out_features"), an.tensor(target), out_axis)
    if an.is_tensor(bias):
        an.tie(waxes[1], an.axes(bias)[-1], node)
    an.set(node, axes[:-1] + [waxes[1]])


# ------------------------------------------------------- convolutions

# Where each convolution overload takes ``groups``, and whether its weight is transposed (``(in, out / groups, ...)``).
_CONVS = {
    **{o: (6, False) for o in _overloads(aten.conv1d, aten.conv2d, aten.conv3d)},
    **{o: (6, True) for o in _overloads(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)},
    **{o: (8, None) for o in _overloads(aten.convolution, aten._convolution)},  # transposed: argument 6
}


def _owner(target: str) -> str:
    """``layer1.0.conv1.weight`` -> ``layer1.0.conv1``: the module a parameter read by ``get_attr`` came from."""
    return target.rpartition(".")[0] or target


@RULES.function(*_CONVS)
def convolution(an: Analysis, node: fx.Node) -> None:
    """``aten.conv2d(x, weight, bias, stride, padding, dilation, groups)`` and the other convolution overloads.

    The coupling of :func:`~ndc.passes.rewrite.rules.conv` (and
    :func:`~ndc.passes.rewrite.rules.conv_transpose`) with the weight read by
    ``get_attr``: input channels are ``weight[:, i]`` (transposed:
    ``weight[i]``), output channels ``weight[o]`` (transposed: ``weight[:, o]``),
    a producer, with ``bias[o]``. Depthwise (``groups == in_channels``) ties
    each output channel to its input channel and rewrites ``groups``; other
    grouped convolutions keep their channels. Spatial axes stay. Reports name
    the channels as the fx frontend does (``layer1.0.conv1.out_channels``).
    """
    groups_at, transposed = _CONVS[node.target]
    x, w, b = node.args[0], r._arg(node, 1, "weight"), r._arg(node, 2, "bias")
    if transposed is None:
        transposed = bool(r._arg(node, 6, "transposed", False))
    if not (an.is_tensor(x) and an.is_tensor(w) and w.op == "get_attr") or (b is not None and not an.is_tensor(b)):
        return an.unknown(node, f"{an.where(node)} convolves with a computed weight")
    g = r._arg(node, groups_at, "groups", 1)
    if not isinstance(g, int) or isinstance(g, bool):
        return an.unknown(node, f"{an.where(node)} has a computed number of groups")
    shape, axes, waxes = an.shape(x), an.axes(x), an.axes(w)
    weight, name = an.tensor(w.target), _owner(w.target)
    ch = len(shape) - (weight.dim() - 1)  # the axis before the spatial axes (0 when unbatched)
    lin = axes[ch]
    an.label(lin, f"{name}.in_channels")
    w_in, w_out = (0, 1) if transposed else (1, 0)
    depthwise = not transposed and g > 1 and g == shape[ch] and weight.shape[1] == 1
    if g == 1:
        an.tie(lin, waxes[w_in], node)
        out = waxes[w_out]
        an.produce(out, f"{name}.out_channels", weight, w_out)
    elif depthwise:  # output channel o belongs to input channel o // k (MobileNet)
        an.tie(expand(lin, weight.shape[0] // g), waxes[0], node)
        out = waxes[0]
        an.produce(out, f"{name}.out_channels", weight, 0)
    else:
        what = "grouped transposed convolution" if transposed else "grouped convolution"
        why = f"{what} {name} (groups={g}) keeps its channels"
        out = waxes[w_out] if not transposed else an.fresh(an.shape(node)[ch], why)
        an.pin(lin, why)
        an.pin(out, why)
        an.label(out, f"{name}.out_channels")
    if b is not None:
        an.tie(out, an.axes(b)[0], node)
    spatial = r._spatial(an, node)
    for k in range(ch + 1, len(axes)):
        an.pin(axes[k], spatial)
    an.set(node, axes[:ch] + [out] + [an.fresh(d, spatial) for d in an.shape(node)[ch + 1:]])
    if depthwise:
        def fix(rw, n: fx.Node) -> None:
            new = rw.size(lin)
            if len(n.args) > groups_at:
                n.args = n.args[:groups_at] + (new,) + n.args[groups_at + 1:]
            else:
                n.kwargs = {**n.kwargs, "groups": new}

        an.on_apply(node, fix)


# -------------------------------------------------------- normalisation

_BATCH_NORMS = _overloads(
    aten.batch_norm, aten.instance_norm, aten.native_batch_norm, aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional,
)


@RULES.function(*_BATCH_NORMS)
def batch_norm(an: Analysis, node: fx.Node) -> None:
    """``aten.batch_norm(x, weight, bias, running_mean, running_var, ...)`` and its lower-level forms.

    As :func:`~ndc.passes.rewrite.rules.batch_norm`: weight, bias and running
    statistics are sliced with the channel axis (axis 1). The forms that return
    several tensors (``_native_batch_norm_legit_no_training``: the output, then
    per-channel statistics, then running statistics) give each the input's
    layouts or the channel axis's; an output of any other shape keeps its size.
    """
    x = node.args[0]
    axes = an.axes(x)
    ch = 1 if len(axes) > 1 else 0
    lin = axes[ch]
    c = an.shape(x)[ch]
    owners = []
    for t in list(node.args[1:]) + list(node.kwargs.values()):
        if an.is_tensor(t):
            if an.shape(t) != (c,):
                return an.unknown(node, f"{an.where(node)} normalises with statistics the rewrite cannot follow")
            an.tie(lin, an.axes(t)[0], node)
            if t.op == "get_attr":
                owners.append(_owner(t.target))
    an.label(lin, f"{owners[0]}.num_features" if owners else f"{node.name}.num_features")
    meta = node.meta.get("tensor_meta")
    if hasattr(meta, "shape"):
        return an.same(node, x)
    why = f"created by {an.where(node)}"
    outs = []
    for m in meta:
        if m is None:
            outs.append(None)
        elif tuple(m.shape) == an.shape(x):
            outs.append(list(axes))
        elif tuple(m.shape) == (c,):
            outs.append([lin])
        else:
            outs.append([an.fresh(d, why) for d in m.shape])
    an.set(node, tuple(outs))


@RULES.function(*_overloads(aten.group_norm))
def group_norm(an: Analysis, node: fx.Node) -> None:
    """``aten.group_norm(x, num_groups, weight, bias, eps)``: as :func:`~ndc.passes.rewrite.rules.group_norm`."""
    x = node.args[0]
    _grouped_channels(an, node, an.axes(x)[1], an.shape(x)[1], r._arg(node, 1, "num_groups"), ((2, "weight"), (3, "bias")))
    an.same(node, x)


def _grouped_channels(an: Analysis, node: fx.Node, lin, c: int, groups, params) -> None:
    """Channels ``lin`` (``c`` of them) split into ``groups``: tied group to group and to the affine parameters at
    ``params`` (``(position, keyword)`` pairs); pinned when the split cannot follow a narrower student."""
    chunks = an.dims.cut(lin, c // groups) if isinstance(groups, int) and groups > 0 and c % groups == 0 else None
    if chunks is None:
        an.pin(lin, f"{an.where(node)} splits channels into groups the rewrite cannot follow")
    else:
        for piece in chunks[1:]:
            an.tie(chunks[0], piece, node)
    owner = None
    for i, key in params:
        t = r._arg(node, i, key)
        if an.is_tensor(t):
            an.tie(lin, an.axes(t)[0], node)
            owner = owner or (_owner(t.target) if t.op == "get_attr" else None)
    an.label(lin, f"{owner or node.name}.num_channels")


# ------------------------------------------------- pooling and padding

_POOLS = _overloads(
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d,
    aten._adaptive_avg_pool3d, aten.max_pool1d_with_indices, aten.max_pool2d_with_indices,
    aten.max_pool3d_with_indices, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.adaptive_max_pool3d,
    aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten.upsample_linear1d,
    aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d,
)
# Spatial axes of each pooling overload (the rest: the trailing ones after batch and channels).
_SPATIAL = {o: int(re.search(r"(\d)d", o.__name__).group(1)) for o in _POOLS}


@RULES.function(*_POOLS)
def pool(an: Analysis, node: fx.Node) -> None:
    """Pooling and resizing act on the trailing spatial axes; every axis before them passes through.

    As :func:`~ndc.passes.rewrite.rules.pool`; the forms that also return
    indices (``max_pool2d_with_indices``) give both outputs the same layouts.
    """
    x = node.args[0]
    meta = node.meta.get("tensor_meta")
    metas = [meta] if hasattr(meta, "shape") else list(meta or ())
    shape = an.shape(x)
    lead = len(shape) - _SPATIAL.get(node.target, len(shape) - 2)
    if not metas or any(m is None or len(m.shape) != len(shape) or tuple(m.shape[:lead]) != shape[:lead]
                        or tuple(m.shape) != tuple(metas[0].shape) for m in metas):
        return an.unknown(node)
    axes = an.axes(x)
    spatial = r._spatial(an, node)
    for layout in axes[lead:]:
        an.pin(layout, spatial)
    out = axes[:lead] + [an.fresh(d, spatial) for d in metas[0].shape[lead:]]
    an.set(node, out if hasattr(meta, "shape") else tuple(list(out) for _ in metas))


RULES.function(*_overloads(aten.pad))(r.pad)


@RULES.function(*_overloads(aten.constant_pad_nd))
def constant_pad_nd(an: Analysis, node: fx.Node) -> None:
    """``aten.constant_pad_nd(x, pad, value)``: constant padding, as :func:`~ndc.passes.rewrite.rules.pad`."""
    r.padded(an, node, list(r._arg(node, 1, "pad")), constant=True)


@RULES.function(*_overloads(aten.native_group_norm))
def native_group_norm(an: Analysis, node: fx.Node) -> None:
    """``aten.native_group_norm(x, weight, bias, N, C, HxW, group, eps)`` (decomposed graphs): as :func:`group_norm`.

    Returns ``(out, mean, rstd)``; the statistics are per sample and group, so
    they keep their size. The channel count ``C`` follows the student.
    """
    x, groups, c = node.args[0], r._arg(node, 6, "group"), r._arg(node, 4, "C")
    axes = an.axes(x)
    lin = axes[1]
    meta = node.meta.get("tensor_meta")
    if hasattr(meta, "shape") or not meta or not isinstance(c, int) or c != an.shape(x)[1]:
        return an.unknown(node)
    _grouped_channels(an, node, lin, c, groups, ((1, "weight"), (2, "bias")))
    why = f"statistics of {an.where(node)}"
    an.set(node, tuple(list(axes) if k == 0 else None if m is None else [an.fresh(d, why) for d in m.shape]
                       for k, m in enumerate(meta)))

    def fix(rw, n: fx.Node) -> None:
        new = rw.size(lin)
        if len(n.args) > 4:
            n.args = n.args[:4] + (new,) + n.args[5:]
        else:
            n.kwargs = {**n.kwargs, "C": new}

    an.on_apply(node, fix)

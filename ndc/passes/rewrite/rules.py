"""The built-in rules: how each operator couples channel dimensions.

Each rule reads its inputs' layouts, ties what the operator forces to be
equal, binds the parameter axes it owns (the apply step slices them), sets its
output's layouts, and registers a fix-up for module attributes or shape
arguments that must follow. What a rule cannot follow it pins, with a reason
the report shows. Registered into :data:`~ndc.passes.rewrite.registry.RULES`.

Channel conventions: a convolution's channel axis is the one before its
spatial axes (axis 1 for a batch); a linear layer's, a LayerNorm's and an
attention head's is the last axis (``(B, N, C)`` tokens).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ndc.errors import NdcError
from ndc.passes.rewrite.analysis import Analysis
from ndc.passes.rewrite.dims import MAX_SEGMENTS, Layout, Seg, expand
from ndc.passes.rewrite.registry import RULES

# --------------------------------------------------------------- helpers


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _axis(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _spatial(an: Analysis, node: fx.Node) -> str:
    return f"spatial axis of {an.where(node)}"


# ------------------------------------------------ element-wise operations

_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.softmax, F.log_softmax, torch.softmax,
    torch.log_softmax, F.normalize, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    torch.square, torch.clamp, torch.clip, torch.erf, operator.neg, operator.pos,
)
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg",
    "square", "clamp", "clamp_", "clip", "erf", "softmax", "log_softmax", "contiguous", "clone", "detach", "float",
    "double", "half", "bfloat16", "to", "type", "type_as", "requires_grad_",
)


@RULES.module(*_UNARY_MODULES)
@RULES.function(*_UNARY_FUNCTIONS)
@RULES.method(*_UNARY_METHODS)
def unary(an: Analysis, node: fx.Node) -> None:
    """Shape-preserving operations on one tensor: the output has the input's layouts.

    Other tensor arguments (``x.type_as(y)``, ``clamp(x, lo_tensor)``) only pass
    dtypes or bounds; bounds that are tensors are tied like operands.
    """
    x = node.args[0]
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if an.is_tensor(a)]
    if others and node.target not in ("to", "type_as", "type"):
        return broadcast(an, node)
    an.same(node, x)


_BINARY_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.mod,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.maximum, torch.minimum,
    torch.where, torch.lerp, torch.addcmul, torch.addcdiv,
)
_BINARY_METHODS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum", "masked_fill",
    "masked_fill_", "where", "lerp", "addcmul", "addcdiv",
)


@RULES.function(*_BINARY_FUNCTIONS)
@RULES.method(*_BINARY_METHODS)
def broadcast(an: Analysis, node: fx.Node) -> None:
    """Element-wise with broadcasting: axes aligned from the right are tied when they have the output's size.

    An operand's axis of size 1 that is broadcast is not tied (it is one value
    for every channel); a parameter such as a per-channel scale of shape
    ``(C, 1, 1)`` is tied to the channel axis and sliced with it.
    """
    if not hasattr(node.meta.get("tensor_meta"), "shape"):
        return an.unknown(node)  # e.g. torch.where(cond), which returns indices
    out = an.shape(node)
    layouts: list[Layout | None] = [None] * len(out)
    for x in [a for a in list(node.args) + list(node.kwargs.values()) if an.is_tensor(a)]:
        shape, axes = an.shape(x), an.axes(x)
        if len(shape) > len(out):
            return an.unknown(node, f"broadcast in {an.where(node)} reduces rank")
        for k, (size, layout) in enumerate(zip(shape, axes)):
            o = len(out) - len(shape) + k
            if size != out[o]:
                continue  # broadcast from size 1
            if layouts[o] is None:
                layouts[o] = layout
            else:
                an.tie(layouts[o], layout, node)
    an.set(node, [lay if lay is not None else an.fresh(out[o], f"created by {an.where(node)}")
                  for o, lay in enumerate(layouts)])


# ------------------------------------------------------- convolutions


def _channels_out(an: Analysis, node: fx.Node, axes: list, ch: int, out) -> None:
    """A convolution's output: leading axes as the input's, channel layout ``out`` (shared by the bias), spatial axes pinned."""
    if an.module(node).bias is not None:
        an.param(f"{node.target}.bias", 0, out)
    for k in range(ch + 1, len(axes)):
        an.pin(axes[k], _spatial(an, node))
    an.set(node, axes[:ch] + [out] + [an.fresh(d, _spatial(an, node)) for d in an.shape(node)[ch + 1:]])


@RULES.module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(an: Analysis, node: fx.Node) -> None:
    """Convolution: input channels bind ``weight[:, i]``, output channels are ``weight[o]`` (a producer).

    Depthwise (``groups == in_channels``, ``out = k * in``) ties each output
    channel to its input channel: the output layout is the input's, each
    channel owning ``k`` outputs. Other grouped convolutions keep their
    channels (shrinking them would change the grouping). Spatial axes stay.
    """
    m, name = an.module(node), node.target
    x = node.args[0]
    shape, axes = an.shape(x), an.axes(x)
    ch = len(shape) - (m.weight.dim() - 1)  # the axis before the spatial axes (0 when unbatched)
    lin = axes[ch]
    g = m.groups
    an.label(lin, f"{name}.in_channels")
    if g == 1:
        an.param(f"{name}.weight", 1, lin)
        out = an.param(f"{name}.weight", 0)
        an.produce(out, f"{name}.out_channels", m.weight, 0)
    elif g == m.in_channels:
        out = an.param(f"{name}.weight", 0, expand(lin, m.out_channels // m.in_channels))
        an.produce(out, f"{name}.out_channels", m.weight, 0)
    else:
        out = an.param(f"{name}.weight", 0)
        why = f"grouped convolution {name} (groups={g}) keeps its channels"
        an.pin(lin, why)
        an.pin(out, why)
        an.label(out, f"{name}.out_channels")
    _channels_out(an, node, axes, ch, out)
    depthwise = g > 1 and g == m.in_channels

    def fix(rw, n: fx.Node) -> None:
        mod = rw.module(n)
        if depthwise:
            mod.groups = rw.size(lin)
        mod.out_channels = mod.weight.shape[0]
        mod.in_channels = mod.weight.shape[1] * mod.groups

    an.on_apply(node, fix)


@RULES.module(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(an: Analysis, node: fx.Node) -> None:
    """Transposed convolution: ``weight`` is ``(in, out / groups, ...)``; grouped ones keep their channels."""
    m, name = an.module(node), node.target
    x = node.args[0]
    shape, axes = an.shape(x), an.axes(x)
    if len(node.args) > 1 or node.kwargs:
        return an.unknown(node, f"{an.where(node)} is called with an output size")
    ch = len(shape) - (m.weight.dim() - 1)
    lin = axes[ch]
    an.label(lin, f"{name}.in_channels")
    if m.groups == 1:
        an.param(f"{name}.weight", 0, lin)
        out = an.param(f"{name}.weight", 1)
        an.produce(out, f"{name}.out_channels", m.weight, 1)
    else:
        out = an.fresh(m.out_channels)
        why = f"grouped transposed convolution {name} keeps its channels"
        an.pin(lin, why)
        an.pin(out, why)
        an.label(out, f"{name}.out_channels")
    _channels_out(an, node, axes, ch, out)

    def fix(rw, n: fx.Node) -> None:
        mod = rw.module(n)
        mod.in_channels = mod.weight.shape[0]
        mod.out_channels = mod.weight.shape[1] * mod.groups

    an.on_apply(node, fix)


# ------------------------------------------------------------ linear


@RULES.module(nn.Linear)
def linear(an: Analysis, node: fx.Node) -> None:
    """Linear on the last axis: ``weight[:, i]`` follows the input features, ``weight[o]`` produces the output.

    After a flatten, the input layout already says that each channel owns
    ``H * W`` consecutive features, so slicing ``weight[:, i]`` by it keeps the
    spatial factor right.
    """
    m, name = an.module(node), node.target
    axes = an.axes(node.args[0])
    an.param(f"{name}.weight", 1, axes[-1])
    an.label(axes[-1], f"{name}.in_features")
    out = an.param(f"{name}.weight", 0)
    an.produce(out, f"{name}.out_features", m.weight, 0)
    if m.bias is not None:
        an.param(f"{name}.bias", 0, out)
    an.set(node, axes[:-1] + [out])

    def fix(rw, n: fx.Node) -> None:
        mod = rw.module(n)
        mod.out_features, mod.in_features = mod.weight.shape

    an.on_apply(node, fix)


def features(weight: str, side: str) -> str:
    """``layer.weight`` -> ``layer.out_features``: how a report names the channels of a weight read from an attribute."""
    return f"{weight[:-len('.weight')]}.{side}" if weight.endswith(".weight") else f"{weight}[{side}]"


@RULES.function(F.linear)
def linear_function(an: Analysis, node: fx.Node) -> None:
    """``F.linear(x, w, b)`` with ``w``/``b`` read from attributes: the same coupling as :func:`linear`."""
    x, w, b = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not an.is_tensor(w) or w.op != "get_attr":
        return an.unknown(node, f"{an.where(node)} multiplies by a computed weight")
    axes, waxes = an.axes(x), an.axes(w)
    an.tie(axes[-1], waxes[1], node)
    an.label(axes[-1], features(w.target, "in_features"))
    an.produce(waxes[0], features(w.target, "out_features"), an.tensor(w.target), 0)
    if an.is_tensor(b):
        an.tie(waxes[0], an.axes(b)[0], node)
    an.set(node, axes[:-1] + [waxes[0]])


# -------------------------------------------------------- normalisation


@RULES.module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def batch_norm(an: Analysis, node: fx.Node) -> None:
    """Batch norm: weight, bias and running statistics are sliced with the channel axis (axis 1)."""
    m, name = an.module(node), node.target
    axes = an.axes(node.args[0])
    ch = 1 if len(axes) > 1 else 0
    for attr in ("weight", "bias", "running_mean", "running_var"):
        if isinstance(getattr(m, attr, None), torch.Tensor):
            an.param(f"{name}.{attr}", 0, axes[ch])
    an.label(axes[ch], f"{name}.num_features")
    an.same(node, node.args[0])
    lin = axes[ch]
    an.on_apply(node, lambda rw, n: setattr(rw.module(n), "num_features", rw.size(lin)))


@RULES.function(F.batch_norm)
def batch_norm_function(an: Analysis, node: fx.Node) -> None:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)`` over axis 1."""
    axes = an.axes(node.args[0])
    for i, key in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        t = _arg(node, i, key)
        if an.is_tensor(t):
            an.tie(axes[1], an.axes(t)[0], node)
    an.same(node, node.args[0])


@RULES.module(nn.LayerNorm)
def layer_norm(an: Analysis, node: fx.Node) -> None:
    """LayerNorm over the last axis: weight and bias are sliced with it (statistics over the kept channels)."""
    m, name = an.module(node), node.target
    axes = an.axes(node.args[0])
    if len(m.normalized_shape) != 1:
        for layout in axes[-len(m.normalized_shape):]:
            an.pin(layout, f"{name} normalises over several axes")
        return an.same(node, node.args[0])
    for attr in ("weight", "bias"):
        if isinstance(getattr(m, attr, None), torch.Tensor):
            an.param(f"{name}.{attr}", 0, axes[-1])
    an.label(axes[-1], f"{name}.normalized_shape")
    an.same(node, node.args[0])
    last = axes[-1]
    an.on_apply(node, lambda rw, n: setattr(rw.module(n), "normalized_shape", (rw.size(last),)))


@RULES.function(F.layer_norm)
def layer_norm_function(an: Analysis, node: fx.Node) -> None:
    """``F.layer_norm(x, (C,), w, b)``: as :func:`layer_norm`; the shape argument is rewritten."""
    axes = an.axes(node.args[0])
    shape = _arg(node, 1, "normalized_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or not isinstance(shape[0], int):
        for layout in axes:
            an.pin(layout, f"{an.where(node)} normalises over an axis the rewrite cannot follow")
        return an.same(node, node.args[0])
    for i, key in ((2, "weight"), (3, "bias")):
        t = _arg(node, i, key)
        if an.is_tensor(t):
            an.tie(axes[-1], an.axes(t)[0], node)
    an.label(axes[-1], f"{node.name}.normalized_shape")
    an.same(node, node.args[0])
    last = axes[-1]

    def fix(rw, n: fx.Node) -> None:
        if len(n.args) > 1:
            n.args = (n.args[0], (rw.size(last),)) + tuple(n.args[2:])
        else:
            n.kwargs = {**n.kwargs, "normalized_shape": (rw.size(last),)}

    an.on_apply(node, fix)


@RULES.module(nn.GroupNorm)
def group_norm(an: Analysis, node: fx.Node) -> None:
    """GroupNorm: channels shrink only as the same channels of every group (the groups stay contiguous)."""
    m, name = an.module(node), node.target
    axes = an.axes(node.args[0])
    lin = axes[1]
    chunks = an.dims.cut(lin, m.num_channels // m.num_groups)
    if chunks is None:
        an.pin(lin, f"{name} splits channels into groups the rewrite cannot follow")
    else:
        for c in chunks[1:]:
            an.tie(chunks[0], c, node)
    if m.affine:
        an.param(f"{name}.weight", 0, lin)
        an.param(f"{name}.bias", 0, lin)
    an.label(lin, f"{name}.num_channels")
    an.same(node, node.args[0])
    an.on_apply(node, lambda rw, n: setattr(rw.module(n), "num_channels", rw.size(lin)))


@RULES.module(nn.PReLU)
def prelu(an: Analysis, node: fx.Node) -> None:
    """PReLU with one slope per channel (axis 1) slices its weight; with one slope it is element-wise."""
    m, name = an.module(node), node.target
    axes = an.axes(node.args[0])
    if m.num_parameters > 1:
        an.param(f"{name}.weight", 0, axes[1])
        lin = axes[1]
        an.on_apply(node, lambda rw, n: setattr(rw.module(n), "num_parameters", rw.size(lin)))
    an.same(node, node.args[0])


# ------------------------------------------------------------- pooling


_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2,
}


@RULES.module(*_POOL_MODULES, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
@RULES.function(*_POOL_FUNCTIONS, F.interpolate)
def pool(an: Analysis, node: fx.Node) -> None:
    """Pooling and resizing act on the trailing spatial axes; every axis before them passes through."""
    if node.op == "call_module":
        spatial = _POOL_MODULES.get(type(an.module(node)))
    else:
        spatial = _POOL_FUNCTIONS.get(node.target)
    x = node.args[0]
    if not hasattr(node.meta.get("tensor_meta"), "shape"):
        return an.unknown(node)  # pooling that also returns indices
    shape, out = an.shape(x), an.shape(node)
    spatial = spatial or len(shape) - 2
    lead = len(shape) - spatial
    if len(out) != len(shape) or out[:lead] != shape[:lead]:
        return an.unknown(node)
    axes = an.axes(x)
    for layout in axes[lead:]:
        an.pin(layout, _spatial(an, node))
    an.set(node, axes[:lead] + [an.fresh(d, _spatial(an, node)) for d in out[lead:]])


_REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.nansum)


@RULES.function(*_REDUCTIONS)
@RULES.method("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "nansum")
def reduce(an: Analysis, node: fx.Node) -> None:
    """Reductions over some axes (``x.mean((2, 3))``): the other axes pass through; reduced ones vanish."""
    x = node.args[0]
    shape, axes = an.shape(x), an.axes(x)
    dim = _arg(node, 1, "dim")
    dims = list(range(len(shape))) if dim is None else dim if isinstance(dim, (list, tuple)) else [dim]
    if not hasattr(node.meta.get("tensor_meta"), "shape") or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return an.unknown(node)
    reduced = {_axis(d, len(shape)) for d in dims}
    keepdim = len(an.shape(node)) == len(shape)  # read off the shapes: positional arguments vary by overload
    out = []
    for k, layout in enumerate(axes):
        if k not in reduced:
            out.append(layout)
        elif keepdim:
            out.append(an.fresh(1, f"reduced by {an.where(node)}"))
    an.set(node, out)


# ------------------------------------------------------ concat and split


@RULES.function(torch.cat, torch.concat, torch.concatenate)
def cat(an: Analysis, node: fx.Node) -> None:
    """Concatenation: the joined axis is the inputs' layouts one after the other (their offsets); others tie."""
    tensors = [t for t in _arg(node, 0, "tensors") if an.is_tensor(t)]
    if not tensors:
        return an.unknown(node)
    out_shape = an.shape(node)
    d = _axis(_arg(node, 1, "dim", 0), len(out_shape))
    tensors = [t for t in tensors if an.shape(t) != (0,)]  # legacy empty tensors take no part
    first = an.axes(tensors[0])
    out: list[Layout] = []
    for k in range(len(out_shape)):
        if k == d:
            out.append(tuple(seg for t in tensors for seg in an.axes(t)[k]))
        else:
            for t in tensors[1:]:
                an.tie(first[k], an.axes(t)[k], node)
            out.append(first[k])
    an.set(node, out)


@RULES.function(torch.stack)
def stack(an: Analysis, node: fx.Node) -> None:
    """Stacking ties the inputs' axes and adds a new axis (which stays)."""
    tensors = [t for t in _arg(node, 0, "tensors")]
    if not tensors or not all(an.is_tensor(t) for t in tensors):
        return an.unknown(node)
    out_shape = an.shape(node)
    d = _axis(_arg(node, 1, "dim", 0), len(out_shape))
    first = an.axes(tensors[0])
    for t in tensors[1:]:
        for a, b in zip(first, an.axes(t)):
            an.tie(a, b, node)
    an.set(node, first[:d] + [an.fresh(len(tensors), f"created by {an.where(node)}")] + first[d:])


@RULES.function(torch.chunk, torch.split, torch.unbind)
@RULES.method("chunk", "split", "unbind")
def split(an: Analysis, node: fx.Node) -> None:
    """``chunk``/``split``/``unbind``: each piece is a slice of the input's layout at its offset.

    ``chunk(n)`` pieces must stay equal in the student, so they are tied to
    each other; ``split`` with sizes gets its sizes rewritten.
    """
    x = node.args[0]
    meta = node.meta.get("tensor_meta")
    if meta is None or hasattr(meta, "shape"):
        return an.unknown(node)
    shape, axes = an.shape(x), an.axes(x)
    name = node.target if node.op == "call_method" else node.target.__name__.split(".")[0]  # aten.split.Tensor -> split
    name = "split" if name == "split_with_sizes" else name
    if name == "unbind":
        d = _axis(_arg(node, 1, "dim", 0), len(shape))
        an.pin(axes[d], f"unbound by {an.where(node)}")
        return an.set(node, tuple(axes[:d] + axes[d + 1:] for _ in meta))
    d = _axis(_arg(node, 2, "dim", 0), len(shape))
    sizes = [m.shape[d] for m in meta]
    equal = len(set(sizes)) == 1
    sections = _arg(node, 1, "split_size_or_sections", _arg(node, 1, "split_size"))
    pieces = an.dims.split(axes[d], sizes)
    if pieces is None or (name == "chunk" and not equal):
        an.pin(axes[d], f"split by {an.where(node)} in a way the rewrite cannot follow")
        pieces = [an.fresh(s, f"split by {an.where(node)}") for s in sizes]
    else:
        if equal:
            for p in pieces[1:]:
                an.tie(pieces[0], p, node)  # equal pieces in the teacher stay equal in the student
        if name == "split":
            _rewrite_sizes(an, node, pieces, one=equal and isinstance(sections, int))
    an.set(node, tuple(axes[:d] + [p] + axes[d + 1:] for p in pieces))


def _rewrite_sizes(an: Analysis, node: fx.Node, pieces: list[Layout], one: bool = False) -> None:
    """The student's piece sizes: one size for ``split(x, n)`` into equal pieces, else the list of them."""
    def fix(rw, n: fx.Node) -> None:
        sizes = [rw.size(p) for p in pieces]
        if one:
            n.args = (n.args[0], sizes[0]) + tuple(n.args[2:]) if len(n.args) > 1 else n.args
            n.kwargs = {**n.kwargs, "split_size": sizes[0]} if len(n.args) <= 1 else n.kwargs
            return
        if n.op == "call_function" and n.target is torch.ops.aten.split.Tensor:
            n.target = torch.ops.aten.split_with_sizes.default  # ATen takes a list of sizes under another name
        if len(n.args) > 1:
            n.args = (n.args[0], sizes) + tuple(n.args[2:])
        else:
            n.kwargs = {**n.kwargs, "split_size_or_sections": sizes}

    an.on_apply(node, fix)


# ------------------------------------------------------- reshaping


@RULES.function(torch.flatten, torch.squeeze, torch.unsqueeze)
@RULES.method("flatten", "squeeze", "unsqueeze")
@RULES.module(nn.Flatten)
def reshape_like(an: Analysis, node: fx.Node) -> None:
    """Merging and splitting axes, read off the teacher's input and output shapes.

    Merged axes (flatten): the channel axis among them keeps its atoms, each
    channel owning the product of the axes after it (``H * W`` features per
    channel before a linear). Split axes: either an un-flatten (the channels
    come back on one axis) or a split into equal blocks (attention heads,
    channel shuffle), whose blocks are tied so every block keeps the same
    channels; the new outer axes stay.
    """
    x = node.args[0]
    ins, outs, axes = an.shape(x), an.shape(node), an.axes(x)
    groups = _axis_groups(ins, outs)
    why = f"reshaped by {an.where(node)}"
    if groups is None:
        an.pin_all(x, why)
        return an.set(node, [an.fresh(d, why) for d in outs])
    out: list[Layout | None] = [None] * len(outs)
    for gi, go in groups:
        if not go:
            continue  # a size-1 axis disappears
        if not gi:
            out[go[0]] = an.fresh(1, why)
        elif len(gi) == 1 and len(go) == 1:
            out[go[0]] = axes[gi[0]]
        elif len(go) == 1:
            out[go[0]] = _merge(an, [axes[i] for i in gi], [ins[i] for i in gi], why)
        elif len(gi) == 1:
            heads = gi[0] == len(ins) - 1  # the feature axis of (B, N, C) tokens split into heads
            for o, layout in zip(go, _split(an, axes[gi[0]], [outs[o] for o in go], why, heads)):
                out[o] = layout
        else:
            for i in gi:
                an.pin(axes[i], why)
            for o in go:
                out[o] = an.fresh(outs[o], why)
    an.set(node, out)


@RULES.function(torch.reshape)
@RULES.method("reshape", "view")
def reshape(an: Analysis, node: fx.Node) -> None:
    """``reshape``/``view``: as :func:`reshape_like`; sizes that change are rewritten as integers.

    A size computed from the batch (``view(x, [6, b * 4, 8])``: heads folded
    into the batch, as ``nn.MultiheadAttention`` does) cannot become an
    integer: that axis stays the teacher's.
    """
    reshape_like(an, node)
    layouts = an.layouts[node]
    sizes = _arg(node, 1, "shape")
    given = list(sizes) if isinstance(sizes, (list, tuple)) else list(node.args[1:]) if node.op == "call_method" else []
    if len(given) == len(layouts):
        for layout, g in zip(layouts, given):
            if isinstance(g, fx.Node) and not _batch_free(g):
                an.pin(layout, f"its size {g.name} in {an.where(node)} depends on the batch size")
    else:  # a shape computed in the graph (``x.size()[:-1] + (heads, head_dim)``): the fix-up cannot rewrite its sizes
        for layout in layouts:
            an.pin(layout, f"{an.where(node)} takes a computed shape, not one size per axis")

    def fix(rw, n: fx.Node) -> None:
        new = [rw.size(layout) for layout in layouts]
        old = an.shape(node)
        if new == list(old):
            return
        if "shape" in n.kwargs:
            given = list(n.kwargs["shape"])
        elif n.op == "call_function" or (len(n.args) == 2 and isinstance(n.args[1], (list, tuple))):
            given = list(n.args[1])
        else:
            given = list(n.args[1:])
        if len(given) != len(new):
            raise _fix_error(n, "its shape argument does not list every axis")
        shape = [g if o == s else s for g, o, s in zip(given, old, new)]
        n.args = (n.args[0], tuple(shape)) if n.op == "call_function" else (n.args[0], *shape)
        n.kwargs = {k: v for k, v in n.kwargs.items() if k != "shape"}

    an.on_apply(node, fix)


def _batch_free(n: fx.Node) -> bool:
    """True when integer node ``n`` had the same value at both traced batch sizes (so a constant may replace it)."""
    v1, v2 = n.meta.get("ndc_value"), n.meta.get("ndc_value_b2")
    return isinstance(v1, int) and v1 == v2


@RULES.method("expand")
def expand_rule(an: Analysis, node: fx.Node) -> None:
    """``x.expand(...)``: axes that keep their size pass through (their size arguments become -1)."""
    x = node.args[0]
    ins, outs, axes = an.shape(x), an.shape(node), an.axes(x)
    lead = len(outs) - len(ins)
    why = f"expanded by {an.where(node)}"
    out = [an.fresh(d, why) for d in outs[:lead]]
    for k, (i, o) in enumerate(zip(ins, outs[lead:])):
        if i == o:
            out.append(axes[k])
        else:
            an.pin(axes[k], why)
            out.append(an.fresh(o, why))
    an.set(node, out)

    def fix(rw, n: fx.Node) -> None:
        listed = len(n.args) == 2 and isinstance(n.args[1], (list, tuple))
        given = list(n.args[1]) if listed else list(n.args[1:])
        new = [rw.size(layout) for layout in out]
        shape = [g if s == o else -1 for g, o, s in zip(given, outs, new)]
        n.args = (n.args[0], shape) if n.op == "call_function" else (n.args[0], *shape)  # aten.expand takes a list

    an.on_apply(node, fix)


@RULES.method("permute")
@RULES.function(torch.permute)
def permute(an: Analysis, node: fx.Node) -> None:
    """Permuted axes carry their layouts along."""
    x = node.args[0]
    dims = _arg(node, 1, "dims")
    if node.op == "call_method" and not isinstance(dims, (list, tuple)):
        dims = node.args[1:]
    axes = an.axes(x)
    an.set(node, [axes[_axis(d, len(axes))] for d in dims])


@RULES.method("transpose", "swapaxes")
@RULES.function(torch.transpose, torch.swapaxes)
def transpose(an: Analysis, node: fx.Node) -> None:
    x = node.args[0]
    axes = list(an.axes(x))
    a, b = (_axis(d, len(axes)) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
    axes[a], axes[b] = axes[b], axes[a]
    an.set(node, axes)


@RULES.method("t")
def t(an: Analysis, node: fx.Node) -> None:
    an.set(node, list(reversed(an.axes(node.args[0]))))


def _axis_groups(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes of equal product (None if they do not line up)."""
    i = j = 0
    groups: list[tuple[list[int], list[int]]] = []
    while i < len(ins) or j < len(outs):
        if i < len(ins) and ins[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(outs) and outs[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(ins) or j >= len(outs) or ins[i] == 0 or outs[j] == 0:
            return None
        gi, go, pi, po = [i], [j], ins[i], outs[j]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                if i >= len(ins):
                    return None
                gi.append(i)
                pi *= ins[i]
                i += 1
            else:
                if j >= len(outs):
                    return None
                go.append(j)
                po *= outs[j]
                j += 1
        groups.append((gi, go))
    return groups


def _merge(an: Analysis, layouts: list[Layout], sizes: list[int], why: str) -> Layout:
    """Several axes flattened into one: the (single) channel axis among them keeps its atoms."""
    dims = an.dims
    free = [k for k, (lay, n) in enumerate(zip(layouts, sizes)) if n > 1 and dims.is_free(lay)]
    if len(free) > 1:
        for k in free:
            dims.pin(layouts[k], f"{why}: two channel axes merged into one")
        return dims.fresh(math.prod(sizes), f"{why}: two channel axes merged into one")
    if not free:
        # Nothing here can shrink: one new atom, keeping the reasons (e.g. "neighbourhood input").
        merged = dims.fresh(math.prod(sizes))
        for layout in layouts:
            for g in dims.leaves(layout):
                for reason in dims.pins.get(g, [why]):
                    dims.pin(merged, reason)
        return merged
    j = free[0]
    before, after = math.prod(sizes[:j]), math.prod(sizes[j + 1:])
    segs = expand(dims.resolve(layouts[j]), after)
    if before * len(segs) > MAX_SEGMENTS:
        dims.pin(layouts[j], f"{why}: too many segments to track")
        return dims.fresh(math.prod(sizes), f"{why}: too many segments to track")
    return segs * before


def _split(an: Analysis, layout: Layout, sizes: list[int], why: str, heads: bool = False) -> list[Layout]:
    """One axis reshaped into several: find the axis that carries the channels.

    ``heads``: the last axis of tokens split as ``(..., heads, head_dim)``
    (attention): the heads axis carries the channels, each head owning its
    ``head_dim`` features, which stay whole (rotary embeddings and the
    attention scale see the teacher's head size); a student keeps fewer heads.
    Otherwise, first an un-flatten (the leading axes are size 1 in effect:
    each channel owns whole blocks of the trailing axes); else, innermost
    first, an axis whose blocks repeat along the outer axes (all blocks tied).
    """
    dims = an.dims
    if heads and len(sizes) >= 2 and sizes[-1] > 1 and dims.is_free(layout):
        found = _split_heads(an, layout, sizes, why)
        if found is not None:
            return found
    segs = dims.resolve(layout)
    order = [j for j in range(len(sizes)) if math.prod(sizes[:j]) == 1]
    order += [j for j in reversed(range(len(sizes))) if j not in order]
    for j in order:
        before, after = math.prod(sizes[:j]), math.prod(sizes[j + 1:])
        if any(s.inner % after for s in segs):
            continue
        reduced = tuple(Seg(s.atom, s.inner // after) for s in segs)
        chunks = dims.cut(reduced, sizes[j]) if before > 1 else [reduced]
        if chunks is None:
            continue
        for c in chunks[1:]:
            dims.unify(chunks[0], c, f"{why}: every block keeps the same channels")
        return [chunks[0] if o == j else dims.fresh(n, why) for o, n in enumerate(sizes)]
    dims.pin(layout, f"{why}: split in a way the rewrite cannot follow")
    return [dims.fresh(n, why) for n in sizes]


def _split_heads(an: Analysis, layout: Layout, sizes: list[int], why: str) -> list[Layout] | None:
    """``(.., C)`` -> ``(.., [3,] heads, head_dim)``: channels in blocks of ``head_dim`` (see :func:`_split`)."""
    dims = an.dims
    head_dim = sizes[-1]
    for s in dims.resolve(layout):
        if s.inner % head_dim and (head_dim % s.inner or (dims.sizes[s.atom] * s.inner) % head_dim):
            return None
    for s in dims.resolve(layout):  # each producing atom kept in whole heads
        if s.inner % head_dim:
            dims.coarsen(s.atom, head_dim // s.inner)
    reduced = tuple(Seg(s.atom, s.inner // head_dim) for s in dims.resolve(layout))
    j = len(sizes) - 2
    chunks = dims.cut(reduced, sizes[j]) if math.prod(sizes[:j]) > 1 else [reduced]
    if chunks is None:
        return None
    for c in chunks[1:]:
        dims.unify(chunks[0], c, f"{why}: q, k and v keep the same heads")
    head = f"{why}: the head dimension stays whole (fewer heads instead)"
    return [chunks[0] if o == j else dims.fresh(n, head if o == len(sizes) - 1 else why) for o, n in enumerate(sizes)]


# ----------------------------------------------------------- indexing


@RULES.function(operator.getitem)
def getitem(an: Analysis, node: fx.Node) -> None:
    """``x[...]`` on a tensor, a tuple of tensors, or a shape.

    Full slices (``:``) pass an axis through; any other index or slice keeps
    that axis at teacher size (``x[:, :8]`` would mean different channels in a
    student). ``x.shape[i]`` keeps axis ``i`` (the value is read as a number).
    """
    src, index = node.args
    if src in an.shape_reads:
        x = an.shape_reads[src]
        axes = an.axes(x)
        picked = range(len(axes))[index] if isinstance(index, (int, slice)) else range(len(axes))
        for k in ([picked] if isinstance(picked, int) else picked):
            an.pin(axes[k], f"its size is read by {an.where(node)}")
        return
    value = an.layouts.get(src)
    if isinstance(value, tuple):
        if not isinstance(index, int) or value[index] is None:
            return an.unknown(node)
        return an.set(node, list(value[index]))
    if not isinstance(value, list):
        return an.unknown(node)
    _index_tensor(an, node, value, index)


def _index_tensor(an: Analysis, node: fx.Node, axes: list[Layout], index: Any) -> None:
    items = list(index) if isinstance(index, tuple) else [index]
    plain = (int, type(None))
    if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) or isinstance(i, bool)
           or (isinstance(i, slice) and not all(isinstance(v, plain) for v in (i.start, i.stop, i.step)))
           for i in items):
        return an.unknown(node, f"indexed by a tensor or a computed bound in {an.where(node)}")
    if sum(i is Ellipsis for i in items) > 1:
        return an.unknown(node)
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items[e: e + 1] = [slice(None)] * (len(axes) - used)
    items += [slice(None)] * (len(axes) - sum(1 for i in items if i is not None))
    why = f"indexed by {an.where(node)}"
    out: list[Layout] = []
    k = 0
    for i in items:
        if i is None:
            out.append(an.fresh(1, why))
            continue
        layout = axes[k]
        k += 1
        if isinstance(i, slice) and i == slice(None):
            out.append(layout)
        else:
            an.pin(layout, why)
            if isinstance(i, slice):
                size = len(range(*i.indices(an.dims.numel(layout))))
                out.append(an.fresh(size, why))
    an.set(node, out)


@RULES.function(getattr)
def get_attribute(an: Analysis, node: fx.Node) -> None:
    """``x.shape`` is remembered (its entries pin axes when read); ``x.T``/``x.mT`` transpose."""
    x, attr = node.args[0], node.args[1]
    if attr == "shape":
        an.shape_reads[node] = x
    elif attr in ("ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"):
        return
    elif attr in ("T", "mT") and an.is_tensor(x):
        axes = list(an.axes(x))
        if attr == "T":
            return an.set(node, list(reversed(axes)))
        axes[-1], axes[-2] = axes[-2], axes[-1]
        an.set(node, axes)
    else:
        an.unknown(node)


@RULES.method("size")
def size(an: Analysis, node: fx.Node) -> None:
    """``x.size()`` is a shape; ``x.size(d)`` pins axis ``d``."""
    x = node.args[0]
    d = _arg(node, 1, "dim")
    if d is None:
        an.shape_reads[node] = x
    else:
        axes = an.axes(x)
        an.pin(axes[_axis(d, len(axes))], f"its size is read by {an.where(node)}")


@RULES.method("dim", "ndimension", "is_contiguous", "get_device")
def metadata(an: Analysis, node: fx.Node) -> None:
    """Reading the rank or device of a tensor couples nothing."""


# ------------------------------------------------------------- padding


@RULES.function(F.pad)
def pad(an: Analysis, node: fx.Node) -> None:
    """Constant padding adds channels of its own around the input's layout (ResNet option A shortcut)."""
    padded(an, node, list(_arg(node, 1, "pad")), _arg(node, 2, "mode", "constant") == "constant")


def padded(an: Analysis, node: fx.Node, widths: list, constant: bool) -> None:
    """``node`` is ``node.args[0]`` padded by ``widths`` (last axis first, as ``F.pad``): constant padding adds
    channels of its own on each side; another mode, or a negative or symbolic width, pins the axis."""
    axes = list(an.axes(node.args[0]))
    why = f"padding added by {an.where(node)}"
    for p in range(len(widths) // 2):
        k = len(axes) - 1 - p
        left, right = widths[2 * p], widths[2 * p + 1]
        if left == 0 and right == 0:
            continue
        if not constant or not (isinstance(left, int) and isinstance(right, int)) or left < 0 or right < 0:
            an.pin(axes[k], why)
            axes[k] = an.fresh(an.shape(node)[k], why)
        else:
            axes[k] = an.fresh(left, why) + axes[k] + an.fresh(right, why)
    an.set(node, axes)


# --------------------------------------------------------------- matmul


@RULES.function(torch.matmul, operator.matmul, torch.bmm)
@RULES.method("matmul", "bmm")
def matmul(an: Analysis, node: fx.Node) -> None:
    """``a @ b``: the contracted axes are tied (q·kᵀ over the head dimension); batch axes broadcast."""
    a, b = node.args[0], node.args[1]
    if not (an.is_tensor(a) and an.is_tensor(b)) or len(an.shape(a)) < 2 or len(an.shape(b)) < 2:
        return an.unknown(node)
    la, lb = an.axes(a), an.axes(b)
    an.tie(la[-1], lb[-2], node)
    out_shape = an.shape(node)
    batch: list[Layout | None] = [None] * (len(out_shape) - 2)
    for shape, axes in ((an.shape(a), la), (an.shape(b), lb)):
        for k in range(len(shape) - 2):
            o = len(batch) - (len(shape) - 2) + k
            if shape[k] != out_shape[o]:
                continue
            if batch[o] is None:
                batch[o] = axes[k]
            else:
                an.tie(batch[o], axes[k], node)
    an.set(node, [lay if lay is not None else an.fresh(out_shape[o], f"created by {an.where(node)}")
                  for o, lay in enumerate(batch)] + [la[-2], lb[-1]])


@RULES.module(nn.MultiheadAttention)
def multihead_attention(an: Analysis, node: fx.Node) -> None:
    """``nn.MultiheadAttention`` (a leaf under fx) keeps its width, and says why.

    PyTorch derives its head size from the width of its input (which is the
    residual stream's, pinned), so fewer heads cannot be expressed with the
    module; exported, it folds heads into the batch axis, which a student
    cannot shrink either. Its MLP neighbours still shrink.
    """
    why = (f"{node.target} (nn.MultiheadAttention) keeps its width: PyTorch derives its head size "
           "from the input width")
    an.unknown(node, why)
    out = an.layouts.get(node)
    if isinstance(out, tuple) and out and out[0]:
        an.label(out[0][-1], f"{node.target}.embed_dim")


@RULES.function(F.scaled_dot_product_attention)
def attention(an: Analysis, node: fx.Node) -> None:
    """``F.scaled_dot_product_attention(q, k, v)``: q and k share the head dimension, the output has v's.

    The default scale is ``1/sqrt(head_dim)``; when the head dimension shrinks
    the student keeps the teacher's scale explicitly.
    """
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    if not all(an.is_tensor(t) for t in (q, k, v)) or (mask is not None and not an.is_tensor(mask)):
        return an.unknown(node)
    lq, lk, lv = an.axes(q), an.axes(k), an.axes(v)
    an.tie(lq[-1], lk[-1], node)
    an.tie(lk[-2], lv[-2], node)
    for x, y in zip(lq[:-2], lk[:-2]):
        an.tie(x, y, node)
    for x, y in zip(lq[:-2], lv[:-2]):
        an.tie(x, y, node)
    if mask is not None:  # the mask broadcasts against the scores (..., heads, queries, keys)
        scores = lq[:-1] + [lk[-2]]
        sizes = an.shape(q)[:-1] + (an.shape(k)[-2],)
        for layout, size, theirs in zip(reversed(an.axes(mask)), reversed(an.shape(mask)), reversed(range(len(scores)))):
            if size == sizes[theirs]:
                an.tie(layout, scores[theirs], node)
    an.set(node, lq[:-1] + [lv[-1]])
    head, teacher = lq[-1], an.shape(q)[-1]

    def fix(rw, n: fx.Node) -> None:
        if rw.size(head) != teacher and n.kwargs.get("scale") is None:
            n.kwargs = {**n.kwargs, "scale": teacher ** -0.5}

    an.on_apply(node, fix)


def _fix_error(node: fx.Node, why: str) -> NdcError:
    return NdcError(f"rewrite: cannot rewrite node {node.name}: {why}")

"""fold: fold each batch norm that directly follows a convolution into that convolution.

Invariant: in eval mode, ``fold_conv_bn(gm).gm(x)`` equals ``gm(x)`` up to
float rounding, for every input ``x``; ``gm`` itself is not modified.

In eval mode a batch norm is an affine map per channel,
``y = (z - mean) * g + beta`` with ``g = gamma / sqrt(var + eps)``, so after a
convolution ``z = W * x + b`` it can be absorbed::

    W' = W * g   (per output channel)      b' = (b - mean) * g + beta

A convolution without a bias gets one. The pattern is found in the fx graph,
not by module names: a ``call_module`` convolution whose only user is a
``call_module`` batch norm (so nothing else reads the unnormalised value).
Pairs are skipped, never half-folded, when folding would be wrong:

* either module is called more than once in the graph (folding would change
  the other call);
* the batch norm does not use running statistics (``track_running_stats=False``
  normalises with batch statistics even in eval mode);
* the convolution is transposed (its output channels are on another weight
  axis) or the channel counts disagree.

Analysis (:func:`find_conv_bn`) is kept apart from mutation (:func:`fold_conv_bn`).

>>> folded = fold_conv_bn(traced.gm)    # doctest: +SKIP
>>> folded.count, folded.gm             # doctest: +SKIP
(19, GraphModule(...))
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Folded:
    """The result of :func:`fold_conv_bn`: the new module and which pairs were folded."""

    gm: fx.GraphModule
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv target, batch-norm target)

    @property
    def count(self) -> int:
        return len(self.pairs)


def find_conv_bn(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """The (convolution node, batch-norm node) pairs of ``gm`` that can be folded, in graph order."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for bn_node in gm.graph.nodes:
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        conv_node = bn_node.args[0]
        if not isinstance(conv_node, fx.Node) or conv_node.op != "call_module" or len(conv_node.users) != 1:
            continue
        bn, conv = gm.get_submodule(bn_node.target), gm.get_submodule(conv_node.target)
        if _foldable(conv, bn) and calls[bn_node.target] == 1 and calls[conv_node.target] == 1:
            pairs.append((conv_node, bn_node))
    return pairs


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    # nn.ConvTranspose* are not subclasses of nn.Conv*: transposed convolutions never match.
    return (
        isinstance(conv, _CONVS)
        and isinstance(bn, _NORMS)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
        and conv.out_channels == bn.num_features
    )


def fold_conv_bn(gm: fx.GraphModule) -> Folded:
    """A deep copy of ``gm`` with every foldable conv -> batch-norm pair folded into the conv.

    The batch-norm nodes are removed from the graph and their modules deleted;
    the result is in eval mode. ``gm`` is left untouched.
    """
    new = copy.deepcopy(gm)
    new.eval()
    folded: list[tuple[str, str]] = []
    for conv_node, bn_node in find_conv_bn(new):
        conv, bn = new.get_submodule(conv_node.target), new.get_submodule(bn_node.target)
        _fold_into(conv, bn)
        bn_node.replace_all_uses_with(conv_node)
        # The conv node now produces what the batch norm produced.
        if "tensor_meta" in bn_node.meta:
            conv_node.meta["tensor_meta"] = bn_node.meta["tensor_meta"]
        new.graph.erase_node(bn_node)
        folded.append((str(conv_node.target), str(bn_node.target)))
    if folded:
        new.graph.lint()
        new.delete_all_unused_submodules()
        new.recompile()
    return Folded(new, folded)


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    """Absorb ``bn``'s eval-mode affine map into ``conv``'s weight and bias, in place."""
    weight = conv.weight
    dtype = weight.dtype
    # Compute in float64: the folded weights must match the unfolded chain to rounding.
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    conv.weight = nn.Parameter((weight.double() * scale.view(shape)).to(dtype), requires_grad=weight.requires_grad)
    conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(dtype), requires_grad=weight.requires_grad)

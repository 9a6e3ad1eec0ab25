"""Size and cost of a module: parameter count and FLOPs per example.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`
(2 per multiply-accumulate, for matmuls, convolutions and attention) while
the module runs once on a zero input, then divided by the batch size.

Attention counts as its two products whichever kernel runs it: a query
``(..., L, E)`` against keys ``(..., S, E)`` and values ``(..., S, Ev)`` is
``2·B·H·L·S·E`` (q·kᵀ) + ``2·B·H·L·S·Ev`` (weights·v), the full ``L×S``
product even when the attention is causal or masked (as the eager
``matmul`` path of the same model counts it). FlopCounterMode knows only
the CUDA kernels of ``scaled_dot_product_attention``, so :data:`ATTENTION_FLOPS`
adds the CPU one (``_scaled_dot_product_flash_attention_for_cpu``), the
out-of-tree backends' one and MPS's, and the fused fast paths that
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take in eval
mode without autograd (``_native_multi_head_attention``,
``_transformer_encoder_layer_fwd``), each counted as the matmuls their slow
paths run (projections, attention, feed-forward), so an fx leaf
``nn.MultiheadAttention`` and its torch.export decomposition count alike.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """``2·B·H·L·S·(E + Ev)``: q·kᵀ and weights·v, the full product (causal or not).

    Shapes are ``(..., L, E)``, ``(..., S, E)``, ``(..., S, Ev)``; the leading
    dimensions are the query's (keys and values with fewer heads, as in
    grouped-query attention, are broadcast to them).
    """
    *lead, length, e = query_shape
    source, ev = key_shape[-2], value_shape[-1]
    return 2 * _numel(lead) * int(length) * int(source) * (int(e) + int(ev))


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # As torch counts the CUDA kernels' backward: recompute q·kᵀ, then grad_weights, grad_v, grad_q and grad_k.
    *lead, length, e = query_shape
    source, ev = key_shape[-2], value_shape[-1]
    return 2 * _numel(lead) * int(length) * int(source) * (3 * int(e) + 2 * int(ev))


def _native_mha_flop(query_shape, key_shape, value_shape, embed_dim, num_head, qkv_weight_shape, qkv_bias_shape,
                     proj_weight_shape, *args, out_shape=None, **kwargs) -> int:
    """``nn.MultiheadAttention``'s fast path: q, k, v and out projections plus the attention products."""
    e = int(embed_dim)
    lead, length, source = _numel(query_shape[:-2]), int(query_shape[-2]), int(key_shape[-2])
    projections = 2 * lead * (length * e * e + 2 * source * e * e)  # in_proj: q over L, k and v over S
    projections += 2 * lead * length * e * int(proj_weight_shape[0])  # out_proj
    return projections + 2 * lead * length * source * 2 * e  # heads · head_dim = E for both products


def _encoder_layer_flop(src_shape, embed_dim, num_heads, qkv_weight_shape, qkv_bias_shape, proj_weight_shape,
                        proj_bias_shape, use_gelu, norm_first, eps, norm_weight_1_shape, norm_bias_1_shape,
                        norm_weight_2_shape, norm_bias_2_shape, ffn_weight_1_shape, *args, out_shape=None, **kwargs) -> int:
    """``nn.TransformerEncoderLayer``'s fast path: self-attention as above plus the two feed-forward linears."""
    e = int(embed_dim)
    tokens = _numel(src_shape[:-1])
    attention = _native_mha_flop(src_shape, src_shape, src_shape, e, num_heads, qkv_weight_shape, qkv_bias_shape,
                                 proj_weight_shape)
    return attention + 2 * tokens * 2 * e * int(ffn_weight_1_shape[0])


def _ops(*names: str) -> list:
    """The op packets among ``names`` that this torch build has."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


#: Formulas FlopCounterMode lacks, given to it as ``custom_mapping`` by :func:`count_flops`.
ATTENTION_FLOPS = {
    **{op: _sdpa_flop for op in _ops("_scaled_dot_product_flash_attention_for_cpu",
                                     "_scaled_dot_product_fused_attention_overrideable",
                                     "_scaled_dot_product_attention_math_for_mps")},
    **{op: _sdpa_backward_flop for op in _ops("_scaled_dot_product_flash_attention_for_cpu_backward",
                                              "_scaled_dot_product_fused_attention_overrideable_backward")},
    **{op: _native_mha_flop for op in _ops("_native_multi_head_attention")},
    **{op: _encoder_layer_flop for op in _ops("_transformer_encoder_layer_fwd")},
}


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, each shared tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def count_nonzero_params(module: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in {id(p): p for p in module.parameters()}.values())


@torch.no_grad()
def count_flops(module: nn.Module, input_shape: tuple[int, ...] | list[int], inputs=None) -> int:
    """FLOPs for one example through ``module`` (eval mode, no autograd).

    ``inputs`` (an :class:`~ndc.passes.inputs.InputSpec`) says when the input
    is not a float tensor (token ids are fed as zeros of their dtype).
    """
    shape = tuple(input_shape)
    was_training = module.training
    module.eval()
    device = next(itertools.chain(module.parameters(), module.buffers()), torch.empty(0)).device  # a student on a GPU
    try:
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            module((inputs.zeros(shape) if inputs is not None else torch.zeros(shape)).to(device))
    finally:
        module.train(was_training)
    return int(counter.get_total_flops() // max(shape[0], 1))


def per_position(logits: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Token logits ``(B, L, V)`` as ``(B*L, V)`` rows, one classification per position (labels ``(B, L)`` alike).

    Classifier logits ``(B, C)`` come back unchanged, so losses and accuracy
    written for classifiers also serve a language model's next-token head.
    """
    if logits.dim() != 3:
        return (logits, *others)
    return (logits.flatten(0, 1), *(t.flatten(0, 1) if t.dim() >= 2 else t for t in others))

"""Size and cost of a module: parameter count and FLOPs per example.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`
(2 per multiply-accumulate, for matmuls, convolutions and attention) while
the module runs once on a zero input, then divided by the batch size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


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
    try:
        with FlopCounterMode(display=False) as counter:
            module(inputs.zeros(shape) if inputs is not None else torch.zeros(shape))
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

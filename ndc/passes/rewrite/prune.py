"""Sparse students: magnitude masks on conv and linear weights, ramped by Zhu & Gupta's schedule.

The training loop owns the schedule; this module owns the masks::

    pruner = student.pruner
    for step in range(total):
        pruner.update(sparsity_schedule(step, total, pruner.target))   # every step, or every few
        loss.backward(); opt.step()
        pruner.apply()                                                  # masked weights back to exactly 0

Invariants: after ``update(s)`` every pruned weight has exactly
``round(s * numel)`` entries masked by magnitude (more where an N:M pattern
asks for it), and after ``apply()`` every masked entry is exactly zero, so
anything exported from the student has the requested sparsity. Masks live
in the pruner, not in the module: the student's state dict is the plain
architecture's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ndc.errors import NdcError

_PRUNED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
# The same layers as functions of an exported (ATen) graph: op name -> (position of the weight, its input axis).
_PRUNED_FUNCTIONS = {"linear": (1, 1), "conv1d": (1, 1), "conv2d": (1, 1), "conv3d": (1, 1), "addmm": (2, 0),
                     "conv_transpose1d": (1, 0), "conv_transpose2d": (1, 0), "conv_transpose3d": (1, 0)}


def sparsity_schedule(step: int, total_steps: int, target: float, *, initial: float = 0.0, ramp: float = 0.5,
                      power: int = 3) -> float:
    """Sparsity at ``step`` of ``total_steps`` (Zhu & Gupta 2017, "To prune, or not to prune").

    ``s(t) = target + (initial - target) * (1 - t / T) ** power`` for
    ``t < T = ramp * total_steps``, then ``target``: pruning is fast at first
    and slows down as it nears the target.

    >>> [round(sparsity_schedule(t, 100, 0.8), 3) for t in (0, 25, 50, 99)]
    [0.0, 0.7, 0.8, 0.8]
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise NdcError(f"sparsity schedule: total_steps must be a positive integer, got {total_steps!r}")
    for name, value in (("target", target), ("initial", initial)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise NdcError(f"sparsity schedule: {name} must be in [0, 1), got {value!r}")
    if not (isinstance(ramp, (int, float)) and 0 <= ramp <= 1):
        raise NdcError(f"sparsity schedule: ramp must be in [0, 1], got {ramp!r}")
    if isinstance(power, bool) or not isinstance(power, int) or power < 1:
        raise NdcError(f"sparsity schedule: power must be an integer >= 1, got {power!r}")
    ramp_steps = ramp * total_steps
    if step >= ramp_steps:
        return float(target)
    progress = max(step, 0) / ramp_steps
    return float(target + (initial - target) * (1.0 - progress) ** power)


class Pruner:
    """Magnitude masks for the conv and linear weights of ``module``.

    ``target`` is the sparsity the schedule ramps to; ``nm=(N, M)`` adds an
    N:M pattern along each weight's input dimension (at most N non-zero in
    every M consecutive input channels, at the same output channel and kernel
    position); with ``target`` 0 only the pattern applies. A new pruner has no
    masks: the student starts from its dense weights.
    """

    def __init__(self, module: nn.Module, target: float, nm: tuple[int, int] | None = None):
        if not (isinstance(target, (int, float)) and 0 <= target < 1):
            raise NdcError(f"pruner: target sparsity must be in [0, 1), got {target!r}")
        if nm is not None:
            if len(nm) != 2 or not all(isinstance(v, int) for v in nm) or not 0 < nm[0] < nm[1]:
                raise NdcError(f"pruner: nm must be (N, M) with 0 < N < M, got {nm!r}")
            nm = (int(nm[0]), int(nm[1]))
        self.module = module
        self.target = float(target)
        self.nm = nm
        self.masks: dict[str, torch.Tensor] = {}
        # name -> (weight owner, input axis of the weight)
        self._weights: dict[str, tuple[nn.Module, int]] = {}
        for name, m in module.named_modules():
            if isinstance(m, _PRUNED) and isinstance(m.weight, torch.Tensor):
                transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
                self._weights[f"{name}.weight" if name else "weight"] = (m, 0 if transposed else 1)
        self._weights.update(_graph_weights(module))
        if not self._weights:
            raise NdcError("pruner: the neighbourhood has no conv or linear weights to sparsify")

    @property
    def names(self) -> list[str]:
        """The pruned parameters, as names in the module's state dict."""
        return list(self._weights)

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        """Recompute every mask at ``sparsity`` (smallest magnitudes first) and zero the masked weights."""
        if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
            raise NdcError(f"pruner: sparsity must be in [0, 1), got {sparsity!r}")
        for name, (m, in_axis) in self._weights.items():
            w = m.weight.detach()
            mag = w.abs().to(torch.float32)
            keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
            k = math.floor(sparsity * w.numel() + 0.5)
            if k:
                keep[torch.argsort(mag.flatten(), stable=True)[:k]] = False
            keep = keep.view_as(w)
            if self.nm is not None:
                keep &= _nm_mask(mag, in_axis, *self.nm)
            self.masks[name] = keep
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Set every masked weight to exactly zero (call after each optimiser step)."""
        for name, mask in self.masks.items():
            m, _ = self._weights[name]
            if mask.device != m.weight.device:  # the module moved (``.to(device)``) after the last update
                mask = self.masks[name] = mask.to(m.weight.device)
            m.weight.mul_(mask)

    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Fraction of exact zeros in each pruned weight, by parameter name."""
        return {name: float((m.weight == 0).sum()) / m.weight.numel() for name, (m, _) in self._weights.items()}


def _graph_weights(module: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """Weights an exported graph's ``aten.linear``/``conv``/``addmm`` nodes read from attributes named ``*.weight``."""
    import torch.fx as fx

    found: dict[str, tuple[nn.Module, int]] = {}
    if not isinstance(module, fx.GraphModule):
        return found
    for n in module.graph.nodes:
        spec = _PRUNED_FUNCTIONS.get(getattr(n.target, "__name__", "").split(".")[0]) if n.op == "call_function" else None
        if spec is None or len(n.args) <= spec[0]:
            continue
        w = n.args[spec[0]]
        if isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight"):
            owner = module.get_submodule(str(w.target).rpartition(".")[0])
            if isinstance(getattr(owner, "weight", None), nn.Parameter):
                found[str(w.target)] = (owner, spec[1])
    return found


def _nm_mask(mag: torch.Tensor, axis: int, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive entries along ``axis`` (a short last group keeps ``n``)."""
    moved = mag.movedim(axis, -1)
    size = moved.shape[-1]
    padded_size = -(-size // m) * m
    padded = torch.full(moved.shape[:-1] + (padded_size,), -1.0, dtype=moved.dtype, device=moved.device)
    padded[..., :size] = moved
    blocks = padded.reshape(*moved.shape[:-1], padded_size // m, m)
    top = blocks.topk(n, dim=-1).indices
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(*moved.shape[:-1], padded_size)[..., :size].movedim(-1, axis)

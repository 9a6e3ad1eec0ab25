"""Students whose parameters are computed from shared tensors at every forward pass.

A slimmable job (:mod:`ndc.distill.slimmable`) trains one set of teacher-width
parameters and runs each width as a narrowed copy of the neighbourhood whose
parameters are *slices* of them; a gated job (:mod:`ndc.distill.gates`) runs
the neighbourhood with its weights *scaled* by channel gates. Kept here:

* a module that *borrows* its parameters: :func:`borrow` removes them (so its
  ``state_dict`` holds only what is its own, such as per-width batch norms)
  and :func:`lend` sets computed tensors in their place before a forward
  pass, keeping the autograd graph back to the shared tensors (both jobs);
* which elements of every parameter a set of kept channels selects, read off
  the rewrite pass's channel analysis (:func:`slices`, the same
  :meth:`~ndc.passes.rewrite.width.Rewrite.keep` that builds a width student,
  so a slice here is exactly what :func:`~ndc.passes.rewrite.rebuild_student`
  rebuilds from the rewrite record; slimmable jobs).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ndc.passes.rewrite.analysis import Analysis
from ndc.passes.rewrite.width import Rewrite

Cuts = dict[str, list[tuple[int, torch.Tensor]]]


def slices(an: Analysis, kept: dict[int, torch.Tensor]) -> Cuts:
    """Per parameter or buffer name, the ``(axis, indices)`` that the channels in ``kept`` select (only names that shrink)."""
    rw = Rewrite(None, an, kept)  # keep() reads only the analysis and the kept channels
    cuts: Cuts = {}
    for name, axes in an.params.items():
        chosen = [(axis, idx) for axis, layout in sorted(axes.items()) if (idx := rw.keep(layout)) is not None]
        if chosen:
            cuts[name] = chosen
    return cuts


def cut(tensor: torch.Tensor, axes: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``tensor`` narrowed along each ``(axis, indices)`` (differentiable: gradients reach ``tensor``)."""
    for axis, idx in axes:
        tensor = tensor.index_select(axis, idx.to(tensor.device))
    return tensor


def parameter_names(module: nn.Module) -> list[str]:
    """Every registered parameter name, aliases of a shared parameter included."""
    return [name for name, _ in module.named_parameters(remove_duplicate=False)]


def borrow(module: nn.Module, names: list[str]) -> None:
    """Unregister parameters ``names`` of ``module``: from now on :func:`lend` supplies them before each forward."""
    for name in names:
        prefix, _, attr = name.rpartition(".")
        owner = module.get_submodule(prefix)
        value = owner._parameters.pop(attr)
        owner.__dict__[attr] = None if value is None else value.detach()


def lend(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set borrowed parameters to ``tensors`` (computed from shared ones) for the next forward pass."""
    for name, value in tensors.items():
        prefix, _, attr = name.rpartition(".")
        # A plain attribute, never registered: setattr would make a shared nn.Parameter this module's own.
        module.get_submodule(prefix).__dict__[attr] = value

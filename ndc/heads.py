"""What a teacher's output is, as losses and scores see it: its per-example shape, and whether a sigmoid made it.

A sigmoid at the end of the model means its outputs are probabilities of
independent yes/no outputs (a multi-label head): losses compare
probabilities (``bce``) and scores threshold at 0.5. It is read off the
model itself, so nothing needs declaring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ndc.errors import fmt_shape


@dataclass(frozen=True)
class Head:
    """The teacher's output as scoring and losses see it: its per-example shape, and whether a sigmoid made it."""

    shape: tuple[int, ...]
    sigmoid: bool = False

    @property
    def scores(self) -> int | None:
        """Number of scores per example when the output is a vector (B, K), or per position when it is a sequence of
        them (B, L, K: a language model's next-token scores, scored position by position); None otherwise."""
        return self.shape[-1] if len(self.shape) in (1, 2) else None

    def describe(self) -> str:
        return f"Bx{fmt_shape(self.shape)}" + (" (sigmoid)" if self.sigmoid else "")


def head_of(model: Any, output_shape: Sequence[int]) -> Head:
    """The :class:`Head` of ``model`` given its batched ``output_shape``: a sigmoid is detected in its graph.

    Works on fx and ``torch.export`` graphs (the node feeding the output is
    a sigmoid) and on ONNX files (the output is made by a ``Sigmoid`` node);
    anything else is taken to output raw scores.
    """
    return Head(tuple(int(d) for d in output_shape[1:]), _ends_in_sigmoid(model))


def _ends_in_sigmoid(model: Any) -> bool:
    if getattr(model, "module", None) is not None and not isinstance(model, nn.Module):
        model = model.module  # a loaded .pt2/.pt file: look at its module's graph
    graph = getattr(model, "graph", None)
    if isinstance(model, torch.export.ExportedProgram):
        graph = model.graph
    if graph is not None and hasattr(graph, "nodes"):
        output = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
        leaves = [a for a in tree_leaves(output.args) if hasattr(a, "op")] if output is not None else []
        return bool(leaves) and _is_sigmoid(model, leaves[0])
    sigmoid = getattr(model, "sigmoid_output", None)
    return bool(sigmoid)


def _is_sigmoid(model: Any, node: Any) -> bool:
    if node.op == "call_module":
        with contextlib.suppress(AttributeError):
            return isinstance(model.get_submodule(node.target), nn.Sigmoid)
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return "sigmoid" in str(name).lower()


def teacher_head(teacher: Any) -> Head:
    """The head of a workspace teacher: its output shape from the plan, a sigmoid from its graph."""
    return head_of(teacher.gm, teacher.plan.neighbourhoods[-1].output_shape)

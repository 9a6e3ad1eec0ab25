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

    @property
    def positions(self) -> tuple[int, ...]:
        """Where the output has a vector of scores: ``()`` once per example (B, K), ``(L,)`` per position (B, L, V)."""
        return self.shape[:-1]

    def describe(self) -> str:
        return f"Bx{fmt_shape(self.shape)}" + (" (sigmoid)" if self.sigmoid else "")


def label_kind(head: Head, data: Any) -> str:
    """``data.labels`` as ``head`` sees them: ``none`` for the next-token labels ndc makes up for unlabelled token
    ids (``data.next_tokens``) when the output is not a score per position; they are a language model's alone."""
    kind = getattr(data, "labels", "none")
    if kind == "classes" and getattr(data, "next_tokens", False) and not labels_fit(head, data):
        return "none"
    return kind


def labels_fit(head: Head, data: Any) -> bool:
    """Whether ``data``'s class labels are where ``head`` has scores: one per example for (B, K) scores, one per
    position for a language model's (B, L, V). (Whether each is below K is ``data.check_classes``'s job.)"""
    return head.scores is not None and tuple(getattr(data, "label_shape", ())) == head.positions


def label_misfit(head: Head, data: Any) -> str:
    """Why ``data``'s class labels do not fit ``head``, naming both shapes (for labels where :func:`labels_fit` fails)."""
    shape = tuple(getattr(data, "label_shape", ()))
    each = "one class per example" if not shape else "one class per position"
    where = "per position" if head.positions else "per example"
    return (f"the labels of {getattr(data, 'name', 'the data')} have shape {'x'.join(['B', *map(str, shape)])} ({each}), "
            f"which does not fit the teacher's output {head.describe()} (class scores {where})")


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

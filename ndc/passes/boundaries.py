"""Boundary analysis: which nodes are the only activation alive across a cut.

An *activation* is a tensor computed from the model's input through tensor
data (not through shapes). Parameters, constants, integers read off a tensor's
shape (``x.size(0)``), and tensors built only from those are not activations:
they can be recomputed on either side of a cut, so they never block one.

A node ``b`` is a *boundary* when, right after ``b`` is computed, ``b`` is the
only activation still needed: everything before it feeds the rest of the
graph only through ``b``. One linear scan over the nodes in graph order finds
them all (a running count of live activations). On a graph without dead code
this is exactly the set of dominators of the output node, which the tests
check with networkx.

>>> boundaries(traced.gm.graph)   # doctest: +SKIP
[x, relu, layer1_0_relu_1, ...]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx


def is_tensor_valued(node: fx.Node) -> bool:
    """True when shape propagation saw a tensor come out of ``node``, alone or inside a tuple or dict.

    A leaf module returning ``(out, None)`` (``nn.MultiheadAttention`` with
    ``need_weights=False``) holds a tensor: what reads it reads an activation.
    """
    return node.meta.get("tensor_meta") is not None or bool(node.meta.get("ndc_has_tensor"))


def activations(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the input through tensor data."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    act: set[fx.Node] = set(inputs)
    for n in graph.nodes:
        if n.op in ("call_function", "call_method", "call_module") and is_tensor_valued(n):
            if any(a in act for a in n.all_input_nodes):
                act.add(n)
    return act


@dataclass
class Liveness:
    """Per-node liveness facts from one scan; shared by boundary search and ``--explain``."""

    order: list[fx.Node]
    index: dict[fx.Node, int]
    act: set[fx.Node]
    last_use: dict[fx.Node, int]  # activation -> position of its last activation (or output) user


def liveness(graph: fx.Graph) -> Liveness:
    order = list(graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    act = activations(graph)
    last_use: dict[fx.Node, int] = {}
    for n in order:
        if n in act:
            users = [index[u] for u in n.users if u in act or u.op == "output"]
            last_use[n] = max(users, default=index[n])
    return Liveness(order, index, act, last_use)


def boundaries(graph: fx.Graph, live: Liveness | None = None) -> list[fx.Node]:
    """All boundary nodes in graph order, the input placeholder first.

    Linear in the number of nodes and edges: ``dying[i]`` counts activations
    whose last use is at position ``i``; ``alive`` is kept as a running count.
    """
    live = live or liveness(graph)
    dying = [0] * (len(live.order) + 1)
    for n, last in live.last_use.items():
        dying[last] += 1
    found, alive = [], 0
    for i, n in enumerate(live.order):
        if n in live.act and live.last_use[n] > i:
            alive += 1
        alive -= dying[i]
        if alive == 1 and n in live.act and live.last_use[n] > i and is_single_tensor(n):
            found.append(n)
    return found


def is_single_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


def alive_across(live: Liveness, position: int) -> list[fx.Node]:
    """Activations computed at or before ``position`` and still needed after it."""
    return [n for n in live.order[: position + 1] if n in live.act and live.last_use[n] > position]

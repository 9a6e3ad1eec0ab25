"""Boundary analysis: the linear scan agrees with the dominators of the output node."""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from ndc.passes.boundaries import activations, boundaries
from ndc.passes.trace import Traced, propagate_shapes


def _annotated(graph: fx.Graph, shape=(2, 4)) -> fx.GraphModule:
    gm = fx.GraphModule(torch.nn.Module(), graph)
    propagate_shapes(Traced(gm, shape))
    return gm


def _dominators_of_output(graph: fx.Graph) -> set[str]:
    """Nodes every input-to-output path of activations passes through (networkx)."""
    act = activations(graph)
    g = nx.DiGraph()
    for n in graph.nodes:
        if n in act or n.op == "output":
            g.add_node(n.name)
            for a in n.all_input_nodes:
                if a in act:
                    g.add_edge(a.name, n.name)
    source = next(n.name for n in graph.nodes if n.op == "placeholder")
    idom = nx.immediate_dominators(g, source)
    node, chain = "output", set()
    while node != source:
        node = idom[node]
        chain.add(node)
    return chain


def _names(graph: fx.Graph) -> list[str]:
    return [b.name for b in boundaries(graph)]


def test_chain_every_node_is_a_boundary():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,), name="a")
    b = g.call_function(torch.tanh, (a,), name="b")
    g.output(b)
    gm = _annotated(g)
    assert _names(gm.graph) == ["x", "a", "b"]


def test_residual_block_has_no_boundary_inside():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,), name="a")
    b = g.call_function(torch.tanh, (a,), name="b")
    s = g.call_function(operator.add, (x, b), name="s")
    r = g.call_function(torch.relu, (s,), name="r")
    g.output(r)
    gm = _annotated(g)
    assert _names(gm.graph) == ["x", "s", "r"]
    assert set(_names(gm.graph)) == _dominators_of_output(gm.graph)


def test_two_branches_merge():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,), name="a")
    b = g.call_function(torch.tanh, (x,), name="b")
    c = g.call_function(torch.sigmoid, (a,), name="c")
    m = g.call_function(torch.mul, (c, b), name="m")
    g.output(m)
    gm = _annotated(g)
    assert _names(gm.graph) == ["x", "m"]


def test_shape_reads_and_constants_do_not_block_a_cut():
    g = fx.Graph()
    x = g.placeholder("x")
    size = g.create_node("call_method", "size", (x, 0), name="size")  # read at the top ...
    a = g.call_function(torch.relu, (x,), name="a")
    b = g.call_function(torch.tanh, (a,), name="b")
    w = g.call_function(torch.ones, (4,), name="w")  # a constant built late
    c = g.call_function(operator.mul, (b, w), name="c")
    v = g.create_node("call_method", "reshape", (c, size, -1), name="v")  # ... used at the bottom
    g.output(v)
    gm = _annotated(g)
    assert _names(gm.graph) == ["x", "a", "b", "c", "v"]
    assert set(_names(gm.graph)) == _dominators_of_output(gm.graph)


def _random_residual_graph(steps: list[tuple[str, int]]) -> fx.Graph:
    """A chain where each step is unary, adds a skip from an earlier node, or reshapes with an earlier size."""
    g = fx.Graph()
    nodes = [g.placeholder("x")]
    for i, (kind, back) in enumerate(steps):
        prev, other = nodes[-1], nodes[max(0, len(nodes) - 1 - back)]
        if kind == "unary":
            n = g.call_function(torch.relu, (prev,), name=f"u{i}")
        elif kind == "skip":
            n = g.call_function(operator.add, (prev, other), name=f"s{i}")
        else:
            size = g.create_node("call_method", "size", (other, 0), name=f"z{i}")
            n = g.create_node("call_method", "reshape", (prev, size, -1), name=f"r{i}")
        nodes.append(n)
    g.output(nodes[-1])
    return g


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["unary", "unary", "skip", "shape"]), st.integers(1, 6)), min_size=1, max_size=30))
def test_linear_scan_equals_dominators_on_random_residual_graphs(steps):
    gm = _annotated(_random_residual_graph(steps))
    assert set(_names(gm.graph)) == _dominators_of_output(gm.graph)


def test_real_model_boundaries_equal_dominators():
    from ndc.passes.trace import trace
    from ndc.zoo import FAMILIES

    for family in ("resnet20", "densenet", "vit", "mobilenetv2"):
        factory, shape = FAMILIES[family]
        traced = trace(factory(), shape)
        assert set(_names(traced.gm.graph)) == _dominators_of_output(traced.gm.graph), family

"""extract: one neighbourhood of a traced teacher as its own ``GraphModule``.

Invariant: for consecutive neighbourhoods ``T_1 .. T_n`` of a plan,
``T_n(...T_1(x))`` equals the teacher's output exactly, and every extracted
module is a deep copy: training it never touches the teacher.

The neighbourhood's owned nodes are copied in graph order with the teacher's
node and module names. Values it reads from outside that are not its input
(parameters, constants, tensors built from shapes) are recomputed inside it.
An integer read off the shape of an activation outside the neighbourhood is
recomputed from the neighbourhood's own input: a constant when it does not
depend on the batch size, ``input.size(0) * r`` when it is ``r`` times the
batch size (known from the two shape propagations of :mod:`ndc.passes.trace`).
"""

from __future__ import annotations

import copy
import operator
import weakref
from fractions import Fraction

import torch.fx as fx
import torch.nn as nn

from ndc.errors import NdcError
from ndc.passes.boundaries import activations


def extract(gm: fx.GraphModule, input_name: str, output_name: str, node_names: list[str],
            deep_copy: bool = True, class_name: str = "Neighbourhood") -> fx.GraphModule:
    """A module computing node ``output_name`` from node ``input_name``.

    ``node_names`` are the nodes the neighbourhood owns. With ``deep_copy``
    (the default) the result shares nothing with ``gm``.
    """
    nodes, act = _index(gm.graph)
    owned = {nodes[name] for name in node_names}
    inp = nodes[input_name]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholder = graph.placeholder(input_name)
    placeholder.meta = copy.copy(inp.meta)
    env[inp] = placeholder
    batch = _batch_size(inp)

    def copy_node(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n not in owned:
            if n in act:
                raise NdcError(f"neighbourhood {input_name} -> {output_name} reads activation {n.name} from outside; "
                               "its input is not a boundary")
            # An integer read off an outside activation's shape is recomputed from the input; a tensor
            # built from such integers (a causal mask sized by the batch) is copied with them.
            value_node = None if n.meta.get("tensor_meta") is not None else _recompute_shape_value(graph, n, placeholder, batch, act)
            if value_node is not None:
                env[n] = value_node
                return value_node
        for dep in n.all_input_nodes:
            copy_node(dep)
        env[n] = graph.node_copy(n, lambda x: env[x])
        return env[n]

    for n in gm.graph.nodes:
        if n in owned and n.op not in ("placeholder", "output"):
            copy_node(n)
    out = nodes[output_name]
    if out.op == "output":
        graph.output(fx.map_arg(out.args[0], lambda x: copy_node(x)))
    else:
        graph.output(copy_node(out))
    graph.lint()
    result = fx.GraphModule(gm, graph, class_name=class_name)
    result.train(gm.training)
    result = copy.deepcopy(result) if deep_copy else result
    return protect_input(result)


_INDEX: "weakref.WeakKeyDictionary[fx.Graph, tuple[int, dict, set]]" = weakref.WeakKeyDictionary()


def _index(graph: fx.Graph) -> tuple[dict[str, fx.Node], set[fx.Node]]:
    """Nodes by name and the activation set, computed once per graph (extracting n parts stays linear)."""
    cached = _INDEX.get(graph)
    if cached is None or cached[0] != len(graph.nodes):
        cached = (len(graph.nodes), {n.name: n for n in graph.nodes}, activations(graph))
        _INDEX[graph] = cached
    return cached[1], cached[2]


def _batch_size(node: fx.Node) -> tuple[int, int] | None:
    """The input's leading dimension at the two traced batch sizes, when it is the batch dimension."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape") or not len(meta.shape):
        return None
    b1 = meta.shape[0]
    b2 = node.meta.get("ndc_batch_b2")
    return (b1, b2) if b2 is not None and b2 != b1 else None


def _recompute_shape_value(graph: fx.Graph, n: fx.Node, inp: fx.Node, batch, act) -> fx.Node | None:
    """Recompute an integer read off an outside activation's shape from ``inp``, or None if not needed."""
    if not _reads_outside_activation(n, act):
        return None
    v1, v2 = n.meta.get("ndc_value"), n.meta.get("ndc_value_b2")
    if not isinstance(v1, int) or isinstance(v1, bool) or not isinstance(v2, int):
        raise NdcError(f"node {n.name} reads the shape of an activation across a cut and is not a plain integer; "
                       "cut elsewhere or read the shape inside the neighbourhood")
    if v1 == v2:
        return v1  # type: ignore[return-value]  # a constant stands in for the node
    if batch is None:
        raise NdcError(f"node {n.name} depends on the batch size but the neighbourhood input has no batch dimension")
    ratio = Fraction(v1, batch[0])
    if Fraction(v2, batch[1]) != ratio:
        raise NdcError(f"node {n.name} reads a shape across a cut that is not a multiple of the batch size")
    size = graph.call_method("size", (inp, 0))
    if ratio.numerator != 1:
        size = graph.call_function(operator.mul, (size, ratio.numerator))
    if ratio.denominator != 1:
        size = graph.call_function(operator.floordiv, (size, ratio.denominator))
    return size


def _reads_outside_activation(n: fx.Node, act: set[fx.Node]) -> bool:
    """True when ``n`` is a shape value computed (through shape values) from an activation."""
    seen, stack = set(), [n]
    while stack:
        m = stack.pop()
        for dep in m.all_input_nodes:
            if dep in act:
                return True
            if dep not in seen and dep.meta.get("tensor_meta") is None:
                seen.add(dep)
                stack.append(dep)
    return False


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.iand, operator.ior, operator.ixor, operator.setitem}


def mutates_first_argument(n: fx.Node, root: nn.Module) -> bool:
    """True when ``n`` may write into its first argument (in-place op, ``inplace=True``, ``x[...] = v``)."""
    if n.kwargs.get("inplace") is True:
        return True
    if n.op == "call_module":
        return getattr(root.get_submodule(n.target), "inplace", False) is True
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        return n.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))
    return False


def protect_input(gm: fx.GraphModule) -> fx.GraphModule:
    """Clone the input first when an in-place operation would otherwise overwrite it.

    A neighbourhood's input may be a cached activation or the tensor the teacher
    neighbourhood also reads; writing into it would corrupt both. The clone is
    inserted only when needed, so the graph is unchanged for most models.
    """
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    if any(u.args and u.args[0] is placeholder and mutates_first_argument(u, gm) for u in placeholder.users):
        with gm.graph.inserting_after(placeholder):
            clone = gm.graph.call_method("clone", (placeholder,))
        placeholder.replace_all_uses_with(clone, delete_user_cb=lambda u: u is not clone)
        clone.meta = copy.copy(placeholder.meta)
        gm.recompile()
    return gm


def compose(parts: list[nn.Module]) -> nn.Sequential:
    """``S_n ∘ ... ∘ S_1`` as one module."""
    return nn.Sequential(*parts)

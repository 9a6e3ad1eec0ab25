"""Channel-dependency analysis: which dimensions of a neighbourhood may shrink, and what moves with them.

:func:`analyse` walks the neighbourhood's graph once, in order. Every axis of
every tensor gets a :data:`~ndc.passes.rewrite.dims.Layout`; the rule
registered for each node (:mod:`ndc.passes.rewrite.rules`) ties the axes it
couples, binds the parameter axes it owns and says what its output looks like.
The result is a proposal only: nothing in the neighbourhood is modified.

Invariants of the result:

* every axis of the neighbourhood's input and output is pinned (the student
  must have the teacher's boundary shapes);
* every axis touched by a node without a rule is pinned, with the node named;
* the layout of every axis covers exactly the teacher's size of that axis (a
  rule that breaks this fails here, naming the node, rather than producing a
  wrong shape later).

>>> an = analyse(part)                              # doctest: +SKIP
>>> [an.name(g) for g in an.free_groups()]          # doctest: +SKIP
['layer1.0.conv1.out_channels']
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from ndc.errors import NdcError
from ndc.passes.rewrite.dims import Dims, Layout
from ndc.passes.rewrite.registry import RULES, Registry

if TYPE_CHECKING:
    from ndc.passes.rewrite.width import Rewrite

Fixup = Callable[["Rewrite", fx.Node], None]

INPUT = "neighbourhood input (boundary)"
OUTPUT = "neighbourhood output (boundary)"


class Analysis:
    """The state one analysis builds; also the API a rule uses.

    ``layouts`` maps each tensor node to one layout per axis (a tuple of such
    lists for a node returning several tensors); ``params`` maps a qualified
    parameter or buffer name to the layouts of its bound axes; ``fixups`` are
    deferred edits the apply step runs on the student (module attributes,
    shape arguments), keyed by node name.
    """

    def __init__(self, gm: fx.GraphModule, registry: Registry):
        self.gm = gm
        self.registry = registry
        self.dims = Dims()
        self.layouts: dict[fx.Node, Any] = {}
        self.params: dict[str, dict[int, Layout]] = {}
        self.fixups: dict[str, list[Fixup]] = {}
        self.shape_reads: dict[fx.Node, fx.Node] = {}  # node holding ``x.shape`` -> x
        self._produced: set[str] = set()

    # ------------------------------------------------------------- reading

    def shape(self, node: Any) -> tuple[int, ...]:
        """The teacher's shape of tensor node ``node``."""
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            raise NdcError(f"rewrite: node {getattr(node, 'name', node)} has no tensor shape; "
                           "extract the neighbourhood from a traced teacher (ndc.passes.trace)")
        return tuple(int(d) for d in meta.shape)

    def is_tensor(self, arg: Any) -> bool:
        """True when ``arg`` is a node that carries one tensor."""
        return isinstance(arg, fx.Node) and isinstance(self.layouts.get(arg), list)

    def axes(self, arg: Any) -> list[Layout]:
        """The layouts of tensor argument ``arg``, one per axis."""
        value = self.layouts.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(value, list):
            raise NdcError(f"rewrite: {getattr(arg, 'name', arg)!s} is not a tensor the analysis has seen")
        return value

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def tensor(self, name: str) -> torch.Tensor:
        """The teacher's parameter, buffer or tensor attribute ``name`` (qualified)."""
        prefix, _, attr = name.rpartition(".")
        value = getattr(self.gm.get_submodule(prefix), attr, None)
        if not isinstance(value, torch.Tensor):
            raise NdcError(f"rewrite: {name} is not a tensor of the neighbourhood")
        return value

    def where(self, node: fx.Node) -> str:
        """``node`` in words for reports: ``reshape (call_method reshape)``."""
        if node.op == "call_module":
            return f"{node.target} (call_module {type(self.module(node)).__name__})"
        if node.op == "call_function":
            what = getattr(node.target, "__name__", str(node.target))
        else:
            what = str(node.target)
        return f"{node.name} ({node.op} {what})"

    # ------------------------------------------------------------- writing

    def set(self, node: fx.Node, layouts: list[Layout] | tuple[list[Layout], ...]) -> None:
        """Set the layouts of ``node``'s output (checked against its teacher shape)."""
        # A tuple may hold non-tensors (``(out, None)``): their entries are None.
        self.layouts[node] = list(layouts) if isinstance(layouts, list) else tuple(
            None if x is None else list(x) for x in layouts)

    def same(self, node: fx.Node, src: fx.Node) -> None:
        """``node``'s output has ``src``'s layouts (element-wise operations)."""
        self.set(node, list(self.axes(src)))

    def fresh(self, size: int, pinned: str | None = None) -> Layout:
        return self.dims.fresh(size, pinned)

    def tie(self, a: Layout, b: Layout, node: fx.Node) -> bool:
        """``a`` and ``b`` must be sliced alike (``node`` says which operation couples them)."""
        return self.dims.unify(a, b, f"coupled by {self.where(node)}")

    def pin(self, layout: Layout, why: str) -> None:
        self.dims.pin(layout, why)

    def pin_all(self, arg: Any, why: str) -> None:
        """Pin every axis of tensor (or tuple of tensors) ``arg``."""
        value = self.layouts.get(arg) if isinstance(arg, fx.Node) else None
        for axes in ([value] if isinstance(value, list) else value or ()):
            for layout in axes or ():
                self.pin(layout, why)

    def param(self, name: str, axis: int, layout: Layout | None = None) -> Layout:
        """Bind axis ``axis`` of parameter/buffer ``name`` (qualified) and return its layout.

        The first binding creates a fresh layout, or takes ``layout``; a later one
        (a module called twice) ties ``layout`` to the first. The apply step
        slices every bound axis by the channels its groups keep.
        """
        size = self.tensor(name).shape[axis]
        bound = self.params.setdefault(name, {})
        if axis in bound:
            if layout is not None:
                self.dims.unify(bound[axis], layout, f"{name} used twice")
            return bound[axis]
        if layout is None:
            layout = self.dims.fresh(size)
        elif self.dims.numel(layout) != size:
            raise NdcError(f"rewrite: binding axis {axis} of {name} ({size}) to an axis of {self.dims.numel(layout)}")
        bound[axis] = layout
        return layout

    def label(self, layout: Layout, name: str) -> None:
        """Name the channels of ``layout`` in the report (``conv2.in_channels``)."""
        self.dims.label(layout, name)

    def produce(self, layout: Layout, name: str, weight: torch.Tensor | None = None, axis: int = 0) -> None:
        """``layout``'s channels are produced by filters of ``weight`` along ``axis``.

        A group can shrink only if some layer produces it; the L1 norms of the
        producing filters (summed over every producer of the group) rank which
        channels a teacher-initialised student keeps. Counted once per ``name``.
        """
        self.dims.label(layout, name, producer=True)
        if weight is not None and name not in self._produced:
            self._produced.add(name)
            dims = [d for d in range(weight.dim()) if d != axis]
            self.dims.add_importance(layout, weight.detach().abs().sum(dim=dims) if dims else weight.detach().abs())

    def on_apply(self, node: fx.Node, fixup: Fixup) -> None:
        """Run ``fixup(rewrite, student_node)`` after the student's parameters are sliced."""
        self.fixups.setdefault(node.name, []).append(fixup)

    def unknown(self, node: fx.Node, why: str | None = None) -> None:
        """Keep every axis ``node`` touches: the default for operators without a rule."""
        why = why or f"touched by {self.where(node)}, which has no rewrite rule"
        for arg in _flat_nodes(node):
            self.pin_all(arg, why)
        self._fresh_outputs(node, why)

    def _fresh_outputs(self, node: fx.Node, why: str) -> None:
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return
        if hasattr(meta, "shape"):
            self.set(node, [self.fresh(d, why) for d in meta.shape])
        else:
            self.set(node, tuple(None if m is None else [self.fresh(d, why) for d in m.shape] for m in meta))

    # ------------------------------------------------------------- results

    def name(self, group: int) -> str:
        """A stable, readable name for a group: its first producer, else its first label."""
        for table in (self.dims.producers, self.dims.labels):
            if table.get(group):
                return table[group][0]
        return f"dim{group}"

    def channel_groups(self) -> list[int]:
        """Groups that some layer uses as channels (the ones a report lists)."""
        return [g for g in self.dims.groups() if self.dims.labels.get(g)]

    def free_groups(self) -> list[int]:
        """Groups the width rewrite may shrink: produced by a layer and not pinned."""
        return [g for g in self.dims.groups()
                if g not in self.dims.pins and self.dims.producers.get(g) and self.dims.sizes[g] > 1]

    def keys(self) -> dict[int, str]:
        """Unique record keys for the channel groups (the name, made unique in graph order)."""
        keys: dict[int, str] = {}
        seen: dict[str, int] = {}
        for g in self.channel_groups():
            base = self.name(g)
            seen[base] = seen.get(base, 0) + 1
            keys[g] = base if seen[base] == 1 else f"{base}@{seen[base]}"
        return keys


def analyse(part: fx.GraphModule, registry: Registry | None = None) -> Analysis:
    """Analyse the channel dependencies of neighbourhood ``part`` (not modified).

    ``part`` must carry ``tensor_meta`` on its nodes (any module extracted from
    a traced teacher does).
    """
    an = Analysis(part, registry or RULES)
    for node in part.graph.nodes:
        if node.op == "placeholder":
            an.set(node, [an.fresh(d, INPUT) for d in an.shape(node)])
        elif node.op == "output":
            for arg in _flat_nodes(node):
                an.pin_all(arg, OUTPUT)
        elif node.op == "get_attr":
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                an.set(node, [an.param(node.target, axis) for axis in range(len(meta.shape))])
        else:
            _visit(an, node)
        _check(an, node)
    return an


def _visit(an: Analysis, node: fx.Node) -> None:
    inputs = [a for a in _flat_nodes(node) if a in an.layouts or a in an.shape_reads]
    if not inputs and node.meta.get("tensor_meta") is None:
        return  # arithmetic on integers
    for a in inputs:
        # A shape object used anywhere but in ``shape[i]`` fixes every axis it describes.
        if a in an.shape_reads and not (node.op == "call_function" and node.target is operator.getitem):
            an.pin_all(an.shape_reads[a], f"its shape is read by {an.where(node)}")
    rule = an.registry.lookup(node, an.gm)
    if rule is None:
        an.unknown(node)
    else:
        rule(an, node)


def _check(an: Analysis, node: fx.Node) -> None:
    """Every tensor output has layouts that cover exactly its teacher shape."""
    meta = node.meta.get("tensor_meta")
    if meta is None or node.op == "output":
        return
    value = an.layouts.get(node)
    metas = [meta] if hasattr(meta, "shape") else list(meta)
    values = [value] if isinstance(value, list) else list(value or ())
    ok = len(values) == len(metas) and all(
        (v is None and m is None) or (v is not None and m is not None and len(v) == len(m.shape)
                                      and all(an.dims.numel(l) == d for l, d in zip(v, m.shape)))
        for v, m in zip(values, metas))
    if not ok:
        got = [None if v is None else [an.dims.numel(l) for l in v] for v in values]
        raise NdcError(f"rewrite: the rule for {an.where(node)} described shape {got or 'nothing'} "
                       f"for a tensor of shape {[None if m is None else list(m.shape) for m in metas]} (a bug in that rule)")


def _flat_nodes(node: fx.Node) -> Iterator[fx.Node]:
    """The nodes among ``node``'s arguments, in order, each once."""
    seen: dict[fx.Node, None] = {}
    fx.map_arg((node.args, node.kwargs), lambda n: seen.setdefault(n, None))
    return iter(seen)

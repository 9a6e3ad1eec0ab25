"""Which output ndc compiles: one tensor out of a tuple, a dict or a Hugging Face ``ModelOutput``.

Every later stage (distill, stitch, fine-tune, kd, search, probe, eval) works
with a teacher that returns one tensor. A model returning several values is
narrowed at trace time: the graph's output becomes the chosen value, so the
traced teacher *is* that one-tensor model.

The choice, ``--output NAME`` on ``ndc partition``:

* by default, the output itself when it is a tensor; the ``logits`` entry of
  a dict or ``ModelOutput``; else the first tensor in it;
* a name (``logits``, ``last_hidden_state``), a position (``0``), or a dotted
  path into nested values (``0.logits``); positions count the entries of a
  tuple or a dict in order.

>>> path, label = choose(value, None)              # doctest: +SKIP
>>> label
'logits'
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import GetAttrKey, MappingKey, SequenceKey, tree_flatten_with_path

from ndc.errors import NdcError, a_or_an

DEFAULT_KEY = "logits"


def _key(entry: Any) -> Any:
    if isinstance(entry, MappingKey):
        return entry.key
    if isinstance(entry, SequenceKey):
        return entry.idx
    if isinstance(entry, GetAttrKey):
        return entry.name
    raise NdcError(f"the model's output holds a value ndc cannot index ({entry!r})")


def _describe(leaves: list[tuple[tuple, Any]]) -> str:
    names = [".".join(str(_key(e)) for e in path) for path, v in leaves if isinstance(v, torch.Tensor)]
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def choose(value: Any, choice: str | None) -> tuple[tuple, str]:
    """The key path of the chosen tensor in ``value`` and a label for it (``()``, '' for a plain tensor)."""
    if isinstance(value, torch.Tensor):
        if choice not in (None, "", "0"):
            raise NdcError(f"--output {choice}: the model returns one tensor; leave --output out")
        return (), ""
    leaves, _ = tree_flatten_with_path(value)
    tensors = [(path, v) for path, v in leaves if isinstance(v, torch.Tensor)]
    if not tensors:
        raise NdcError(f"the model returns {a_or_an(type(value).__name__)} with no tensor in it; ndc compiles models that return a tensor")
    if choice is None or choice == "":
        by_name = [(p, v) for p, v in tensors if len(p) == 1 and _key(p[0]) == DEFAULT_KEY]
        path = (by_name or tensors)[0][0]
    else:
        path = _match(leaves, choice.split("."))
        found = [v for p, v in leaves if p == path]
        if not found or not isinstance(found[0], torch.Tensor):
            raise NdcError(f"--output {choice} is not a tensor of the model's output; tensors: {_describe(leaves)}")
    return path, ".".join(str(_key(e)) for e in path)


def _match(leaves: list[tuple[tuple, Any]], parts: list[str]) -> tuple:
    """The full path whose entries match ``parts`` (each a key or a position among its siblings)."""
    prefix: tuple = ()
    for depth, part in enumerate(parts):
        siblings = list(dict.fromkeys(p[depth] for p, _ in leaves if len(p) > depth and p[:depth] == prefix))
        named = [e for e in siblings if str(_key(e)) == part]
        if named:
            prefix += (named[0],)
        elif part.isdigit() and int(part) < len(siblings):
            prefix += (siblings[int(part)],)
        else:
            raise NdcError(f"--output {'.'.join(parts)}: the model's output has no entry {part!r}; tensors: {_describe(leaves)}")
    exact = [p for p, _ in leaves if p == prefix]
    if not exact:
        inner = [p for p, v in leaves if p[:len(prefix)] == prefix and isinstance(v, torch.Tensor)]
        if len(inner) == 1:
            return inner[0]
        raise NdcError(f"--output {'.'.join(parts)} holds several values; name one of: {_describe(leaves)}")
    return exact[0]


def leaf_index(value: Any, path: tuple) -> int:
    """Position of ``path`` among the flattened leaves of ``value`` (what a torch.export graph returns)."""
    leaves, _ = tree_flatten_with_path(value)
    return [p for p, _ in leaves].index(path)


def select(gm: fx.GraphModule, path: tuple, flat_index: int | None = None) -> None:
    """Make ``gm`` return only the value at ``path`` (in place; no-op for ``()``).

    ``flat_index``: the graph's output is the flat list of leaves (a
    torch.export graph), so the value is that entry. Otherwise the output
    argument is walked along ``path``; where it reaches a node that returns a
    container, indexing nodes are added.
    """
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if flat_index is not None:
        target = out.args[0][flat_index]
    else:
        if not path:
            return
        target = out.args[0]
        for entry in path:
            key = _key(entry)
            if isinstance(target, fx.Node):
                with gm.graph.inserting_before(out):
                    fn = getattr if isinstance(entry, GetAttrKey) else operator.getitem
                    target = gm.graph.call_function(fn, (target, key))
            else:
                target = target[key]
    if not isinstance(target, fx.Node):
        raise NdcError("the chosen output is a constant, not computed from the input; choose another with --output")
    out.args = (target,)
    _drop_unused(gm)
    gm.recompile()


def _drop_unused(gm: fx.GraphModule) -> None:
    """Remove what only the dropped outputs used: a dead branch would keep activations alive and block cuts.

    An operation that writes into its argument stays, used or not.
    """
    from ndc.passes.extract import mutates_first_argument

    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if (not n.users and n.op in ("call_function", "call_method", "call_module", "get_attr")
                    and not mutates_first_argument(n, gm)):
                gm.graph.erase_node(n)
                changed = True

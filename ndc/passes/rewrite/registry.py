"""The rule registry: operator kind -> the rule that says how it couples channels.

Supporting a new operator means registering one function, never editing a
chain of ``if``s (the habit this borrows from Torch-Pruning). A rule has the
signature ``rule(analysis, node) -> None``: it reads the layouts of the node's
inputs (:meth:`~ndc.passes.rewrite.analysis.Analysis.axes`), ties what must
stay equal, binds the parameter axes it owns, sets the layouts of the node's
output, and registers a fix-up if the student module or node needs more than
its parameters sliced. See ``docs/rewrite-rules.md`` for a worked example.

Lookup:

* ``call_module``: the module's class, then its base classes, but a base's
  rule is used only when the subclass does not override ``forward`` (a
  subclass that computes something else must not borrow ``Conv2d``'s rule);
* ``call_function``: the function object (``torch.cat``, ``operator.add``);
* ``call_method``: the method name (``"flatten"``, ``"view"``).

A node without a rule is not an error: every dimension it touches keeps the
teacher's size, and the report names the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch.fx as fx
import torch.nn as nn

if TYPE_CHECKING:
    from ndc.passes.rewrite.analysis import Analysis

Rule = Callable[["Analysis", fx.Node], None]


class Registry:
    """Maps module classes, functions and method names to rules."""

    def __init__(self) -> None:
        self.modules: dict[type, Rule] = {}
        self.functions: dict[object, Rule] = {}
        self.methods: dict[str, Rule] = {}

    def module(self, *classes: type) -> Callable[[Rule], Rule]:
        """Decorator: ``@registry.module(nn.Conv2d)`` registers a rule for those module classes."""
        return _register(self.modules, classes)

    def function(self, *functions: object) -> Callable[[Rule], Rule]:
        """Decorator: ``@registry.function(torch.cat)`` registers a rule for those callables."""
        return _register(self.functions, functions)

    def method(self, *names: str) -> Callable[[Rule], Rule]:
        """Decorator: ``@registry.method("flatten")`` registers a rule for ``tensor.flatten(...)``."""
        return _register(self.methods, names)

    def lookup(self, node: fx.Node, root: nn.Module) -> Rule | None:
        """The rule for ``node``, or None when no rule covers it."""
        if node.op == "call_module":
            cls = type(root.get_submodule(node.target))
            for base in cls.__mro__:
                rule = self.modules.get(base)
                if rule is not None:
                    return rule if base is cls or getattr(cls, "forward") is getattr(base, "forward") else None
            return None
        if node.op == "call_function":
            try:
                return self.functions.get(node.target)
            except TypeError:  # an unhashable callable
                return None
        if node.op == "call_method":
            return self.methods.get(node.target)
        return None

    def copy(self) -> "Registry":
        """An independent registry with the same rules (to extend without touching the default)."""
        new = Registry()
        new.modules, new.functions, new.methods = dict(self.modules), dict(self.functions), dict(self.methods)
        return new


def _register(table: dict, keys: tuple) -> Callable[[Rule], Rule]:
    def deco(rule: Rule) -> Rule:
        for key in keys:
            table[key] = rule
        return rule
    return deco


#: The registry the rewrite pass uses; :mod:`ndc.passes.rewrite.rules` fills it.
RULES = Registry()

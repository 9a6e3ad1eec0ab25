"""The torch.export frontend: ATen-level graphs of models torch.fx cannot trace.

``torch.export`` traces what symbolic tracing cannot: Hugging Face models,
code that branches on shapes, ``**kwargs`` forwards. Its graph is an
``fx.Graph`` of ATen operators, so the boundary analysis, the strategies,
extraction, rewriting and stitching run on it unchanged. This module turns an
exported program into the same kind of ``fx.GraphModule`` the fx frontend
gives:

* exported with a dynamic batch dimension (an example batch of 2: export
  specialises sizes 0 and 1), so integers read off the batch size are graph
  nodes (``sym_size``) that a cut recomputes, never constants;
* parameters and buffers are ``get_attr`` nodes under the model's own names
  (``bert.encoder.layer.3.attention.self.query.weight``), and each node's
  ``nn_module_stack`` is keyed by module path, as fx's is, so neighbourhoods are
  named after the model's modules;
* runtime checks the exporter adds (input guards, ``_assert_tensor_metadata``)
  are dropped: they compute nothing and would pin the graph to one batch size;
* a program loaded from a ``.pt2`` archive (``torch.export.load``, which
  unpickles nothing) takes the same path without being exported again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from ndc.errors import NdcError, first_line
from ndc.passes.inputs import InputSpec

EXAMPLE_BATCH = 2
_ASSERTIONS = {"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range_for_size",
               "sym_constrain_range", "_assert"}
_HOOK = "_empty_nn_module_stack_from_metadata_hook"


def export_graph(model: nn.Module | torch.export.ExportedProgram, input_shape: tuple[int, ...],
                 inputs: InputSpec) -> tuple[fx.GraphModule, list[str]]:
    """``model`` (or a loaded program) as a plain ``fx.GraphModule`` of ATen operators, and notes for the user.

    The graph still returns what the model returns (its pytree output
    structure); :func:`plain_codegen` switches that off once an output is chosen.
    """
    if getattr(model, "_ndc_exported", False):
        return model, []  # already a graph of a loaded archive (see load_program)
    program = model if isinstance(model, torch.export.ExportedProgram) else _export(model, input_shape, inputs)
    with _quiet():
        gm = program.module()
    _drop_checks(gm)
    _module_stacks(gm.graph)
    _inline_attributes(gm.graph)
    gm.graph.lint()
    gm.recompile()
    # A fresh GraphModule: the unlifted module refuses eval()/train(), which every stage calls.
    plain = fx.GraphModule(gm, gm.graph, class_name=type(model).__name__ if isinstance(model, nn.Module) else "Exported")
    return plain, []


def load_program(program: torch.export.ExportedProgram, what: str) -> tuple[fx.GraphModule, tuple[int, ...], InputSpec]:
    """A loaded ``.pt2`` program as a graph module, with the input shape (batch 1) and input kind it was exported with."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"
                    and n.name in program.graph_signature.user_inputs]
    if len(placeholders) != 1:
        raise NdcError(f"{what} takes {len(placeholders)} inputs; ndc compiles programs with one input tensor")
    val = placeholders[0].meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.dim():
        raise NdcError(f"{what}: its input is not a batched tensor")
    if isinstance(val.shape[0], int):
        raise NdcError(f"{what} was exported with a fixed batch size {val.shape[0]}; export it again with a dynamic batch: "
                       "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))")
    shape = (1, *(int(d) for d in val.shape[1:]))
    gm, _ = export_graph(program, shape, InputSpec())
    inputs = InputSpec()
    if not val.is_floating_point():
        high = graph_vocabulary(gm)
        if high is None:
            raise NdcError(f"{what} reads integer inputs that no embedding table bounds; ndc cannot tell the token range")
        inputs = InputSpec("int64", high)
    gm._ndc_exported = True
    return gm, shape, inputs


def _export(model: nn.Module, input_shape: tuple[int, ...], inputs: InputSpec) -> torch.export.ExportedProgram:
    example = inputs.sample((EXAMPLE_BATCH, *input_shape[1:]), torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        try:
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as e:
            raise NdcError(f"torch.export cannot trace {type(model).__name__} with a dynamic batch dimension: "
                           f"{type(e).__name__}: {first_line(e)}") from None


def _drop_checks(gm: fx.GraphModule) -> None:
    """Remove the exporter's input guards and metadata assertions (they compute nothing)."""
    for n in reversed(list(gm.graph.nodes)):
        if n.users:
            continue
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            gm.graph.erase_node(n)
            with contextlib.suppress(AttributeError):
                delattr(gm, str(n.target))
        elif n.op == "call_function" and _op_name(n.target) in _ASSERTIONS:
            gm.graph.erase_node(n)


def _inline_attributes(graph: fx.Graph) -> None:
    """Move every parameter read (``get_attr``) to just before its first user, as fx places them.

    The exporter lists them all before the input; where they stand decides
    which neighbourhood owns (and counts) a weight.
    """
    position = {n: i for i, n in enumerate(graph.nodes)}  # users never move, so positions taken once stay ordered
    for n in [n for n in graph.nodes if n.op == "get_attr"]:
        if not n.users:
            graph.erase_node(n)
            continue
        min(n.users, key=position.__getitem__).prepend(n)


def _op_name(target) -> str:
    name = getattr(target, "__name__", "")
    return name.split(".")[0]


def _module_stacks(graph: fx.Graph) -> None:
    """Key every node's ``nn_module_stack`` by module path, as the fx frontend does (root and hooks left out)."""
    for n in graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if not stack:
            continue
        n.meta["nn_module_stack"] = {path: (path, kind) for key, (path, kind) in stack.items()
                                     if path and key != _HOOK and path != _HOOK}


def plain_codegen(gm: fx.GraphModule) -> None:
    """Let ``gm`` take and return plain values (the exported module flattens and rebuilds pytrees)."""
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()


_SHAPE_ONLY = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "expand", "contiguous", "clone", "alias",
               "detach", "flatten", "slice", "select", "narrow", "to", "_to_copy"}


def graph_vocabulary(gm: fx.GraphModule) -> int | None:
    """Rows of the embedding table that reads the graph's input (token ids), if any.

    The ids may be reshaped, sliced or copied on the way (GPT-2 reads
    ``input_ids.view(-1, L)``): ops that move ids without changing them are followed.
    """
    placeholder = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    ids, rows = [placeholder] if placeholder is not None else [], []
    for node in ids:  # grows as ids flow on
        for user in node.users:
            name = _op_name(user.target) if user.op == "call_function" else ""
            if name == "embedding" and len(user.args) > 1 and user.args[1] is node and isinstance(user.args[0], fx.Node) \
                    and user.args[0].op == "get_attr":
                rows.append(int(_attr(gm, str(user.args[0].target)).shape[0]))
            elif name in _SHAPE_ONLY and user.args and user.args[0] is node and _stays_integer(user) and user not in ids:
                ids.append(user)
    return min(rows) if rows else None


def _stays_integer(node: fx.Node) -> bool:
    """A node that keeps ids integers: any op but a cast to a floating dtype."""
    dtypes = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.dtype)]
    return not any(d.is_floating_point or d.is_complex for d in dtypes)


def _attr(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


@contextlib.contextmanager
def _quiet():
    """The exporter logs and warns a lot about things that are not the user's concern."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        before = logging.root.manager.disable
        logging.disable(logging.CRITICAL)  # a failed export logs whole graphs; its error is reported in one line
        try:
            yield
        finally:
            logging.disable(before)

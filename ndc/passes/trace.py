"""trace: a teacher ``nn.Module`` -> a ``torch.fx.GraphModule`` with shapes.

Invariant: ``traced.gm(x)`` equals ``model(x)`` for every input ``x`` of the
traced shape (modulo batch size), with the teacher in eval mode -- or, when
the model returns a tuple, a dict or a ``ModelOutput``, equals the chosen
tensor of it (:mod:`ndc.passes.outputs`).

Two frontends (``frontend=``): ``fx`` (symbolic tracing, below) and
``export`` (``torch.export``, ATen-level graphs, :mod:`ndc.passes.trace_export`);
``auto`` tries fx, then export when fx fails or has to keep modules opaque,
and says which it used. Whatever the frontend, the result is an
``fx.GraphModule`` whose nodes carry the same metadata, so every later pass
reads both alike.

* Submodules that cannot be traced become leaves automatically: the tracer
  records the innermost module being traced when an error is raised, marks it
  a leaf and tries again, so one untraceable corner never stops the model.
* Forward arguments after the first that have defaults (``mask=None``) are
  bound to their defaults, not traced.
* Shapes come from running the graph on an example input (an
  :class:`fx.Interpreter`); every node gets ``meta['tensor_meta']`` (tensors)
  or ``meta['ndc_value']`` (ints, sizes). A second run at another batch size
  stores ``meta['ndc_value_b2']`` so later passes know which integers read off
  shapes are the batch size.

>>> traced = trace(resnet20(), (1, 3, 32, 32))   # doctest: +SKIP
>>> traced.gm.graph                              # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import linecache
import os
import sys
import traceback
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._pytree import tree_leaves

from ndc.errors import NdcError, a_or_an
from ndc.passes import outputs
from ndc.passes.inputs import FLOAT, InputSpec

FRONTENDS = ("auto", "fx", "export")

_TORCH_DIR = os.path.dirname(torch.__file__)
_NDC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Traced:
    """A traced teacher: graph module, example input shape, and how tracing went."""

    gm: fx.GraphModule
    input_shape: tuple[int, ...]
    leaves: list[str] = field(default_factory=list)  # modules kept opaque (requested or automatic)
    notes: list[str] = field(default_factory=list)  # why each automatic leaf was needed
    frontend: str = "fx"  # the frontend that made ``gm``: fx or export
    inputs: InputSpec = FLOAT
    output: str | None = None  # the output chosen from a tuple/dict/ModelOutput ('' or None: the output itself)

    @property
    def input_node(self) -> fx.Node:
        return next(n for n in self.gm.graph.nodes if n.op == "placeholder")

    def node(self, name: str) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise NdcError(f"the traced graph has no node named {name!r}")

    def settings(self) -> dict:
        """What the plan must record to trace the same way again."""
        return {"frontend": _FRONTEND_NAMES[self.frontend], "leaves": sorted(self.leaves), "input": self.inputs.to_json(),
                "output": self.output or None, "torch": torch.__version__.split("+")[0]}

    def example(self, batch: int | None = None, seed: int = 0) -> torch.Tensor:
        """A random input of the traced shape (``batch`` examples): what shape propagation and checks feed."""
        shape = (batch or self.input_shape[0], *self.input_shape[1:])
        return self.inputs.sample(shape, torch.Generator().manual_seed(seed))


_FRONTEND_NAMES = {"fx": "torch.fx", "export": "torch.export"}


def frontend_of(settings: dict) -> str:
    """The frontend recorded by :meth:`Traced.settings` (fx or export)."""
    recorded = settings.get("frontend", "torch.fx")
    return next((k for k, v in _FRONTEND_NAMES.items() if v == recorded), "fx")


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = self.path_of_module(m)
            raise


def trace(model: nn.Module, input_shape: tuple[int, ...] | list[int], leaves: list[str] | tuple[str, ...] = (), *,
          frontend: str = "fx", inputs: InputSpec = FLOAT, output: str | None = None) -> Traced:
    """Trace ``model`` in eval mode with ``frontend`` and propagate shapes from ``input_shape``.

    ``inputs`` says what the input is (floats, or token ids); ``output`` which
    tensor of a tuple/dict/ModelOutput output to keep (see
    :mod:`ndc.passes.outputs`).
    """
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d <= 0 for d in input_shape):
        raise NdcError(f"bad input shape {list(input_shape)}: expected positive sizes such as 1,3,32,32")
    if frontend not in FRONTENDS:
        raise NdcError(f"unknown frontend {frontend!r}; choose from: {', '.join(FRONTENDS)}")
    model.eval()
    _no_cache(model)
    if frontend == "export" or is_exported(model):
        try:
            made = _export_frontend(model, input_shape, leaves, inputs)
        except NdcError as export_error:
            raise _input_or(export_error, model, input_shape, inputs) from None
        return _finish(made, input_shape, inputs, output)
    try:
        made = _fx_frontend(model, input_shape, leaves)
    except NdcError as fx_error:
        if frontend == "fx" or str(fx_error).startswith("--leaf"):  # (torch.export takes no --leaf: no use trying it)
            raise _input_or(fx_error, model, input_shape, inputs) from None
        try:
            made = _export_frontend(model, input_shape, leaves, inputs)
        except NdcError as export_error:
            both = NdcError(f"{fx_error} (torch.export failed too: {export_error})")
            raise _input_or(both, model, input_shape, inputs) from None
        traced = _finish(made, input_shape, inputs, output)
        traced.notes.insert(0, f"frontend: torch.export (torch.fx failed: {str(fx_error).split('. torch.fx')[0]})")
        return traced
    traced = _finish(made, input_shape, inputs, output)
    automatic = sorted(set(traced.leaves) - set(leaves))
    if frontend == "auto" and automatic:
        try:
            exported = _finish(_export_frontend(model, input_shape, leaves, inputs), input_shape, inputs, output)
        except NdcError:
            return traced  # export cannot do better: keep fx with its opaque leaves
        exported.notes.insert(0, f"frontend: torch.export (torch.fx had to keep {', '.join(automatic)} opaque)")
        return exported
    return traced


def _fx_frontend(model: nn.Module, input_shape: tuple[int, ...], leaves) -> tuple[fx.GraphModule, str, list[str], list[str]]:
    concrete = _bound_arguments(model)
    module_names = {name for name, _ in model.named_modules() if name}
    for leaf in leaves:
        if leaf not in module_names:
            raise NdcError(f"--leaf {leaf}: the model has no submodule of that name")
    leaf_set, notes = set(leaves), []
    for _ in range(len(module_names) + 1):
        tracer = _Tracer(leaf_set)
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
            break
        except Exception as e:
            failed = tracer.failed_in
            if not failed or failed in leaf_set:
                raise NdcError(_trace_failure(model, failed, e)) from None
            leaf_set.add(failed)
            notes.append(f"{failed} ({type(model.get_submodule(failed)).__name__}) could not be traced "
                         f"({_one_line(e)}{_where(e)}); it is kept as one opaque node")
    else:  # pragma: no cover - every iteration adds a module
        raise NdcError("tracing did not converge")
    _drop_bound_placeholders(graph)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    return gm, "fx", sorted(leaf_set), notes


def _export_frontend(model: nn.Module, input_shape: tuple[int, ...], leaves, inputs: InputSpec):
    from ndc.passes.trace_export import export_graph

    if leaves:
        raise NdcError("--leaf goes with --frontend fx; torch.export traces every module")
    gm, notes = export_graph(model, input_shape, inputs)
    return gm, "export", [], notes


def _finish(made, input_shape, inputs: InputSpec, output: str | None) -> Traced:
    """Choose the output, then propagate shapes: the part both frontends share."""
    gm, frontend, leaves, notes = made
    gm.eval()
    traced = Traced(gm, input_shape, leaves, notes, frontend, inputs)
    value = _run(traced)
    path, label = outputs.choose(value, output)
    if frontend == "export":  # the graph returns the flat list of output leaves: keep the chosen one, as a plain value
        from ndc.passes.trace_export import plain_codegen

        plain_codegen(gm)
        outputs.select(gm, path, outputs.leaf_index(value, path))
    elif not isinstance(value, torch.Tensor):
        outputs.select(gm, path)
    if not isinstance(value, torch.Tensor):
        traced.output = label
        traced.notes.append(f"the model returns {a_or_an(type(value).__name__)}; ndc compiles its output {label}"
                            + ("" if output else " (choose another with --output)"))
    propagate_shapes(traced)
    return traced


def _run(traced: Traced):
    """The graph's output on an example input, in one clear line when the model does not run on it."""
    x = traced.example()
    try:
        with torch.no_grad():
            return traced.gm(x)
    except Exception as e:
        interpreter = _ShapeInterpreter(traced.gm, "ndc_value")  # again, node by node, to name where it failed
        try:
            with torch.no_grad():
                interpreter.run(x)
        except Exception:
            pass
        raise NdcError(interpreter.failure or f"the model does not run on the example input {list(traced.input_shape)} "
                       f"({traced.inputs.dtype}): {type(e).__name__}: {_one_line(e)}; check --input-shape") from None


def _input_or(error: NdcError, model: nn.Module, input_shape: tuple[int, ...], inputs: InputSpec) -> NdcError:
    """Why the model itself refuses the example input, when it does (run as it is, no tracing): that is the
    problem to report, not the frontends' failures that follow from it; else ``error``."""
    if is_exported(model):
        return error
    try:
        _bound_arguments(model)  # one input tensor, or that is the clearer error
    except NdcError as e:
        return e
    entered: list[str] = []  # modules whose forward started and did not return: the innermost is where it failed
    looked_up: dict[str, object] = {}  # an embedding's indices, to tell positions past its table

    def enter(module, args, name):
        entered.append(name)
        if isinstance(module, nn.Embedding) and args:
            looked_up[name] = args[0]

    def leave(_module, _args, _output):
        entered.pop()  # and return None: the output stays as it is

    hooks = [h for name, m in model.named_modules() if name for h in (
        m.register_forward_pre_hook(lambda m, args, name=name: enter(m, args, name)), m.register_forward_hook(leave))]
    x = inputs.sample(input_shape, torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(x)
        return error
    except Exception as e:
        where = f" in module {entered[-1]} ({type(model.get_submodule(entered[-1])).__name__})" if entered else ""
        table = model.get_submodule(entered[-1]) if entered else None
        longer = (past_positions(looked_up.get(entered[-1]), table.num_embeddings, x)
                  if isinstance(table, nn.Embedding) else None)
        if longer:
            return NdcError(f"the model does not run on the example input {list(input_shape)} ({inputs.dtype}): "
                            f"{longer[0]}{where}; give --input-shape 1,L with L at most {longer[1]}")
        return NdcError(f"the model does not run on the example input {list(input_shape)} ({inputs.dtype}): "
                        f"{type(e).__name__}: {_one_line(e).rstrip('.')}{where}; check --input-shape / --input-dtype"
                        + _dtype_hint(e))
    finally:
        for h in hooks:
            h.remove()


def is_exported(model: nn.Module) -> bool:
    """True for a graph loaded from a torch.export archive (:func:`ndc.load.load_model`): it is traced as it is."""
    return bool(getattr(model, "_ndc_exported", False))


def _no_cache(model: nn.Module) -> None:
    """Switch off a Hugging Face model's key/value cache: it is an extra output no stage uses."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False


def propagate_shapes(traced: Traced) -> None:
    """Annotate every node with its output's metadata at the traced batch size and at another."""
    gm, shape = traced.gm, traced.input_shape
    gen = torch.Generator().manual_seed(0)
    other = (shape[0] + 1,) + shape[1:]
    for batch_shape, key, record in ((shape, "ndc_value", True), (other, "ndc_value_b2", False)):
        interpreter = _ShapeInterpreter(gm, key, record_tensors=record)
        try:
            with torch.no_grad():
                interpreter.run(traced.inputs.sample(batch_shape, gen))
        except Exception as e:
            # fx.Interpreter appends the node and graph to the message; keep our one line.
            raise NdcError(interpreter.failure or f"the model does not run on the example input: {_one_line(e)}") from None


class _ShapeInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, key: str, record_tensors: bool = True):
        super().__init__(gm)
        self.key, self.record_tensors = key, record_tensors
        self.failure: str | None = None
        self.ids: torch.Tensor | None = None

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as e:
            if self.failure is None:
                where = f" ({n.target})" if n.op == "call_module" else ""
                longer = self._past_positions(n)
                self.failure = (f"the model does not run on the example input: {longer[0]} at node {n.name}{where}; "
                                f"give --input-shape 1,L with L at most {longer[1]}" if longer else
                                f"the model does not run on the example input: {type(e).__name__}: {_one_line(e)} "
                                f"at node {n.name}{where}; check --input-shape" + _dtype_hint(e))
            raise
        if n.op == "placeholder" and self.ids is None and isinstance(result, torch.Tensor) and not result.is_floating_point():
            self.ids = result  # the model's input of token ids
        if self.record_tensors:
            meta = _tensor_meta(result)
            if meta is not None:
                n.meta["tensor_meta"] = meta
            n.meta["type"] = type(result)
            # Whether the value holds a tensor at all (a leaf module's ``(out, None)`` does):
            # boundary analysis counts such values as activations.
            n.meta["ndc_has_tensor"] = any(isinstance(v, torch.Tensor) for v in tree_leaves(result))
        elif isinstance(result, torch.Tensor) and result.dim():
            n.meta["ndc_batch_b2"] = result.shape[0]
        value = _plain_value(result)
        if value is not None:
            n.meta[self.key] = value
        return result

    def _past_positions(self, n: fx.Node) -> tuple[str, int] | None:
        """When ``n`` is an embedding lookup that failed on positions past its table: what to say, and the table's size."""
        try:
            if n.op == "call_module":
                table = self.module.get_submodule(n.target)
                if not isinstance(table, nn.Embedding):
                    return None
                rows, indices = table.num_embeddings, self.fetch_args_kwargs_from_env(n)[0][0]
            elif n.op == "call_function" and "embedding" in str(getattr(n.target, "__name__", n.target)):
                args = self.fetch_args_kwargs_from_env(n)[0]
                rows, indices = int(args[0].shape[0]), args[1]
            else:
                return None
        except Exception:
            return None
        return past_positions(indices, rows, self.ids)


def past_positions(indices, rows: int, ids) -> tuple[str, int] | None:
    """("its sequence of L positions is longer than the model's position table (R positions)", R) when an embedding
    of R ``rows`` failed on ``indices`` that are positions: not the input ids ``ids`` (B, L) themselves, with L above
    R. None otherwise."""
    if not (isinstance(indices, torch.Tensor) and isinstance(ids, torch.Tensor) and ids.dim() == 2
            and indices.numel() and int(indices.max()) >= rows and ids.shape[-1] > rows):
        return None
    if indices.shape == ids.shape and torch.equal(indices, ids):
        return None  # the token ids themselves: not a position table
    return (f"its sequence of {ids.shape[-1]} positions is longer than the model's position table ({rows} positions)",
            rows)


def _dtype_hint(e: BaseException) -> str:
    """An embedding fed floats fails with a message about integer indices: say how to feed token ids."""
    text = str(e)
    return " (token ids? pass --input-dtype int64)" if "indices" in text and "float" in text.lower() else ""


def _tensor_meta(result):
    """Metadata of a tensor, or a tuple of it per element of a tuple holding tensors (None for the others)."""
    if isinstance(result, torch.Tensor):
        return _extract_tensor_metadata(result)
    if isinstance(result, (list, tuple)) and any(isinstance(r, torch.Tensor) for r in result):
        return tuple(_extract_tensor_metadata(r) if isinstance(r, torch.Tensor) else None for r in result)
    return None


def _plain_value(result):
    """Ints, bools, floats and sizes: the values shape arithmetic produces."""
    if isinstance(result, bool | int | float):
        return result
    if isinstance(result, torch.Size | tuple | list) and all(isinstance(v, int) for v in result):
        return tuple(result)
    return None


def tensor_shape(node: fx.Node) -> list[int] | None:
    meta = node.meta.get("tensor_meta")
    return list(meta.shape) if meta is not None and hasattr(meta, "shape") else None


# ----------------------------------------------------------------- arguments


def _bound_arguments(model: nn.Module) -> dict:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in params if p.default is p.empty]
    if len(required) > 1:
        raise NdcError(f"{type(model).__name__}.forward takes {len(required)} required inputs ({', '.join(required)}); "
                       "ndc compiles models with one input tensor: wrap the model so forward takes one")
    if not params:
        raise NdcError(f"{type(model).__name__}.forward takes no positional input")
    return {p.name: p.default for p in params[1:] if p.default is not p.empty}


def _drop_bound_placeholders(graph: fx.Graph) -> None:
    """Remove the placeholders fx adds for bound arguments, with the checks it hangs on them.

    A bound value is inlined into the graph as a constant; its placeholder only
    feeds ``_assert`` nodes, which never reach the output.
    """
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        below, stack = {}, [ph]
        while stack:
            for user in stack.pop().users:
                if user not in below:
                    below[user] = None
                    stack.append(user)
        if any(n.op == "output" for n in below):
            raise NdcError(f"forward argument {ph.target!r} reaches the output; ndc compiles models with one input tensor")
        for n in reversed([n for n in graph.nodes if n in below]):
            graph.erase_node(n)
        graph.erase_node(ph)
    graph.lint()


# -------------------------------------------------------------------- errors


def _trace_failure(model: nn.Module, failed: str | None, e: Exception) -> str:
    what = f"module {failed} ({type(model.get_submodule(failed)).__name__})" if failed else f"{type(model).__name__}.forward"
    frame = _frame(e)
    package = _package_of(frame.filename if frame else getattr(sys.modules.get(type(model).__module__), "__file__", None))
    if package:  # not the user's code: nothing to rewrite
        advice = (f"torch.fx cannot trace this code of the installed package {package} (not yours to rewrite): "
                  "such models need --frontend export")
    else:
        advice = ("torch.fx cannot trace Python control flow on tensor values or shapes: rewrite that line "
                  "(e.g. with torch.where), or wrap the model so its forward takes one tensor")
    return f"cannot trace {what}: {_one_line(e)}{_where(e)}. {advice}"


def _frame(e: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame outside torch and ndc (the model's code, or a library it calls), if any."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _NDC_DIR + os.sep, "<"))]
    return frames[-1] if frames else None


def _where(e: BaseException) -> str:
    """' at file.py:12: `code`' for the innermost frame of the model's code, or ''."""
    f = _frame(e)
    if f is None:
        return ""
    code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f" at {os.path.basename(f.filename)}:{f.lineno}: `{code}`"


def _package_of(filename: str | None) -> str | None:
    """The installed package (under site-packages) that ``filename`` belongs to, or None for the user's own code."""
    parts = os.path.normpath(os.path.abspath(filename)).split(os.sep) if filename else []
    for marker in ("site-packages", "dist-packages"):
        if marker in parts[:-1]:
            rest = parts[parts.index(marker) + 1:]
            return rest[0].removesuffix(".py") if rest else None
    return None


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."

"""From a loaded teacher to a :class:`~ndc.ir.Plan`, and back from a workspace to the traced teacher.

The pipeline of ``ndc partition`` in one screen::

    loaded = load_model(MODEL, weights, trust_pickle)      # ndc.load
    traced = trace(loaded.model, input_shape, leaves)      # ndc.passes.trace
    part   = partition(traced, by, ...)                    # ndc.passes.partition
    plan   = build_plan(loaded, traced, part, options)     # here: extract, measure
    write_plan(ws, plan, loaded.model)                     # plan.json + teacher.safetensors

Later stages call :func:`load_teacher` to get the same traced graph back: the
architecture is rebuilt from the recorded source (a trusted pickle only if its
hash still matches) and the weights come from the workspace's
``teacher.safetensors``, so a factory without weights gives the same teacher
in every stage.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from ndc.errors import NdcError
from ndc.ir import Neighbourhood, Plan
from ndc.load import LoadedModel, check_and_load_state_dict, reload_model
from ndc.metrics import count_flops, count_params
from ndc.passes.extract import extract
from ndc.passes.partition import Partition, layers_every, partition
from ndc.passes.inputs import InputSpec
from ndc.passes.trace import Traced, frontend_of, tensor_shape, trace
from ndc.passes.verify import verify_recomposition
from ndc.workspace import PLAN, TEACHER_WEIGHTS, Workspace, sha256_file


def build_plan(loaded: LoadedModel, traced: Traced, part: Partition, options: dict) -> Plan:
    """Extract, verify and measure every neighbourhood of ``part``; the result is deterministic.

    The extracted neighbourhoods must recompose the teacher exactly
    (:func:`~ndc.passes.verify.verify_recomposition`), or no plan is made.
    """
    neighbourhoods, modules = [], []
    for seg in part.segments:
        module, input_node, output_name = neighbourhood_module(traced, seg)
        modules.append(module)
        in_shape = tensor_shape(input_node) or []
        out_node = traced.node(output_name) if output_name != "output" else None
        out_shape = tensor_shape(out_node) if out_node is not None else _output_shape(traced)
        neighbourhoods.append(Neighbourhood(
            name=seg.name,
            input=input_node.name,
            output=output_name,
            nodes=[n.name for n in seg.nodes],
            input_shape=in_shape,
            output_shape=out_shape or [],
            params=count_params(module),
            flops=count_flops(module, in_shape, traced.inputs if input_node.op == "placeholder" else None),
            kept=seg.kept,
            modules=sorted({str(n.target) for n in seg.nodes if n.op == "call_module"}),
            fingerprint=graph_fingerprint(module),
        ))
    verify_recomposition(traced, modules, part.strategy or options.get("by", ""), [seg.name for seg in part.segments])
    notes = _shared_parameters(modules, [seg.name for seg in part.segments])
    if len(part.segments) == 1:
        notes.append(f"no cut could be made (--by {part.strategy or options.get('by')}): the whole model is one "
                      "neighbourhood; try --by residual, --by module or --by cuts (--explain says why)")
    return Plan(
        source=loaded.source,
        input_shape=list(traced.input_shape),
        tracer=traced.settings(),
        partition={**options, "boundaries": part.boundaries},
        neighbourhoods=neighbourhoods,
        teacher={"params": count_params(traced.gm), "flops": count_flops(traced.gm, traced.input_shape, traced.inputs),
                 "graph": graph_fingerprint(traced.gm)},
        notes=traced.notes + part.notes + notes,
    )


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """What a graph computes, as a hash: its code, and the settings of each module it calls (a convolution's padding
    lives in its module, not in the code). Weights are not part of it."""
    h = hashlib.sha256(gm.code.encode())
    for node in gm.graph.nodes:
        if node.op == "call_module":  # an object's address in a repr changes from run to run, not what it computes
            h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", f"{node.target}={gm.get_submodule(node.target)!r}").encode())
    return h.hexdigest()


def _shared_parameters(modules: list[fx.GraphModule], names: list[str]) -> list[str]:
    """A note per teacher parameter used by several neighbourhoods (tied weights, e.g. an embedding and its output
    head), which every such neighbourhood counts. Extracted neighbourhoods keep the teacher's parameter names."""
    users: dict[str, tuple[int, list[str]]] = {}
    for module, name in zip(modules, names):
        for key, p in module.named_parameters():
            users.setdefault(key, (p.numel(), []))[1].append(name)
    return [f"{' and '.join(where)} share {key} ({count:,} parameters, tied weights): each counts it, the teacher once"
            for key, (count, where) in users.items() if len(where) > 1]


def neighbourhood_module(traced: Traced, seg) -> tuple[fx.GraphModule, fx.Node, str]:
    order = list(traced.gm.graph.nodes)
    input_node = order[seg.start]
    end = order[seg.end]
    output_name = end.name if end.op != "output" else "output"
    module = extract(traced.gm, input_node.name, output_name, [n.name for n in seg.nodes], class_name=_class_name(seg.name))
    return module, input_node, output_name


def _output_shape(traced: Traced) -> list[int] | None:
    out = next(n for n in reversed(traced.gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    return tensor_shape(value) if isinstance(value, fx.Node) else None


def _class_name(name: str) -> str:
    return "N_" + "".join(c if c.isalnum() else "_" for c in name)


# ------------------------------------------------------------------ workspace


def write_plan(ws: Workspace, plan: Plan, teacher: nn.Module) -> None:
    """Write the teacher's weights and ``plan.json`` (atomically, weights first)."""
    ws.ensure()
    ws.save_tensors(TEACHER_WEIGHTS, _untied(teacher.state_dict()))
    plan.teacher["sha256"] = sha256_file(ws.path(TEACHER_WEIGHTS))
    ws.record(TEACHER_WEIGHTS, made_from={"source": plan.source.get("sha256")})
    ws.write_text(PLAN, plan.dumps())
    ws.record(PLAN, made_from={"teacher": plan.teacher["sha256"]})


def _untied(state: dict) -> dict:
    """A copy of each tensor that shares memory with an earlier one (GPT-2's tied embedding and head).

    safetensors stores each tensor once; loading the copies back into tied
    parameters writes the same values twice, so the tie survives.
    """
    seen, out = set(), {}
    for key, value in state.items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


@dataclass
class Teacher:
    """The teacher as later stages see it: plan, traced graph, and its neighbourhoods."""

    plan: Plan
    traced: Traced

    @property
    def gm(self) -> fx.GraphModule:
        return self.traced.gm

    @property
    def sha256(self) -> str:
        return self.plan.teacher["sha256"]

    @property
    def identity(self) -> str:
        """The teacher's weights and, when the plan records it, what its graph computes: the key of every artefact
        made from the whole teacher (activation cache, quality table)."""
        graph = self.plan.teacher.get("graph")
        return self.sha256 if graph is None else f"{self.sha256}:{graph}"

    def part(self, name: str, deep_copy: bool = True) -> fx.GraphModule:
        """The teacher neighbourhood ``name`` as its own module (a deep copy by default)."""
        nb = self.plan[name]
        return extract(self.gm, nb.input, nb.output, nb.nodes, deep_copy=deep_copy, class_name=_class_name(name))

    def parts(self, deep_copy: bool = True) -> list[fx.GraphModule]:
        return [self.part(n.name, deep_copy) for n in self.plan.neighbourhoods]


def load_teacher(ws: Workspace) -> Teacher:
    """Rebuild the traced teacher of ``ws``'s plan, with the workspace's teacher weights."""
    plan = ws.load_plan()
    weights = ws.path(TEACHER_WEIGHTS)
    if not weights.is_file():
        raise NdcError(f"{weights} is missing; rerun ndc partition")
    if sha256_file(weights) != plan.teacher.get("sha256"):
        raise NdcError(f"{weights} does not match plan.json (corrupt or replaced); rerun ndc partition")
    model = reload_model(plan.source)
    state = ws.load_tensors(TEACHER_WEIGHTS)
    check_and_load_state_dict(model, state, str(weights))
    traced = trace(model, plan.input_shape, plan.tracer.get("leaves", []), frontend=frontend_of(plan.tracer),
                   inputs=InputSpec.from_json(plan.tracer.get("input")), output=plan.tracer.get("output"))
    if plan.teacher.get("graph") not in (None, graph_fingerprint(traced.gm)):
        raise NdcError(f"the teacher's code changed since ndc partition ({_source_name(plan.source)} computes another graph "
                       "than plan.json's); rerun ndc partition (students of neighbourhoods that changed are retrained)")
    names = {n.name for n in traced.gm.graph.nodes}
    missing = [nb.name for nb in plan.neighbourhoods if nb.input not in names or (nb.output != "output" and nb.output not in names)]
    if missing:
        raise NdcError(f"the teacher no longer traces to the graph in plan.json (neighbourhoods {', '.join(missing[:3])}); rerun ndc partition")
    return Teacher(plan, traced)


def _source_name(source: dict) -> str:
    if source.get("kind") == "huggingface":  # its code is the transformers package's
        return f"{source.get('architecture')} of transformers {source.get('transformers')}, now {_transformers_version()},"
    return str(source.get("target") or source.get("path") or "the model")


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


def partition_model(loaded: LoadedModel, input_shape, by: str = "auto", depth: int = 1, every: int | None = None,
                    cuts: tuple[str, ...] = (), leaves: tuple[str, ...] = (), *, frontend: str = "auto",
                    inputs: InputSpec | None = None, output: str | None = None) -> tuple[Plan, Traced]:
    """Trace and cut ``loaded``: the library form of ``ndc partition``.

    A model loaded from a ``.pt2`` archive is traced with the export frontend
    whatever ``frontend`` says (it is already an exported program).
    """
    if loaded.source.get("kind") == "export":
        frontend = "export"
    traced = trace(loaded.model, input_shape, leaves, frontend=frontend, inputs=inputs or InputSpec(), output=output)
    part = partition(traced, by=by, depth=depth, every=every, cuts=cuts)
    options = {"by": by}
    if by == "auto":
        options["chose"] = part.strategy
    if part.strategy == "module":
        options["depth"] = depth
    elif part.strategy == "layers":
        options["every"] = layers_every(by, every)
    elif part.strategy == "cuts":
        options["cuts"] = list(cuts)
    return build_plan(loaded, traced, part, options), traced

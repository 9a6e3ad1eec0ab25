"""``ndc partition MODEL``: trace the teacher, cut it into neighbourhoods, write ``plan.json``."""

from __future__ import annotations

import re
import sys

import click

from ndc.commands.common import common_options, emit, human, model_options, table, trace_options, user_errors, warn
from ndc.errors import NdcError


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,32,32' (or '1x3x32x32') -> (1, 3, 32, 32)."""
    try:
        shape = tuple(int(p) for p in re.split(r"[,x]", text.strip()))
    except ValueError:
        raise NdcError(f"bad --input-shape {text!r}: expected comma-separated sizes such as 1,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise NdcError(f"bad --input-shape {text!r}: expected positive sizes such as 1,3,32,32")
    return shape


def guess_input_shape(model) -> tuple[int, ...] | None:
    """An input shape from the model itself: an ``input_shape`` attribute, or its first layer."""
    import torch.nn as nn

    declared = getattr(model, "input_shape", None)
    if isinstance(declared, (tuple, list)) and declared and all(isinstance(d, int) for d in declared):
        return tuple(declared)
    config = getattr(model, "config", None)  # a Hugging Face model says what it reads
    if isinstance(getattr(config, "image_size", None), int) and isinstance(getattr(config, "num_channels", None), int):
        return (1, config.num_channels, config.image_size, config.image_size)
    if _reads_token_ids(model):
        return (1, TOKENS)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, 32, 32)
        if isinstance(m, nn.Conv1d):
            return (1, m.in_channels, 128)
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
    return None


TOKENS = 16  # sequence length traced when a language model's input shape is not given


def _reads_token_ids(model) -> bool:
    return getattr(model, "main_input_name", None) == "input_ids"


def input_spec(loaded, dtype: str | None):
    """What the input is: ``--input-dtype``, else what the file says (.pt2), else token ids for a Hugging Face LM."""
    from ndc.passes.inputs import FLOAT, integer_inputs

    if dtype is None:
        if loaded.inputs is not None:
            return loaded.inputs
        dtype = "int64" if _reads_token_ids(loaded.model) else "float32"
    if dtype == "float32":
        return FLOAT
    if loaded.inputs is not None and loaded.inputs.is_integer:
        return loaded.inputs
    return integer_inputs(loaded.model)


@click.command("partition")
@click.argument("model", metavar="MODEL")
@model_options()
@trace_options
@click.option("--explain", is_flag=True, help="Say why each neighbourhood could not be cut further.")
@common_options
@user_errors
def command(model, input_shape, by, depth, every, cuts, leaves, weights, trust_pickle, frontend, input_dtype, output, explain,
            workspace, fmt):
    """Trace MODEL and cut it into neighbourhoods at single-tensor boundaries.

    MODEL is a pickled nn.Module (file.pt, needs --trust-pickle), a factory
    package.module:function or path/to/file.py:function (with optional --weights),
    or a torch.export archive (file.pt2: loads without unpickling anything).
    Writes WORKSPACE/plan.json and the teacher's weights.

    \b
      ndc partition examples/models.py:resnet20 --input-shape 1,3,32,32
      ndc partition model.pt --by residual --trust-pickle
      ndc partition examples/transformers_models.py:bert --input-shape 1,16
      ndc partition model.pt2
    """
    from ndc.load import load_model
    from ndc.passes.partition import STRATEGIES, explain as explain_plan
    from ndc.plan import partition_model, write_plan
    from ndc.workspace import Workspace

    if by not in STRATEGIES:
        raise NdcError(f"unknown partition strategy {by!r}; valid strategies: {', '.join(STRATEGIES)}")
    shape = parse_shape(input_shape) if input_shape else None
    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle)
    inputs = input_spec(loaded, input_dtype)
    if shape is None and loaded.input_shape is not None:
        shape = loaded.input_shape
    if shape is None:
        shape = guess_input_shape(loaded.model)
        if shape is None:
            raise NdcError("cannot tell the model's input shape; pass --input-shape, e.g. 1,3,32,32")
        warn(f"no --input-shape given; using {','.join(map(str, shape))} from the model")
    plan, traced = partition_model(loaded, shape, by=by, depth=depth, every=every, cuts=tuple(cuts), leaves=tuple(leaves),
                                   frontend=frontend, inputs=inputs, output=output)
    ws = Workspace(workspace)
    write_plan(ws, plan, loaded.model)

    explanations = {}
    if explain:
        order = list(traced.gm.graph.nodes)
        index = {n.name: i for i, n in enumerate(order)}
        spans = [(nb.name, index[nb.input], index[nb.output] if nb.output != "output" else len(order) - 1) for nb in plan.neighbourhoods]
        explanations = explain_plan(traced, spans)
    for note in plan.notes:
        warn(note)

    payload = {
        "plan": str(ws.path("plan.json")),
        "frontend": plan.tracer["frontend"],
        "strategy": plan.partition.get("chose", plan.partition["by"]),
        "input_shape": plan.input_shape,
        "input_dtype": plan.tracer["input"]["dtype"],
        "output": plan.tracer.get("output"),
        "teacher": {"params": plan.teacher["params"], "flops": plan.teacher["flops"]},
        "neighbourhoods": [
            {
                "name": nb.name,
                "kept": nb.kept,
                "params": nb.params,
                "flops": nb.flops,
                "input_shape": nb.input_shape,
                "output_shape": nb.output_shape,
                "input": nb.input,
                "output": nb.output,
                "nodes": len(nb.nodes),
                **({"explain": explanations[nb.name]} if explain else {}),
            }
            for nb in plan.neighbourhoods
        ],
        "boundaries": plan.partition["boundaries"],
        "notes": plan.notes,
    }

    def text() -> str:
        rows = [[nb.name, len(nb.nodes), human(nb.params), human(nb.flops),
                 f"{'x'.join(map(str, nb.input_shape))} -> {'x'.join(map(str, nb.output_shape))}",
                 "kept" if nb.kept else "distil"] for nb in plan.neighbourhoods]
        out = [table(["neighbourhood", "nodes", "params", "FLOPs", "input -> output", ""], rows, "lrrrll")]
        trainable = len(plan.trainable)
        out.append(f"\n{trainable} neighbourhoods to distil, {len(plan.neighbourhoods) - trainable} kept "
                   f"({plan.tracer['frontend']}, --by {payload['strategy']}); "
                   f"teacher {human(plan.teacher['params'])} params, {human(plan.teacher['flops'])} FLOPs; wrote {ws.path('plan.json')}")
        if explain:
            out.append("")
            out += [f"{name}: {why}" for name, why in explanations.items()]
        return "\n".join(out)

    emit(fmt, payload, text)
    sys.stdout.flush()

"""``ndc partition MODEL``: trace the teacher, cut it into neighbourhoods, write ``plan.json``."""

from __future__ import annotations

import sys

import click

from ndc.commands.common import common_options, emit, human, model_options, table, trace_options, user_errors, warn
from ndc.errors import count


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
    a torch.export archive (file.pt2: only its tensors are unpickled, unless --trust-pickle),
    or a Hugging Face save_pretrained folder (config.json and safetensors; pytorch_model.bin
    needs --trust-pickle; nothing is downloaded and no custom code runs).
    Writes WORKSPACE/plan.json and the teacher's weights.

    \b
      ndc partition examples/models.py:resnet20 --input-shape 1,3,32,32
      ndc partition model.pt --by residual --trust-pickle
      ndc partition examples/transformers_models.py:bert --input-shape 1,16
      ndc partition model.pt2
      ndc partition my-bert/
    """
    from ndc import stages
    from ndc.passes.partition import explain as explain_plan
    from ndc.workspace import Workspace

    ws = Workspace(workspace)
    plan, traced = stages.partition(ws, model, input_shape=input_shape, by=by,
                                    depth=depth, every=every, cuts=tuple(cuts), leaves=tuple(leaves), weights=weights,
                                    trust_pickle=trust_pickle, frontend=frontend, input_dtype=input_dtype, output=output,
                                    warn=warn)

    explanations = {}
    if explain:
        order = list(traced.gm.graph.nodes)
        index = {n.name: i for i, n in enumerate(order)}
        spans = [(nb.name, index[nb.input], index[nb.output] if nb.output != "output" else len(order) - 1) for nb in plan.neighbourhoods]
        explanations = explain_plan(traced, spans)

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
        out.append(f"\n{count(trainable, 'neighbourhood')} to distil, {len(plan.neighbourhoods) - trainable} kept "
                   f"({plan.tracer['frontend']}, --by {payload['strategy']}); "
                   f"teacher {human(plan.teacher['params'])} params, {human(plan.teacher['flops'])} FLOPs; wrote {ws.path('plan.json')}")
        if explain:
            out.append("")
            out += [f"{name}: {why}" for name, why in explanations.items()]
        return "\n".join(out)

    emit(fmt, payload, text)
    sys.stdout.flush()

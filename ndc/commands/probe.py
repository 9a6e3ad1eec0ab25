"""``ndc probe``: the thresholding effect -- accuracy against noise amplitude at each neighbourhood, with a plot."""

from __future__ import annotations

from pathlib import Path

import click

from ndc.commands.common import (common_options, data_options, device_option, emit, finite_float, given, metric_option,
                                 model_options, normalize_option, on_workspace, remembered_data, table, user_errors,
                                 warn)
from ndc.errors import NdcError


@click.command("probe")
@click.argument("model", metavar="[MODEL|WORKSPACE]", required=False)
@data_options
@click.option("--eps", "eps_text", default=None, metavar="E[,E...]",
              help="Noise amplitudes [default: 0 and 0.001 to 10 in 1-2-5 steps].")
@click.option("--relative", is_flag=True, help="Scale the noise at each boundary by the teacher's activation std there.")
@click.option("--tolerance", type=finite_float("a positive number of points", positive=True), default=0.5,
              show_default=True,
              help="Threshold: the largest amplitude whose drop stays below this many points.")
@click.option("--eval-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Held-out set: the first N examples of the test split.")
@metric_option("Score under noise (agreement and output-error compare with the unperturbed model)")
@click.option("--all-neighbourhoods", "include_kept", is_flag=True,
              help="Also perturb the neighbourhoods kept with the teacher (stem, head).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for curves.csv, thresholds.png and probe.json [default: WORKSPACE/probe].")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Examples per forward pass.")
@model_options("MODEL: ")
@normalize_option
@device_option
@common_options
@user_errors
@remembered_data(on_workspace)
def command(model, data_spec, limit, eps_text, relative, tolerance, eval_size, metric, include_kept, seed, out_dir,
            batch_size, input_shape, by, depth, every, cuts, leaves, weights, trust_pickle, normalize, device, workspace, fmt):
    """Add Gaussian noise of amplitude ε at each neighbourhood's output, and at all of them, and measure the drop.

    The paper's thresholding effect (section 3, Figure 1): accuracy holds
    while ε stays under a threshold, which differs per neighbourhood and is
    lower when every neighbourhood is perturbed. Prints each curve's threshold
    (the largest ε whose drop stays below --tolerance points) and writes
    curves.csv, thresholds.png and probe.json.

    MODEL|WORKSPACE is a workspace directory (default: -w), whose plan and
    teacher are used, or a model as for `ndc partition` (file.py:factory,
    package.module:factory, or a .pt with --trust-pickle), which is traced and
    partitioned in memory with --input-shape and --by.

    \b
      ndc probe --data fashion-mnist
      ndc probe --data fashion-mnist --relative --eps 0,0.01,0.1,1
      ndc probe models.py:resnet20 --weights r20.safetensors --input-shape 1,3,32,32 --data cifar.npz
    """
    from ndc import stages
    from ndc.probe import parse_eps
    from ndc.workspace import Workspace

    if not data_spec:
        from ndc.tokens import data_example, reads_token_ids

        integer = None if model is not None else reads_token_ids(Workspace(workspace))
        raise NdcError(f"ndc probe measures accuracy under noise: give --data SPEC, {data_example(integer)}")
    eps = parse_eps(eps_text)
    teacher, ws, what = _teacher(model, workspace, input_shape, by, depth, every, cuts, leaves, weights, trust_pickle)
    folder = Path(out_dir) if out_dir else Workspace(workspace if ws is None else ws.root).path("probe")
    out = stages.probe(teacher, ws, folder, what, data=data_spec, limit=limit, normalize=normalize, eps=eps, relative=relative,
                       tolerance=tolerance, eval_size=eval_size, metric=metric, include_kept=include_kept, seed=seed,
                       batch_size=batch_size, device=device, warn=warn)
    result, files, payload, metric = out.result, out.files, out.payload, out.metric

    def text() -> str:
        rows = []
        for target in result.curves:
            drops = result.drops(target)
            cap = result.thresholds[target]
            shown = f">= {cap:g}" if target in result.capped else f"{cap:g}"
            row = [target, shown, f"{drops[-1]:.2f}"]
            if relative:
                row.insert(1, f"{result.scales[target]:.3g}" if target in result.scales else "")
            rows.append(row)
        headers = ["neighbourhood", "threshold ε", f"drop at ε={result.eps[-1]:g}"]
        if relative:
            headers.insert(1, "activation std")
        lines = [table(headers, rows), "",
                 f"{what}: {metric.title} {metric.format(result.baseline)} on {result.examples} held-out examples; "
                 f"threshold = largest ε with a drop below {tolerance:g}{' points' if metric.fraction else ''}",
                 f"wrote {files['png']}, {files['csv']} and {files['json']}"]
        return "\n".join(lines)

    emit(fmt, payload, text)


def _teacher(model, workspace, input_shape, by, depth, every, cuts, leaves, weights, trust_pickle):
    """The teacher to probe: a workspace's (MODEL a directory, or absent), or MODEL partitioned in memory.

    Returns (teacher, workspace or None, a name for the output).
    """
    from ndc.plan import Teacher, load_teacher
    from ndc.workspace import Workspace

    if model is None or Path(model).is_dir():
        flags = {"input_shape": "--input-shape", "by": "--by", "depth": "--depth", "every": "--every", "cuts": "--cut",
                 "leaves": "--leaf", "weights": "--weights", "trust_pickle": "--trust-pickle"}
        ignored = [flag for name, flag in flags.items() if given(name)]
        if ignored:
            warn(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored: they partition a MODEL in memory, "
                 "and a workspace has its plan")
        if model is not None and given("workspace"):
            warn(f"-w is ignored: the workspace probed is {model}")
        ws = Workspace(model if model is not None else workspace)
        if not ws.exists("plan.json"):
            raise NdcError(f"no plan in workspace {ws.root}; run `ndc partition MODEL -w {ws.root}` first, "
                           "or give a MODEL to partition in memory")
        return load_teacher(ws), ws, f"the teacher of {ws.root.name}"

    from ndc.load import guess_input_shape, load_model, parse_shape
    from ndc.passes.partition import STRATEGIES
    from ndc.plan import partition_model

    if by not in STRATEGIES:
        raise NdcError(f"unknown partition strategy {by!r}; valid strategies: {', '.join(STRATEGIES)}")
    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle)
    shape = parse_shape(input_shape) if input_shape else guess_input_shape(loaded.model)
    if shape is None:
        raise NdcError("cannot tell the model's input shape; pass --input-shape, e.g. 1,3,32,32")
    if not input_shape:
        warn(f"no --input-shape given; using {','.join(map(str, shape))} from the model's first layer")
    loaded.model.eval()
    plan, traced = partition_model(loaded, shape, by=by, depth=depth, every=every, cuts=tuple(cuts), leaves=tuple(leaves))
    plan.teacher.setdefault("sha256", "in-memory")
    return Teacher(plan, traced), None, model

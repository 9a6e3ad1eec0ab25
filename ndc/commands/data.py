"""``ndc data SPEC``: show what a data spec resolves to, and record its training statistics."""

from __future__ import annotations

import click

from ndc.commands.common import common_options, emit, normalize_option, table, user_errors
from ndc.commands.partition import parse_shape
from ndc.errors import NdcError


@click.command("data")
@click.argument("spec", metavar="SPEC")
@click.option("--input-shape", "input_shape", default=None, metavar="N,C,H,W",
              help="The model's input shape with the batch size first, as for ndc partition "
                   "(default: the workspace plan's, else the data's own shape).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use only the first N training and N test examples.")
@normalize_option
@common_options
@user_errors
def command(spec, input_shape, limit, normalize, workspace, fmt):
    """Resolve SPEC and print its sizes, classes, fitted example shape and statistics.

    SPEC is fashion-mnist[:DIR], mnist:DIR, digits, file.npz, imagefolder:DIR,
    or module:function / file.py:function returning (train, test). With
    normalisation by training statistics (the default) they are computed once
    and stored in WORKSPACE/data/, where every later stage finds them. Image
    folders and user datasets are read in full once, so a broken file shows up
    here rather than in the middle of training.

    \b
      ndc data fashion-mnist --input-shape 1,3,32,32
      ndc data digits --format json
      ndc data imagefolder:photos --limit 100
    """
    from ndc.data import open_data
    from ndc.workspace import PLAN, Workspace

    ws = Workspace(workspace)
    shape, shape_from = None, "the data's own shape"
    if input_shape:
        full = parse_shape(input_shape)
        if len(full) < 2:
            raise NdcError(f"bad --input-shape {input_shape!r}: give the batch size first, e.g. 1,3,32,32")
        shape, shape_from = full[1:], "--input-shape"
    elif ws.exists(PLAN):
        shape, shape_from = tuple(ws.load_plan().input_shape[1:]), f"the plan in {ws.root}"
    data = open_data(spec, shape, limit=limit, workspace=ws, normalize=normalize)
    data.check()
    payload = data.describe()

    def text() -> str:
        dims = "x".join(map(str, data.shape))
        raw = "x".join(map(str, data.raw_shape))
        rows = [
            ["source", data.where],
            ["train", data.train_size],
            ["test", f"{data.test_size}  ({data.split})"],
            ["classes", data.classes],
            ["example", f"{raw} -> {dims}  (fit: {payload['fit']}; shape from {shape_from})"],
            ["mean", " ".join(f"{m:.4f}" for m in data.mean)],
            ["std", " ".join(f"{s:.4f}" for s in data.std)],
            ["normalisation", data.normalization],
        ]
        if data.stats_path is not None:
            rows.append(["statistics", str(data.stats_path)])
        return f"{spec}\n" + table(["", ""], rows, "ll").split("\n", 2)[2]

    emit(fmt, payload, text)

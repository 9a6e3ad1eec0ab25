"""``ndc data SPEC``: show what a data spec resolves to, and record its training statistics."""

from __future__ import annotations

import click

from ndc.commands.common import common_options, emit, given, normalize_option, table, user_errors
from ndc.errors import NdcError
from ndc.load import parse_shape


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
    """Resolve SPEC and print its sizes, labels, fitted example shape and statistics.

    SPEC is fashion-mnist[:DIR], mnist:DIR, digits, file.npz, imagefolder:DIR,
    text:FILE[,TOKENIZER] (token ids of a text, with a local tokenizer.json),
    or module:function / file.py:function returning (train, test). With
    normalisation by training statistics (the default) they are computed once
    and stored in WORKSPACE/data/ (when it exists, or -w is given), where
    every later stage finds them. Image
    folders and user datasets are read in full once, so a broken file shows up
    here rather than in the middle of training. A non-finite value, an empty
    split, or (with a workspace plan) a class label the teacher has no output
    for, a token id beyond its vocabulary or floats for a model that reads
    token ids is one line naming the file and the first bad example, and exit
    status 1.

    \b
      ndc data fashion-mnist --input-shape 1,3,32,32
      ndc data digits --format json
      ndc data imagefolder:photos --limit 100
    """
    from ndc.data import open_data
    from ndc.heads import Head, label_kind, labels_fit
    from ndc.workspace import PLAN, Workspace

    ws = Workspace(workspace)
    shape, shape_from = None, "the data's own shape"
    plan = ws.load_plan() if ws.exists(PLAN) else None
    keep = ws.root.is_dir() or given("workspace")  # no ./ndc-work made just to look at data: statistics not kept
    if input_shape:
        full = parse_shape(input_shape)
        if len(full) < 2:
            raise NdcError(f"bad --input-shape {input_shape!r}: give the batch size first, e.g. 1,3,32,32")
        shape, shape_from = full[1:], "--input-shape"
    elif plan is not None:
        shape, shape_from = tuple(plan.input_shape[1:]), f"the plan in {ws.root}"
    data = open_data(spec, shape, limit=limit, workspace=ws if keep else None, normalize=normalize)
    data.check()
    output = plan.neighbourhoods[-1].output_shape if plan is not None and plan.neighbourhoods else []
    head = Head(tuple(int(d) for d in output[1:]))
    if len(output) in (2, 3) and label_kind(head, data) == "classes" and labels_fit(head, data):
        # the plan's teacher scores classes (per example, or per position): the labels must be among them
        data.check_classes(head.scores, f"the teacher of {ws.root} scores {head.scores} classes (search and probe can "
                                        "still measure agreement with --metric agreement)")
    payload = data.describe()

    def text() -> str:
        dims = "x".join(map(str, data.shape))
        raw = "x".join(map(str, data.raw_shape))
        rows = [
            ["source", data.where],
            ["train", data.train_size],
            ["test", f"{data.test_size}  ({data.split})"],
            ["labels", _labels(data)],
            ["example", f"{raw} -> {dims}  (fit: {payload['fit']}; shape from {shape_from})"],
        ]
        if payload.get("max_token_id") is not None:  # token ids: never normalised, so no mean and std
            rows.append(["max token id", payload["max_token_id"]])
        else:
            rows += [["mean", _values(data.mean)], ["std", _values(data.std)]]
        rows.append(["normalisation", data.normalization])
        if data.stats_path is not None:
            rows.append(["statistics", str(data.stats_path)])
        elif not keep and data.normalization == "training statistics":
            rows.append(["statistics", "not kept: no workspace here (-w DIR keeps them for the later stages)"])
        return f"{spec}\n" + table(["", ""], rows, "ll").split("\n", 2)[2]

    emit(fmt, payload, text)


def _values(values: list[float], shown: int = 8) -> str:
    """Per-channel statistics in a line; of many features, the first few and how many (--format json has all)."""
    text = " ".join(f"{v:.4f}" for v in values[:shown])
    return text + (f" ... ({len(values)} features)" if len(values) > shown else "")


def _labels(data) -> str:
    if getattr(data, "next_tokens", False):
        return "the next token at each position (made from the ids; only a language model uses them)"
    if data.labels == "classes":
        return f"{data.classes} classes" + (", one per sequence" if data.kind == "tokens" else "")
    if data.labels == "targets":
        what = "0/1 multi-label targets" if data.binary else "real-valued targets"
        return f"{what}, {'x'.join(map(str, data.target_shape)) or 'one'} per example"
    return "none (inputs only)"

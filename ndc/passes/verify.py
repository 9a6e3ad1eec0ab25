"""verify: prove a partition before it becomes a plan; never write a wrong cut.

Whatever strategy proposed the cuts, two checks run after every partition:

* :func:`verify_segments` (structure, linear time): the segments tile the
  graph in order (every node owned once, consecutive segments share their
  boundary), each segment's input and output are boundaries (the output of
  the last may be the graph's output), and no node of a segment reads an
  activation from outside it other than its input.
* :func:`verify_recomposition` (numbers): the extracted neighbourhoods,
  composed, compute exactly what the teacher computes on a fresh input.

A failure is an :class:`~ndc.errors.NdcError` naming the strategy, the
neighbourhood and the node, raised before anything is written. It means a
strategy proposed something it should not have (a bug): the user learns it
at once instead of from a plan that fails later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ndc.errors import NdcError

if TYPE_CHECKING:
    from ndc.passes.partition import GraphFacts, Segment
    from ndc.passes.trace import Traced


def _fail(strategy: str, what: str) -> NdcError:
    return NdcError(f"partition --by {strategy} proposed an invalid plan: {what}; no plan written (a bug in ndc's "
                    "strategy: please report it, and try another --by meanwhile)")


def verify_segments(facts: "GraphFacts", segs: list["Segment"], strategy: str) -> None:
    """Every segment is cut at boundaries, reads nothing from outside but its input, and together they tile the graph."""
    if not segs:
        raise _fail(strategy, "no neighbourhoods")
    order, index, act = facts.order, facts.index, facts.live.act
    cuts = set(facts.boundary_positions)
    output = index[facts.output]
    if order[segs[0].start].op != "placeholder":
        raise _fail(strategy, f"the first neighbourhood {segs[0].name} starts at {order[segs[0].start].name}, not at the input")
    owner: dict = {}
    for k, seg in enumerate(segs):
        if seg.start not in cuts:
            raise _fail(strategy, f"neighbourhood {seg.name} starts at {order[seg.start].name}, which is not a boundary")
        last = k == len(segs) - 1
        if not (seg.end in cuts or (last and seg.end == output)):
            raise _fail(strategy, f"neighbourhood {seg.name} ends at {order[seg.end].name}, which is not a boundary")
        if k and seg.start != segs[k - 1].end:
            raise _fail(strategy, f"neighbourhood {seg.name} does not start where {segs[k - 1].name} ends")
        for n in seg.nodes:
            if n in owner:
                raise _fail(strategy, f"node {n.name} belongs to both {owner[n]} and {seg.name}")
            owner[n] = seg.name
        inside = set(seg.nodes) | {order[seg.start]}
        for n in seg.nodes:
            outside = [a for a in n.all_input_nodes if a in act and a not in inside]
            if outside:
                raise _fail(strategy, f"neighbourhood {seg.name} reads activation {outside[0].name} from outside "
                                      f"(at node {n.name}); its input {order[seg.start].name} is not the only value crossing the cut")
    if segs[-1].end != output:
        final = facts.output.args[0]
        if not (isinstance(final, type(order[0])) and index.get(final) == segs[-1].end):
            raise _fail(strategy, f"the last neighbourhood {segs[-1].name} does not reach the model's output")
    missing = [n for n in order if n.op not in ("placeholder", "output") and n not in owner]
    if missing:
        raise _fail(strategy, f"node {missing[0].name} belongs to no neighbourhood")


def verify_recomposition(traced: "Traced", parts: list[nn.Module], strategy: str, names: list[str]) -> None:
    """The parts, composed, reproduce the teacher exactly on a fresh input (another batch size than traced)."""
    x = traced.example(batch=traced.input_shape[0] + 2, seed=1)
    with torch.no_grad():
        expected = traced.gm(x)
        value = x
        for name, part in zip(names, parts):
            try:
                value = part(value)
            except Exception as e:
                raise _fail(strategy, f"neighbourhood {name} does not run on its input ({type(e).__name__}: {e})") from None
    if not (isinstance(value, torch.Tensor) and value.shape == expected.shape and torch.equal(value, expected)):
        diff = (value - expected).abs().max().item() if isinstance(value, torch.Tensor) and value.shape == expected.shape else float("inf")
        raise _fail(strategy, f"the neighbourhoods do not recompose the teacher (max difference {diff:.3g})")

"""Width students: propose which channels each group keeps, then apply that to a deep copy.

The pass in three steps, each a plain function:

    an    = analyse(part)                         # which groups may shrink (no mutation)
    kept  = choose(an, propose(an, width, n))     # how many, and which channels (no mutation)
    gm    = apply_width(part, an, kept)           # slice a deep copy, fix attributes, check shapes

Invariant: ``apply_width`` returns a deep copy of ``part`` whose input and
output shapes are the teacher's; with nothing shrunk (``width=1``) its
outputs equal the teacher's exactly. Every node's new shape is checked
against the sizes the analysis predicted; a mismatch is an ``NdcError``
naming the node, never a silently wrong module.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.passes.rewrite.analysis import Analysis, analyse
from ndc.passes.rewrite.dims import Layout

if TYPE_CHECKING:
    from ndc.passes.rewrite.prune import Pruner

RECORD_FORMAT = 1
INITS = ("teacher", "random")


@dataclass
class Student:
    """A candidate's student neighbourhood and how it was made.

    ``module`` is a deep copy (training it never touches the teacher) with the
    teacher part's input and output shapes and train/eval mode. ``record``
    (JSON-able) together with ``spec`` rebuilds the same architecture with
    :func:`rebuild_student`. ``report`` has one entry per channel group:
    ``{"dim", "teacher", "student", "shrunk", "why"}``. ``pruner`` is set when
    the spec asks for sparsity.
    """

    module: fx.GraphModule
    spec: Spec
    record: dict
    report: list[dict]
    pruner: "Pruner | None" = None


# ----------------------------------------------------------------- propose


def student_size(teacher: int, width: float, round_to: int = 1) -> int:
    """Channels a group of ``teacher`` channels keeps at ``width``.

    At least one channel (at least ``round_to`` when that fits), a multiple of
    ``round_to`` (nearest), never more than the teacher has; a dimension that
    ``width`` alone keeps whole is never shrunk by rounding.

    >>> student_size(16, 0.5), student_size(3, 0.1), student_size(24, 0.5, round_to=8)
    (8, 1, 16)
    """
    k = max(1, math.floor(teacher * width + 0.5 + 1e-9))
    if k >= teacher:
        return teacher  # nothing to shrink: rounding must not shrink a dimension width keeps
    if round_to > 1:
        k = max(round_to, math.floor(k / round_to + 0.5 + 1e-9) * round_to)
    return min(k, teacher)


def propose(an: Analysis, width: float, round_to: int = 1) -> dict[int, int]:
    """New sizes of the groups that shrink (free groups only; unchanged ones are left out)."""
    sizes = {}
    for g in an.free_groups():
        n = an.dims.sizes[g]
        k = student_size(n, width, round_to)
        if k < n:
            sizes[g] = k
    return sizes


def choose(an: Analysis, sizes: dict[int, int]) -> dict[int, torch.Tensor]:
    """The channels each shrinking group keeps, in order: the most important ones.

    Importance is the L1 norm of the producing filters, summed over every
    producer in the group.
    """
    kept = {}
    for g, k in sizes.items():
        imp = an.dims.importance.get(g)
        if imp is None:
            imp = torch.zeros(an.dims.sizes[g], dtype=torch.float64)
        order = torch.argsort(-imp, stable=True)  # ties keep the lower index: deterministic
        kept[g] = torch.sort(order[:k]).values
    return kept


# ------------------------------------------------------------------- apply


class Rewrite:
    """What a rule's fix-up sees while the student is being built: the student and the kept channels."""

    def __init__(self, gm: fx.GraphModule, an: Analysis, kept: dict[int, torch.Tensor]):
        self.gm, self.an, self.kept = gm, an, kept

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def size(self, layout: Layout) -> int:
        """Elements of an axis in the student."""
        dims = self.an.dims
        return sum((len(self.kept[s.atom]) if s.atom in self.kept else dims.sizes[s.atom]) * s.inner
                   for s in dims.resolve(layout))

    def keep(self, layout: Layout) -> torch.Tensor | None:
        """Indices of the teacher's elements the student keeps along an axis (None: all of them)."""
        dims = self.an.dims
        segs = dims.resolve(layout)
        if not any(s.atom in self.kept for s in segs):
            return None
        parts, offset = [], 0
        for s in segs:
            n = dims.sizes[s.atom]
            channels = self.kept.get(s.atom, torch.arange(n))
            parts.append(offset + (channels[:, None] * s.inner + torch.arange(s.inner)).flatten())
            offset += n * s.inner
        return torch.cat(parts)


def apply_width(part: fx.GraphModule, an: Analysis, kept: dict[int, torch.Tensor]) -> fx.GraphModule:
    """A deep copy of ``part`` with every group in ``kept`` narrowed to those channels.

    Parameters and buffers are sliced along their bound axes (batch-norm
    statistics with their channels); rules' fix-ups then update module
    attributes and shape arguments; finally the student runs once on a zero
    input and every node's shape is compared with the analysis.
    """
    gm = copy.deepcopy(part)
    rw = Rewrite(gm, an, kept)
    with torch.no_grad():
        for name, axes in an.params.items():
            old = _get_tensor(gm, name)
            new = old
            for axis, layout in sorted(axes.items()):
                idx = rw.keep(layout)
                if idx is not None:
                    new = new.index_select(axis, idx.to(new.device))
            if new is not old:
                _set_tensor(gm, name, old, new)
    for node in gm.graph.nodes:
        for fix in an.fixups.get(node.name, ()):
            fix(rw, node)
    _drop_dead_shape_arithmetic(gm.graph)
    gm.graph.lint()
    gm.recompile()
    check_shapes(gm, rw)
    return gm


def _drop_dead_shape_arithmetic(graph: fx.Graph) -> None:
    """Remove integer nodes a fix-up left unused (``C // heads`` once the size is a constant).

    Only non-tensor ``call_*`` nodes go: an unused in-place tensor operation
    still has an effect and stays.
    """
    for n in reversed(list(graph.nodes)):
        if (not n.users and n.op in ("call_function", "call_method") and n.meta.get("tensor_meta") is None
                and "ndc_value" in n.meta):
            graph.erase_node(n)


def _get_tensor(gm: nn.Module, name: str) -> torch.Tensor:
    prefix, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(prefix), attr)


def _set_tensor(gm: nn.Module, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    prefix, _, attr = name.rpartition(".")
    mod = gm.get_submodule(prefix)
    new = new.contiguous()
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
    elif attr in mod._buffers:
        mod._buffers[attr] = new
    else:
        setattr(mod, attr, new)


class _Propagate(fx.Interpreter):
    """Runs the student once, recording shapes; remembers the node that failed."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False
        self.failed: str | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            self.failed = f"{n.name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
            raise
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        elif isinstance(result, (list, tuple)) and any(isinstance(r, torch.Tensor) for r in result):
            n.meta["tensor_meta"] = tuple(_extract_tensor_metadata(r) if isinstance(r, torch.Tensor) else None
                                          for r in result)
        return result


def check_shapes(gm: fx.GraphModule, rw: Rewrite) -> None:
    """Run ``gm`` on zeros (eval mode, no grad) and compare every node's shape with the analysis' prediction."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    meta = placeholder.meta["tensor_meta"]
    device = next((t.device for t in list(gm.parameters()) + list(gm.buffers())), torch.device("cpu"))
    x = torch.zeros(tuple(meta.shape), dtype=meta.dtype, device=device)
    was_training = gm.training
    gm.eval()
    prop = _Propagate(gm)
    try:
        with torch.no_grad():
            # Another batch size first: a size the rewrite made constant that should follow the batch fails here.
            if x.dim():
                out = prop.run(torch.zeros((x.shape[0] + 1, *x.shape[1:]), dtype=x.dtype, device=device))
                if isinstance(out, torch.Tensor) and out.dim() and out.shape[0] != x.shape[0] + 1:
                    raise NdcError("rewrite produced a student whose output does not follow the batch size")
            prop.run(x)
    except NdcError:
        raise
    except Exception:
        raise NdcError(f"rewrite produced a student that does not run, at node {prop.failed}") from None
    finally:
        gm.train(was_training)
    predicted = {n.name: v for n, v in rw.an.layouts.items()}
    for n in gm.graph.nodes:
        if n.name not in predicted or n.op == "output":
            continue
        got = n.meta.get("tensor_meta")
        want = predicted[n.name]
        wants = [want] if isinstance(want, list) else list(want)
        gots = [got] if hasattr(got, "shape") else list(got or ())
        expected = [None if axes is None else [rw.size(layout) for layout in axes] for axes in wants]
        actual = [None if m is None else list(m.shape) for m in gots]
        if expected != actual:
            raise NdcError(f"rewrite produced shape {actual} at node {n.name}, expected {expected} "
                           "(a bug in the rule for that operator)")


# ------------------------------------------------------------ the students


def make_student(part: fx.GraphModule, spec: Spec, *, init: str = "teacher", round_to: int = 1,
                 seed: int = 0) -> Student:
    """The student of ``part`` under ``spec``: a narrowed deep copy, plus its record, report and pruner.

    ``init="teacher"`` keeps the teacher's weights of the channels it keeps
    (the most important ones); ``init="random"`` gives the same architecture
    freshly initialised (``reset_parameters``, seeded by ``seed``). With
    sparsity in the spec the student starts from those weights, dense; the
    training loop ramps the masks with ``student.pruner.update(...)``.

    >>> s = make_student(part, Spec(width=0.5))          # doctest: +SKIP
    >>> s.module(x).shape == part(x).shape               # doctest: +SKIP
    True
    """
    from ndc.passes.rewrite.prune import Pruner

    _check_options(part, spec, init, round_to, seed)
    an = analyse(part)
    kept = choose(an, propose(an, spec.width, round_to))
    module = apply_width(part, an, kept)
    if init == "random":
        reinitialise(module, seed)
    pruner = Pruner(module, spec.sparsity, spec.nm) if spec.sparsity > 0 or spec.nm is not None else None
    return Student(module, spec, make_record(an, kept, spec, init, round_to, seed), report(an, kept, spec), pruner)


def make_record(an: Analysis, kept: dict[int, torch.Tensor], spec: Spec, init: str = "teacher", round_to: int = 1,
                seed: int = 0) -> dict:
    """The rewrite record of a student that keeps channels ``kept`` (JSON-able; :func:`rebuild_student` replays it)."""
    keys = an.keys()
    return {
        "format": RECORD_FORMAT,
        "spec": str(spec),
        "init": init,
        "round_to": round_to,
        "seed": seed,
        "dims": {keys[g]: {"teacher": an.dims.sizes[g], "kept": [int(i) for i in kept[g]]}
                 for g in an.channel_groups() if g in kept},
    }


def rebuild_student(part: fx.GraphModule, spec: Spec, record: dict) -> fx.GraphModule:
    """The architecture :func:`make_student` built for ``spec`` and ``record`` (weights: the teacher's slices).

    Load trained weights into it with ``load_state_dict(strict=True)``. A record
    that does not fit this neighbourhood (another teacher, another spec) is an
    ``NdcError``.
    """
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT
            or not isinstance(record.get("dims"), dict)):
        raise NdcError(f"bad student record: expected format {RECORD_FORMAT} with a 'dims' table")
    if record.get("spec") != str(spec):
        raise NdcError(f"student record was made for spec {record.get('spec')!r}, not {str(spec)!r}")
    round_to = record.get("round_to", 1)
    _check_options(part, spec, record.get("init", "teacher"), round_to, record.get("seed", 0))
    an = analyse(part)
    groups = {key: g for g, key in an.keys().items()}
    # A width spec fixes every group's size; learned gates (spec.gates) chose each free group's own size.
    learned = spec.gates is not None
    expected = {g: an.dims.sizes[g] - 1 for g in an.free_groups()} if learned else propose(an, spec.width, round_to)
    kept: dict[int, torch.Tensor] = {}
    for key, entry in record["dims"].items():
        g = groups.get(key)
        if g is None or g not in expected:
            raise NdcError(f"student record does not match this neighbourhood: {key} cannot shrink here")
        idx = entry.get("kept") if isinstance(entry, dict) else None
        n = an.dims.sizes[g]
        if (not isinstance(idx, list) or not (0 < len(idx) <= expected[g] if learned else len(idx) == expected[g])
                or entry.get("teacher") != n
                or not all(isinstance(i, int) and 0 <= i < n for i in idx) or idx != sorted(set(idx))):
            raise NdcError(f"student record does not match this neighbourhood: bad channels for {key}")
        kept[g] = torch.tensor(idx, dtype=torch.long)
    missing = [] if learned else [an.name(g) for g in expected if g not in kept]
    if missing:
        raise NdcError(f"student record does not match this neighbourhood: no channels for {missing[0]}")
    return apply_width(part, an, kept)


def reinitialise(module: nn.Module, seed: int) -> None:
    """Fresh parameters for every submodule with ``reset_parameters`` (seeded; the global RNG is left alone).

    Parameters without a layer that resets them (an exported graph's, a
    position embedding) get the defaults of :func:`reset_plain_parameters`;
    buffers keep the teacher's values.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, m in module.named_modules():
            if m is not module and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
        reset_plain_parameters(module)


def reset_plain_parameters(module: nn.Module) -> int:
    """Fresh values for parameters held by plain containers (an exported graph's), which have no ``reset_parameters``.

    The defaults of the layers they came from: matrices as ``nn.Linear``'s
    (Kaiming uniform), a 1-D ``weight`` as a norm's (ones), a ``bias`` zero,
    anything else (class tokens, position embeddings) N(0, 0.02). Returns how
    many were reset; parameters of modules with ``reset_parameters`` are left
    to them. Uses the global random generator (the caller seeds it).
    """
    owned = {id(p) for m in module.modules() if callable(getattr(m, "reset_parameters", None)) and m is not module
             for p in m.parameters(recurse=False)}
    count = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in owned:
                continue
            leaf = name.rpartition(".")[2]
            if p.dim() >= 2 and leaf == "weight":
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            elif leaf == "weight":
                nn.init.ones_(p)
            elif leaf == "bias":
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02)
            count += 1
    return count


def report(an: Analysis, kept: dict[int, torch.Tensor], spec: Spec) -> list[dict]:
    """One entry per channel group: its size in teacher and student, and why it shrank or stayed."""
    rows = []
    keys = an.keys()
    dims = an.dims
    for g in an.channel_groups():
        n = dims.sizes[g]
        k = len(kept[g]) if g in kept else n
        if g in dims.pins:
            why = dims.pins[g][0]
            other = [r for r in dict.fromkeys(dims.pins[g][1:]) if "(boundary)" not in r and r != why]
            if other:  # a layer that keeps its width of itself (nn.MultiheadAttention) is worth naming too
                why += f"; also {other[0]}"
        elif not dims.producers.get(g):
            why = "no layer of the neighbourhood produces these channels"
        elif k < n:
            names = _collapse(dims.labels.get(g, []))
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            why = "internal; sliced together: " + ", ".join(names[:4]) + more
        elif n == 1:
            why = "a single channel"
        elif spec.gates is not None:
            why = f"gates choose how many while training (up to {n})"
        else:
            why = f"width={spec.width:g} with rounding keeps all {n} channels"
        rows.append({"dim": keys[g], "teacher": n, "student": k, "shrunk": k < n, "why": why})
    return rows


def _collapse(labels: list[str]) -> list[str]:
    """``qkv.out_features[0:16]``, ``qkv.out_features[16:32]``, ... -> ``qkv.out_features (12 blocks)``."""
    counts: dict[str, int] = {}
    for label in labels:
        base = re.sub(r"(\[\d+:\d+\])+$", "", label)
        counts[base] = counts.get(base, 0) + 1
    return [base if c == 1 else f"{base} ({c} blocks)" for base, c in counts.items()]


def _check_options(part: Any, spec: Any, init: Any, round_to: Any, seed: Any) -> None:
    if not isinstance(part, fx.GraphModule):
        raise NdcError(f"rewrite: expected a torch.fx.GraphModule neighbourhood, got {type(part).__name__}")
    if not isinstance(spec, Spec):
        raise NdcError(f"rewrite: expected an ndc.ir.Spec, got {type(spec).__name__}")
    if init not in INITS:
        raise NdcError(f"unknown init {init!r}; choose from: {', '.join(INITS)}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise NdcError(f"round_to must be an integer >= 1, got {round_to!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise NdcError(f"seed must be an integer, got {seed!r}")
    placeholders = [n for n in part.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or not hasattr(placeholders[0].meta.get("tensor_meta"), "shape"):
        raise NdcError("rewrite: the neighbourhood must have one input with shape metadata; "
                       "extract it from a traced teacher (ndc.passes.extract)")

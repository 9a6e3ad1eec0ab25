"""partition: choose cuts among the boundaries and name the neighbourhoods between them.

Invariant: the neighbourhoods of a partition tile the graph: every node of the
traced teacher belongs to exactly one, consecutive neighbourhoods share one
boundary tensor, and composing their extracted modules gives the teacher.

Strategies (``--by``):

* ``auto`` (the default): ``residual`` where the model has residual blocks,
  else ``layers`` (a plain chain such as VGG, cut every ``every`` weight
  layers, 2 by default: see :func:`layers_every`); :attr:`Partition.strategy`
  says which it chose.
* ``residual``: one neighbourhood per region that merges a skip path (a
  residual block, a dense layer); a node that keeps the shape and holds no
  weight layer (the ReLU after the add, a post-norm transformer's LayerNorm)
  joins the region before it; the chains in between
  (stem, transitions, head) stay with the teacher (``kept``).
* ``module``: cut after every submodule at ``depth`` (1 = children of the root).
* ``layers``: cut after every ``every`` weight layers (conv, linear); where no
  boundary follows the ``every``-th (inside a residual block), at the next gap
  between weight layers that has one, counting on from there.
* ``cuts``: cut exactly at the named nodes or modules.

A cut that cannot be made (values other than the boundary stay alive across
it) is never silently dropped: ``module`` and ``layers`` report it in
``Partition.notes``; ``cuts`` refuses with an error. Whatever the strategy,
:func:`ndc.passes.verify.verify_segments` proves every cut a boundary before
the partition is returned.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from ndc.errors import NdcError, count
from ndc.passes.boundaries import Liveness, alive_across, boundaries, liveness
from ndc.passes.trace import Traced

STRATEGIES = ("auto", "residual", "module", "layers", "cuts")
_WEIGHT_FUNCTIONS = {"linear": 1, "conv1d": 1, "conv2d": 1, "conv3d": 1, "convolution": 1, "addmm": 2}


@dataclass
class Segment:
    """Nodes between two consecutive cuts: ``(start, end]`` in graph order."""

    start: int  # position of the input boundary
    end: int  # position of the output boundary (or of the output node)
    nodes: list[fx.Node]
    kept: bool = False
    name: str = ""
    absorbed: list[fx.Node] = field(default_factory=list)  # shape-keeping nodes joined after the block ended


@dataclass
class Partition:
    segments: list[Segment]
    boundaries: list[str]
    notes: list[str] = field(default_factory=list)
    strategy: str = ""  # the strategy that made the cuts (what ``auto`` chose)


class GraphFacts:
    """Everything the strategies ask about a traced graph, computed once (linear time)."""

    def __init__(self, traced: Traced):
        self.traced = traced
        self.gm = traced.gm
        self.live: Liveness = liveness(self.gm.graph)
        self.order = self.live.order
        self.index = self.live.index
        self.boundaries = boundaries(self.gm.graph, self.live)
        self.boundary_positions = [self.index[b] for b in self.boundaries]
        self.output = next(n for n in reversed(self.order) if n.op == "output")
        if not self.boundaries or self.order[self.boundary_positions[0]].op != "placeholder":
            raise NdcError("cannot partition the model: its input is not a single-tensor boundary of the traced graph "
                           "(several inputs, or an input read by untraced code); nothing can be cut")
        self._module_cache: dict[str, nn.Module] = dict(self.gm.named_modules())

    # ----------------------------------------------------------- node facts
    def module_of(self, n: fx.Node) -> str | None:
        """Qualified name of the module whose parameters ``n`` uses, if any."""
        if n.op == "call_module":
            return str(n.target)
        if n.op == "get_attr":
            return str(n.target).rpartition(".")[0]
        return None

    def params_of(self, n: fx.Node) -> int:
        if n.op == "call_module":
            return sum(p.numel() for p in self._module_cache[str(n.target)].parameters())
        if n.op == "get_attr":
            t = _getattr(self.gm, str(n.target))
            return t.numel() if isinstance(t, nn.Parameter) else 0
        return 0

    def scope(self, n: fx.Node) -> str:
        """The innermost module the node was traced in ('' for the root)."""
        if n.op in ("call_module", "get_attr"):
            return self.module_of(n) or ""
        stack = n.meta.get("nn_module_stack") or {}
        return str(next(reversed(stack))) if stack else ""

    def is_weight_layer(self, n: fx.Node) -> bool:
        if n.op == "call_module":  # any matrix of weights: conv, linear, an opaque attention module
            return any(p.dim() >= 2 for p in self._module_cache[str(n.target)].parameters())
        if n.op == "call_function":
            # F.linear / F.conv2d, and their ATen forms in exported graphs (``aten.linear.default``, GPT-2's ``addmm``).
            k = _WEIGHT_FUNCTIONS.get(getattr(n.target, "__name__", "").split(".")[0])
            return k is not None and len(n.args) > k and isinstance(n.args[k], fx.Node) and n.args[k].op == "get_attr"
        return False

    def has_weight_layer(self, seg: Segment) -> bool:
        return any(self.is_weight_layer(n) for n in seg.nodes)

    def shape(self, n: fx.Node):
        meta = n.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    # ------------------------------------------------------------- segments
    def segments(self, cuts: list[int]) -> list[Segment]:
        """Split the graph at the given boundary positions (sorted, first is the input)."""
        ends = cuts[1:]
        final = self.output.args[0]
        if not (isinstance(final, fx.Node) and self.index[final] in ends):
            ends.append(self.index[self.output])
        segs, start = [], cuts[0]
        for k, end in enumerate(ends):
            stop = end if k < len(ends) - 1 else self.index[self.output] - 1
            nodes = [n for n in self.order[start + 1: stop + 1] if n.op not in ("placeholder", "output")]
            segs.append(Segment(start, end, nodes))
            start = end
        return segs

    def has_params(self, seg: Segment) -> bool:
        return any(self.params_of(n) for n in seg.nodes)

    def merges(self, seg: Segment) -> bool:
        """True when a node of the segment reads two different activations (a skip path rejoins)."""
        act = self.live.act
        return any(len({a for a in n.all_input_nodes if a in act}) >= 2 for n in seg.nodes if n in act)

    def keeps_shape(self, seg: Segment) -> bool:
        return self.shape(self.order[seg.start]) == self.shape(self.order[seg.end])

    def alive_explanation(self, position: int) -> list[fx.Node]:
        """Activations other than the node at ``position`` that stay alive across it."""
        here = self.order[position]
        return [n for n in alive_across(self.live, position) if n is not here]


# ------------------------------------------------------------------ strategies


AUTO_EVERY = 2  # a plain chain under --by auto: two weight layers per neighbourhood


def layers_every(by: str, every: int | None) -> int:
    """``--every`` as given; by default 2 when ``--by auto`` cuts a plain chain, 1 for ``--by layers``.

    A neighbourhood of one weight layer has no channel inside it, only its
    boundaries, so ``--width`` could narrow nothing; two layers per
    neighbourhood leave the channels between them free to narrow (and
    ``--sparsity`` prunes either way).
    """
    return every if every is not None else (AUTO_EVERY if by == "auto" else 1)


def partition(traced: Traced, by: str = "auto", depth: int = 1, every: int | None = None,
              cuts: tuple[str, ...] = ()) -> Partition:
    """Cut ``traced`` with strategy ``by``; see the module docstring.

    The segments returned are verified (:func:`~ndc.passes.verify.verify_segments`):
    every cut is a boundary and the segments tile the graph.
    """
    from ndc.passes.verify import verify_segments

    if by not in STRATEGIES:
        raise NdcError(f"unknown partition strategy {by!r}; valid strategies: {', '.join(STRATEGIES)}")
    every = layers_every(by, every)
    facts = GraphFacts(traced)
    notes: list[str] = []
    chosen = by
    if by == "auto":
        segs = _residual(facts)
        blocks = sum(not seg.kept for seg in segs)
        if blocks:
            chosen = "residual"
            notes.append(f"--by auto: {count(blocks, 'residual block')}, cut as --by residual")
        elif not any(facts.is_weight_layer(n) for n in facts.order):
            chosen = "layers"
            segs = _by_positions(facts, [])  # no weight layer anywhere: one neighbourhood
        else:
            chosen = "layers"
            segs = _by_positions(facts, _layer_cuts(facts, every, notes) + _after_token_lookup(facts))
            notes.append(f"--by auto: no residual blocks; cut every {count(every, 'weight layer')} as --by layers")
    elif by == "residual":
        segs = _residual(facts)
        if not any(not seg.kept for seg in segs):
            notes.append("--by residual found no residual block, so every neighbourhood is kept; "
                         "use --by auto or --by layers to distil a plain chain")
    elif by == "module":
        segs = _by_positions(facts, _module_cuts(facts, depth, notes) + _after_token_lookup(facts))
    elif by == "layers":
        segs = _by_positions(facts, _layer_cuts(facts, every, notes) + _after_token_lookup(facts))
    else:
        if not cuts:
            raise NdcError("--by cuts needs at least one --cut NAME (a node or module name)")
        segs = _by_positions(facts, _explicit_cuts(facts, cuts))
    _keep_integer_inputs(facts, segs, notes)
    _name(facts, segs)
    verify_segments(facts, segs, chosen)
    return Partition(segs, [b.name for b in facts.boundaries], notes, chosen)


def _residual(facts: GraphFacts) -> list[Segment]:
    atoms = facts.segments(list(facts.boundary_positions))
    groups: list[Segment] = []
    for seg in atoms:
        residual = facts.merges(seg) and facts.has_params(seg)
        absorbable = facts.keeps_shape(seg) and not facts.merges(seg) and not facts.has_weight_layer(seg)
        prev = groups[-1] if groups else None
        if residual:
            groups.append(seg)
        elif prev is not None and not prev.kept and absorbable and not _is_tail(facts, seg):
            prev.nodes += seg.nodes
            prev.absorbed += seg.nodes
            prev.end = seg.end
        elif prev is not None and prev.kept:
            prev.nodes += seg.nodes
            prev.end = seg.end
        else:
            seg.kept = True
            groups.append(seg)
    return groups


def _keep_integer_inputs(facts: GraphFacts, segs: list[Segment], notes: list[str]) -> None:
    """A neighbourhood whose input is not floating point (token ids) stays with the teacher.

    Its student could not be trained on noise, and an embedding is a table
    lookup, not a layer to narrow: like a CNN's stem, it stays whole.
    """
    for seg in segs:
        meta = facts.order[seg.start].meta.get("tensor_meta")
        if not seg.kept and meta is not None and hasattr(meta, "dtype") and not meta.dtype.is_floating_point:
            seg.kept = True
            notes.append(f"the neighbourhood after {facts.order[seg.start].name} reads integer inputs (token ids); "
                         "it stays with the teacher")


def _after_token_lookup(facts: GraphFacts) -> list[int]:
    """The first boundary after every use of the integer input (token ids: their embedding lookups), as a cut.

    The neighbourhood that reads the ids stays with the teacher
    (:func:`_keep_integer_inputs`); cutting right after the lookups keeps only
    the tables there, where a layer cut could otherwise come after the first
    attention block and keep it too.
    """
    start = facts.order[facts.boundary_positions[0]]
    if _floating(start):
        return []
    integer, last = {start}, facts.index[start]
    for n in facts.order[facts.index[start] + 1:]:
        if any(a in integer for a in n.all_input_nodes):
            last = facts.index[n]
            if not _floating(n):
                integer.add(n)  # still ids (a reshape, a slice): its users read them too
    return [p for p in facts.boundary_positions if p >= last][:1]


def _floating(n: fx.Node) -> bool:
    meta = n.meta.get("tensor_meta")
    return meta is None or not hasattr(meta, "dtype") or meta.dtype.is_floating_point


def _is_tail(facts: GraphFacts, seg: Segment) -> bool:
    return seg.end == facts.index[facts.output]


def _by_positions(facts: GraphFacts, cut_positions: list[int]) -> list[Segment]:
    positions = sorted(set([facts.boundary_positions[0]] + cut_positions))
    segs = facts.segments(positions)
    for seg in segs:
        seg.kept = not facts.has_params(seg)
    return segs


def _module_cuts(facts: GraphFacts, depth: int, notes: list[str]) -> list[int]:
    if depth < 1:
        raise NdcError("--depth must be at least 1")
    # Submodules at `depth`, and shallower ones without children (a root-level conv at depth 2).
    targets = [name for name, m in facts.gm.named_modules()
               if name and (name.count(".") == depth - 1 or (name.count(".") < depth - 1 and not any(True for _ in m.children())))]
    wanted = set(targets)
    last: dict[str, int] = {}
    for n in facts.order:
        for path in _enclosing(n) & wanted:
            last[path] = facts.index[n]
    if not last:
        raise NdcError(f"no submodule at depth {depth} appears in the traced graph; try a smaller --depth")
    positions, boundary_set = [], set(facts.boundary_positions)
    for t in targets:
        if t not in last or facts.order[last[t]] is facts.output.args[0]:
            continue  # unused, or it computes the model's output: nothing to cut
        end = last[t]
        if end in boundary_set:
            positions.append(_absorb(facts, end, t))
        else:
            notes.append(f"cannot cut after module {t}: {_stay(facts.alive_explanation(end))} across it; "
                         "it shares a neighbourhood with what follows")
    return positions


def _enclosing(n: fx.Node) -> set[str]:
    """Every module path the node belongs to: its module and all their parents."""
    if n.op in ("call_module", "get_attr"):
        parts = str(n.target).split(".")
        if n.op == "get_attr":
            parts = parts[:-1]
        return {".".join(parts[:k]) for k in range(1, len(parts) + 1)}
    # The stack holds the modules that were called; a container that never is (an nn.ModuleList looped over)
    # still encloses what its children compute, as it does their call_module nodes above.
    paths = (str(key).split(".") for key in (n.meta.get("nn_module_stack") or {}))
    return {".".join(parts[:k]) for parts in paths for k in range(1, len(parts) + 1)}


def _absorb(facts: GraphFacts, pos: int, module: str = "") -> int:
    """Move a cut forward over parameter-free, shape-keeping single-input nodes (the ReLU after a block).

    Only nodes of ``module``'s parent (the parent applying the ReLU, a sibling
    dropout) or of a module around it join: the first operation of a module
    elsewhere (a pooler's slice after the encoder's last layer) does not.
    """
    boundary_set = set(facts.boundary_positions)
    act = facts.live.act
    i = pos
    while True:
        nxt = next((j for j in range(i + 1, len(facts.order)) if facts.order[j] in act), None)
        if nxt is None or nxt not in boundary_set:
            return i
        n = facts.order[nxt]
        weights = facts.params_of(n) or any(facts.params_of(a) for a in n.all_input_nodes if a.op == "get_attr")
        if weights or facts.shape(n) != facts.shape(facts.order[i]) or facts.is_weight_layer(n):
            return i
        if len([a for a in n.all_input_nodes if a in act]) != 1 or n.op == "call_module" and _has_state(facts, n):
            return i
        scope, parent = facts.scope(n), module.rpartition(".")[0]
        if module and scope and not (module.startswith(scope + ".") or not parent or scope.startswith(parent + ".")):
            return i
        i = nxt


def _has_state(facts: GraphFacts, n: fx.Node) -> bool:
    m = facts.gm.get_submodule(str(n.target))
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _layer_cuts(facts: GraphFacts, every: int, notes: list[str]) -> list[int]:
    if every < 1:
        raise NdcError("--every must be at least 1")
    layers = [facts.index[n] for n in facts.order if facts.is_weight_layer(n)]
    if not layers:
        raise NdcError("the model has no weight layers (conv or linear) to cut after; nothing to partition by layers")
    # Cut after `every` layers since the last cut; where no boundary lies before the next layer (inside a residual
    # block), cut at the first gap between layers that has one, and count on from there.
    positions, uncut, since = [], [], 0
    for k in range(1, len(layers)):
        since += 1
        if since < every:
            continue
        after, before = layers[k - 1], layers[k]
        inside = [p for p in facts.boundary_positions if after <= p < before]
        if inside:
            positions.append(inside[-1])
            since = 0
        else:
            a, b = facts.order[after], facts.order[before]
            uncut.append(f"between {_label(facts, a)} and {_label(facts, b)}: {_stay(facts.alive_explanation(after))} across it")
    if len(uncut) > 3:  # a transformer's q, k, v and every residual stream: one line, not one per pair
        notes.append(f"cannot cut {len(uncut)} times (--explain says why each neighbourhood is not cut further), "
                     f"e.g. {uncut[0]}; those layers share neighbourhoods")
    else:
        notes += [f"cannot cut {pair}; they share a neighbourhood" for pair in uncut]
    return positions


def _explicit_cuts(facts: GraphFacts, cuts: tuple[str, ...]) -> list[int]:
    by_name = {n.name: n for n in facts.order}
    modules = dict(facts.gm.named_modules())
    boundary_set = set(facts.boundary_positions)
    positions = []
    for name in cuts:
        # a module by the nodes traced inside it (an exported graph keeps no submodules, only each node's module path)
        inside = [facts.index[n] for n in facts.order if name and name in _enclosing(n)]
        if name in by_name:
            pos = facts.index[by_name[name]]
        elif inside:
            pos = inside[-1]
        elif name in modules and name:
            raise NdcError(f"--cut {name}: the module does not appear in the traced graph")
        else:
            raise NdcError(f"--cut {name}: no node or module of that name; `ndc partition --format json` lists the boundaries")
        if pos not in boundary_set:
            alive = facts.alive_explanation(pos)
            raise NdcError(f"cannot cut at {name}: {_stay(alive)} across it; "
                           f"valid cuts are the boundaries listed by `ndc partition --format json`")
        positions.append(pos)
    return positions


# ------------------------------------------------------------------------ names


def _name(facts: GraphFacts, segs: list[Segment]) -> None:
    """Deterministic, unique names: the deepest module enclosing each neighbourhood's main computation.

    The main computation is its weight layers (conv, linear); without any, the nodes holding parameters (a norm, a
    class token); without any, every operation. Another operation widens the name only to a module around the main
    computation (the patch embedding's flatten and class token name ``vit.embeddings``, a block's residual add names
    the block): glue from elsewhere (the class token and position embedding before the first block, a final norm
    before the classifier, the ReLU after a block, a token select in the root) does not drag it up to a parent. A
    neighbourhood whose main computation spans modules of the root is named after the module holding most of its
    parameters; a name that several neighbourhoods share gets the child holding most of each one's parameters, then
    ``~1``, ``~2``.
    """
    everywhere = Counter(p for n in facts.order if n in facts.live.act for p in _enclosing(n))
    bases = []
    for k, seg in enumerate(segs):
        # A node it absorbed (the ReLU after the add, a post-norm) does not widen the name.
        absorbed = set(seg.absorbed)
        nodes = [n for n in seg.nodes if n not in absorbed]
        live = [n for n in nodes if n in facts.live.act]
        main = [n for n in nodes if facts.is_weight_layer(n)] or [n for n in nodes if facts.params_of(n)] or live
        base = _common_prefix([s for n in main if (s := facts.scope(n))])
        if base:
            base = _common_prefix([base] + [s for n in live if (s := facts.scope(n)) and base.startswith(s + ".")])
        if not base and not seg.kept:
            base = _majority(facts, nodes)
        # It holds more, and the whole of a module around that (a Sequential stem: its conv, norm and activation):
        # that module names it.
        here = Counter(p for n in seg.nodes if n in facts.live.act for p in _enclosing(n))
        scopes = [facts.scope(n) for n in live]
        while ("." in base and here[parent := base.rpartition(".")[0]] == everywhere[parent]
               and any(_within(s, parent) and not _within(s, base) for s in scopes)):
            base = parent
        if len(segs) == 1:
            base = "model"
        elif seg.kept and k == 0:
            base = "stem"
        elif seg.kept and k == len(segs) - 1:
            base = "head"
        elif not base:
            base = _largest(facts, seg, "") or f"part{k}"
        bases.append(base)
    counts = Counter(bases)
    names = []
    for seg, base in zip(segs, bases):
        if counts[base] > 1:
            child = _largest(facts, seg, base)
            base = f"{base}.{child}" if child and base not in ("stem", "head") else base
        names.append(base)
    seen: Counter = Counter()
    totals = Counter(names)
    for seg, name in zip(segs, names):
        seen[name] += 1
        seg.name = f"{name}~{seen[name]}" if totals[name] > 1 else name


def _majority(facts: GraphFacts, nodes: list[fx.Node]) -> str:
    """The deepest module holding more than half of the parameters of ``nodes`` ('' if no module of the root does)."""
    sizes: Counter = Counter()
    for n in nodes:
        m, p = facts.module_of(n), facts.params_of(n)
        if m and p:
            parts = m.split(".")
            for k in range(1, len(parts) + 1):
                sizes[".".join(parts[:k])] += p
    total = sum(facts.params_of(n) for n in nodes)
    path = ""
    while best := [c for c in sizes if c.rpartition(".")[0] == path and 2 * sizes[c] > total]:
        path = best[0]  # a strict majority: at most one child holds it
    return path


def _largest(facts: GraphFacts, seg: Segment, base: str) -> str:
    """The child of ``base`` holding most parameters in ``seg`` ('' if none)."""
    sizes: Counter = Counter()
    for n in seg.nodes:
        m = facts.module_of(n)
        p = facts.params_of(n)
        if m is None or not p:
            continue
        rest = m[len(base) + 1:] if base else m
        if base and not m.startswith(base + "."):
            continue
        sizes[rest.split(".")[0]] += p
    return max(sorted(sizes), key=lambda c: sizes[c]) if sizes else ""


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def _common_prefix(paths: list[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def _names(nodes: list[fx.Node]) -> str:
    shown = ", ".join(n.name for n in nodes[:4]) + (", ..." if len(nodes) > 4 else "")
    return shown or "no other value"


def _stay(nodes: list[fx.Node]) -> str:
    """'relu stays alive' / 'a, b stay alive'."""
    return f"{_names(nodes)} {'stays' if len(nodes) == 1 else 'stay'} alive"


def _label(facts: GraphFacts, n: fx.Node) -> str:
    return str(n.target) if n.op == "call_module" else n.name


def _getattr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------- explain


def explain(traced: Traced, spans: list[tuple[str, int, int]]) -> dict[str, str]:
    """Why each neighbourhood ``(name, start, end)`` could not be cut further, in one sentence each.

    One scan keeps the set of live activations; inside each neighbourhood the
    values alive beside the current node are what block a cut there.
    """
    facts = GraphFacts(traced)
    live = facts.live
    owner = {}
    for name, start, end in spans:
        for i in range(start + 1, end):
            owner[i] = name
    dying: dict[int, list[fx.Node]] = {}
    for n, last in live.last_use.items():
        dying.setdefault(last, []).append(n)
    blockers: dict[str, dict[fx.Node, None]] = {name: {} for name, _, _ in spans}
    cuttable: dict[str, list[str]] = {name: [] for name, _, _ in spans}
    alive: dict[fx.Node, None] = {}
    for i, n in enumerate(facts.order):
        if n in live.act and live.last_use[n] > i:
            alive[n] = None
        for d in dying.get(i, ()):
            alive.pop(d, None)
        name = owner.get(i)
        if name is None or n not in live.act:
            continue
        others = [a for a in alive if a is not n]
        if others:
            blockers[name].update(dict.fromkeys(others))
        elif n in alive:
            cuttable[name].append(n.name)
    out = {}
    for name, start, end in spans:
        parts = []
        if cuttable[name]:
            parts.append(f"could also be cut at {_names([traced.node(c) for c in cuttable[name]])} (the strategy keeps it whole)")
        if blockers[name]:
            held = [f"{b.name} stays alive until {facts.order[live.last_use[b]].name}" for b in list(blockers[name])[:3]]
            parts.append("cannot be cut elsewhere inside: " + "; ".join(held))
        out[name] = "; ".join(parts) if parts else "a single operation: nothing to cut"
    return out

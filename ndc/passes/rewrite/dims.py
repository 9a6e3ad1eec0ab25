"""Channel atoms, layouts and their union-find: the data structure of the width analysis.

An **atom** is a run of channels that are kept or dropped as one unit: the
output channels of a convolution, the features of a linear layer, the
zero-padding a shortcut adds. Atoms that must be sliced identically (the two
operands of an add, a batch norm and the conv before it) are **unified**; the
classes of unified atoms are the channel **groups** the width rewrite shrinks.

A **layout** describes one axis of one tensor as a sequence of segments
``Seg(atom, inner)``: the atom's channels in order, each owning ``inner``
consecutive elements of the axis. A concatenated axis is several segments
(DenseNet); a flattened ``C x H x W`` axis is one segment with
``inner = H * W``; the hidden axis of a multi-head attention is the same
head-dimension atom repeated once per head.

When two layouts must agree but cut their axis at different places (an add
of a concatenation and a convolution output), the larger atoms are
**refined**: split into consecutive sub-atoms that then unify one to one.

Invariants:

* every atom in one group has the same size, and a group's channels are kept
  or dropped together everywhere it appears;
* a layout's element count never changes while the analysis runs (refining
  and unifying only change how it is cut into groups);
* pins, labels and importance follow an atom through unions, refinements and
  coarsenings (a group kept in blocks: attention heads), so the report can
  say why a dimension stayed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ndc.errors import NdcError


@dataclass(frozen=True)
class Seg:
    """``atom``'s channels in order, each owning ``inner`` consecutive elements of the axis."""

    atom: int
    inner: int = 1


Layout = tuple[Seg, ...]

# Beyond this many segments a layout is pinned instead of tracked (e.g. flattening
# a huge token axis into features); it keeps the analysis linear in practice.
MAX_SEGMENTS = 4096


class Dims:
    """Union-find over channel atoms, with refinement, pins, labels and importance.

    Only *leaf* roots (roots that were not refined) are groups. All methods
    keep the invariants of the module docstring.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.parent: list[int] = []
        self.parts: dict[int, Layout] = {}  # refined root -> its consecutive sub-atoms
        self.pins: dict[int, list[str]] = {}  # root -> reasons it keeps the teacher's size
        self.labels: dict[int, list[str]] = {}  # root -> tensors it names ("conv1.out_channels")
        self.producers: dict[int, list[str]] = {}  # root -> layers whose filters produce it
        self.importance: dict[int, torch.Tensor] = {}  # root -> per-channel importance (float64)

    # ----------------------------------------------------------------- atoms

    def atom(self, size: int, pinned: str | None = None) -> int:
        """A new atom of ``size`` channels (pinned with reason ``pinned`` if given)."""
        if size < 0:
            raise NdcError(f"rewrite: an axis of negative size {size}")
        a = len(self.sizes)
        self.sizes.append(int(size))
        self.parent.append(a)
        if pinned:
            self.pins[a] = [pinned]
        return a

    def fresh(self, size: int, pinned: str | None = None) -> Layout:
        """A layout of one new atom; an empty layout for a zero-size axis."""
        return (Seg(self.atom(size, pinned)),) if size else ()

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def resolve(self, layout: Layout) -> Layout:
        """``layout`` in terms of leaf groups (refined atoms expanded, roots substituted)."""
        out: list[Seg] = []
        for s in layout:
            r = self.find(s.atom)
            if r in self.parts:
                out.extend(Seg(p.atom, p.inner * s.inner) for p in self.resolve(self.parts[r]))
            else:
                out.append(Seg(r, s.inner))
        return tuple(out)

    def numel(self, layout: Layout) -> int:
        """Elements of the axis ``layout`` describes (teacher sizes)."""
        return sum(self.sizes[s.atom] * s.inner for s in layout)

    def leaves(self, layout: Layout) -> list[int]:
        """The distinct groups of ``layout``, in order of first appearance."""
        return list(dict.fromkeys(s.atom for s in self.resolve(layout)))

    def groups(self) -> list[int]:
        """Every leaf group, oldest first (deterministic for a given analysis)."""
        return [a for a in range(len(self.sizes)) if self.parent[a] == a and a not in self.parts]

    # ------------------------------------------------------------ properties

    def pin(self, layout: Layout, why: str) -> None:
        """Keep every channel of ``layout`` at the teacher's size, recording ``why``."""
        for g in self.leaves(layout):
            reasons = self.pins.setdefault(g, [])
            if why not in reasons:
                reasons.append(why)

    def is_free(self, layout: Layout) -> bool:
        """True when some group of ``layout`` is not pinned (yet)."""
        return any(g not in self.pins for g in self.leaves(layout))

    def label(self, layout: Layout, name: str, producer: bool = False) -> None:
        """Name the groups of ``layout`` after ``name`` (with channel ranges when it spans several)."""
        segs = self.resolve(layout)
        single = len({s.atom for s in segs}) == 1  # one group (possibly repeated, as over heads)
        offset = 0
        for s in segs:
            n = self.sizes[s.atom]
            text = name if single else _sub(name, offset, offset + n)
            offset += n
            _add(self.labels.setdefault(s.atom, []), text)
            if producer:
                _add(self.producers.setdefault(s.atom, []), text)

    def add_importance(self, layout: Layout, per_element: torch.Tensor) -> None:
        """Add ``per_element`` (one value per element of the axis) to the channels that own them."""
        per_element = per_element.detach().to("cpu", torch.float64).flatten()  # indices are chosen on the CPU
        if per_element.numel() != self.numel(layout):
            raise NdcError(f"rewrite: importance has {per_element.numel()} values for an axis of {self.numel(layout)}")
        offset = 0
        for s in self.resolve(layout):
            n = self.sizes[s.atom]
            chunk = per_element[offset: offset + n * s.inner].reshape(n, s.inner).sum(1)
            offset += n * s.inner
            self.importance[s.atom] = self.importance.get(s.atom, torch.zeros(n, dtype=torch.float64)) + chunk

    # ------------------------------------------------------- unify and refine

    def unify(self, a: Layout, b: Layout, why: str) -> bool:
        """Make ``a`` and ``b`` the same channels, refining atoms where their cuts differ.

        Both must describe axes of the same element count (a rule bug otherwise).
        Returns False, and pins both, when they cannot be matched (a channel that
        owns several elements on one side is cut across on the other).
        """
        if self.numel(a) != self.numel(b):
            raise NdcError(f"rewrite: {why}: tying an axis of {self.numel(a)} to one of {self.numel(b)} "
                           "(a rule is wrong)")
        left, right = list(self.resolve(a)), list(self.resolve(b))
        i = j = 0
        while i < len(left) and j < len(right):
            sa, sb = self._leaf(left, i), self._leaf(right, j)
            if sa is None or sb is None:
                continue  # a refined atom was expanded in place; look again
            if sa.inner != sb.inner:
                # A channel owning k times more elements on one side (a key/value head shared by k query
                # heads): the finer atom is kept in blocks of k channels, then the two line up.
                fine, coarse, segs, at = (sa, sb, left, i) if sa.inner < sb.inner else (sb, sa, right, j)
                if coarse.inner % fine.inner == 0 and self.coarsen(fine.atom, coarse.inner // fine.inner):
                    segs[at: at + 1] = self.resolve((fine,))
                    continue
                self.pin(a, f"{why}: channel layouts do not line up")
                self.pin(b, f"{why}: channel layouts do not line up")
                return False
            na, nb = self.sizes[sa.atom], self.sizes[sb.atom]
            if na == nb:
                self._union(sa.atom, sb.atom)
                i, j = i + 1, j + 1
            elif na > nb:
                self.refine(sa.atom, [nb, na - nb])
            else:
                self.refine(sb.atom, [na, nb - na])
        return True

    def _leaf(self, segs: list[Seg], i: int) -> Seg | None:
        """``segs[i]`` if it is still a leaf group; otherwise expand it in place and return None."""
        s = segs[i]
        r = self.find(s.atom)
        if r in self.parts:
            segs[i: i + 1] = self.resolve((s,))
            return None
        if r != s.atom:
            segs[i] = Seg(r, s.inner)
        return segs[i]

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[ra] != self.sizes[rb]:
            raise NdcError(f"rewrite: uniting groups of {self.sizes[ra]} and {self.sizes[rb]} channels "
                           "(a rule is wrong)")
        root, other = min(ra, rb), max(ra, rb)  # the oldest atom names the group: deterministic
        self.parent[other] = root
        for table in (self.pins, self.labels, self.producers):
            if other in table:
                merged = table.setdefault(root, [])
                for item in table.pop(other):
                    _add(merged, item)
        if other in self.importance:
            imp = self.importance.pop(other)
            self.importance[root] = self.importance[root] + imp if root in self.importance else imp

    def refine(self, atom: int, sizes: list[int]) -> list[int]:
        """Split leaf group ``atom`` into consecutive sub-atoms of ``sizes`` channels."""
        r = self.find(atom)
        if r in self.parts:
            raise NdcError("rewrite: refining an atom twice (a bug in the analysis)")
        if sum(sizes) != self.sizes[r] or any(n <= 0 for n in sizes):
            raise NdcError(f"rewrite: cannot split {self.sizes[r]} channels into {sizes}")
        pieces, offset = [], 0
        for n in sizes:
            p = self.atom(n)
            for table in (self.pins, self.labels, self.producers):
                if r in table:
                    table[p] = [item if table is self.pins else _sub(item, offset, offset + n) for item in table[r]]
            if r in self.importance:
                self.importance[p] = self.importance[r][offset: offset + n].clone()
            pieces.append(p)
            offset += n
        self.parts[r] = tuple(Seg(p) for p in pieces)
        return pieces

    def coarsen(self, atom: int, block: int) -> bool:
        """Keep leaf group ``atom`` in blocks of ``block`` consecutive channels (attention heads of ``block`` features).

        The group becomes a new one of ``n / block`` channels, each owning
        ``block`` elements of every axis the old one described; pins, labels
        and importance (summed per block) carry over. Returns False when
        ``block`` does not divide the group.
        """
        r = self.find(atom)
        n = self.sizes[r]
        if r in self.parts or block <= 1 or n % block:
            return False
        c = self.atom(n // block)
        if r in self.pins:
            self.pins[c] = list(self.pins[r])
        for table in (self.labels, self.producers):  # the report counts blocks: say how big they are
            if r in table:
                table[c] = [f"{label} in blocks of {block}" for label in table[r]]
        if r in self.importance:
            self.importance[c] = self.importance[r].reshape(n // block, block).sum(1)
        self.parts[r] = (Seg(c, block),)
        return True

    def cut(self, layout: Layout, chunk: int) -> list[Layout] | None:
        """``layout`` cut into consecutive layouts of ``chunk`` elements each (see :meth:`split`)."""
        total = self.numel(layout)
        if chunk <= 0 or total % chunk:
            return None
        return self.split(layout, [chunk] * (total // chunk))

    def split(self, layout: Layout, sizes: list[int]) -> list[Layout] | None:
        """``layout`` cut into consecutive layouts of ``sizes`` elements, refining atoms at the cuts.

        Returns None (and changes nothing) when a cut would fall inside the
        elements one channel owns, or the sizes do not add up.
        """
        segs = self.resolve(layout)
        if sum(sizes) != self.numel(segs) or any(n <= 0 for n in sizes):
            return None
        cuts, c = set(), 0
        for n in sizes[:-1]:
            c += n
            cuts.add(c)
        offset = 0
        for s in segs:  # check first, so a failed cut leaves the atoms as they were
            end = offset + self.sizes[s.atom] * s.inner
            if any(offset < c < end and (c - offset) % s.inner for c in cuts):
                return None
            offset = end
        out: list[Layout] = []
        current: list[Seg] = []
        offset, target = 0, iter(sizes)
        boundary = next(target)
        queue = list(segs)
        while queue:
            s = queue.pop(0)
            r = self.find(s.atom)
            if r in self.parts:  # refined meanwhile (the same atom appears twice in the layout)
                queue[0:0] = self.resolve((s,))
                continue
            s = Seg(r, s.inner)
            end = offset + self.sizes[r] * s.inner
            inside = sorted(c for c in cuts if offset < c < end)
            if inside:  # one refinement per atom, at every cut that falls inside it
                points = [offset] + inside + [end]
                pieces = self.refine(r, [(b - a) // s.inner for a, b in zip(points, points[1:])])
                queue[0:0] = [Seg(p, s.inner) for p in pieces]
                continue
            current.append(s)
            offset = end
            if offset == boundary:
                out.append(tuple(current))
                current = []
                boundary += next(target, 0)
        return out


def expand(layout: Layout, times: int) -> Layout:
    """Each channel of ``layout`` owning ``times`` times as many consecutive elements."""
    return tuple(Seg(s.atom, s.inner * times) for s in layout)


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


_RANGE = re.compile(r"^(.*)\[(\d+):(\d+)\]$")


def _sub(label: str, start: int, end: int) -> str:
    """``conv.out_channels`` -> ``conv.out_channels[8:16]``; ranges compose."""
    m = _RANGE.match(label)
    if m:
        base = int(m.group(2))
        return f"{m.group(1)}[{base + start}:{base + end}]"
    return f"{label}[{start}:{end}]"

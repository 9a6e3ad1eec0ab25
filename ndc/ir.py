"""The IR that flows between stages: :class:`Plan`, :class:`Neighbourhood`, :class:`Spec`.

Small dataclasses with a lossless JSON round trip. The traced graph itself is
not stored: it is rebuilt from the model source recorded in the plan (tracing
is deterministic), and the plan names nodes of that graph.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ndc.errors import NdcError

PLAN_VERSION = 1


# --------------------------------------------------------------------------- spec


SLIM_MODES = ("chain", "teacher")  # who teaches each width of a slimmable job: the next wider width, or the teacher


@functools.total_ordering
@dataclass(frozen=True)
class Spec:
    """How a student is derived from a neighbourhood.

    ``width`` multiplies every channel dimension internal to the neighbourhood;
    ``sparsity`` is the fraction of conv/linear weights masked to zero;
    ``nm`` is an optional N:M sparsity pattern such as ``(2, 4)``.
    ``slim`` marks a width made by a slimmable job (one weight-shared student
    for several widths, :mod:`ndc.distill.slimmable`): ``chain`` when each
    width learned from the next wider one (teacher assistants), ``teacher``
    when every width learned from the teacher. ``gates`` is the penalty of a
    gated job (:mod:`ndc.distill.gates`), whose learned gates choose the
    width of every channel group. A slimmable or gated candidate is a
    candidate of its own: it never shares a folder, a key or a row of a
    search table with the separately trained ``width=K``.
    ``Spec()`` is the teacher itself.

    >>> Spec.parse("width=0.5,sparsity=0.3")
    Spec(width=0.5, sparsity=0.3, nm=None, slim=None, gates=None)
    >>> str(Spec(width=0.5)), str(Spec(width=0.5, slim="chain")), str(Spec(gates=0.1))
    ('width=0.5', 'width=0.5,slim=chain', 'gates=0.1')
    """

    width: float = 1.0
    sparsity: float = 0.0
    nm: tuple[int, int] | None = None
    slim: str | None = None
    gates: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.width, (int, float)) and math.isfinite(self.width) and 0 < self.width <= 1):
            raise NdcError(f"bad spec: width must be in (0, 1], got {self.width}")
        if not (isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity) and 0 <= self.sparsity < 1):
            raise NdcError(f"bad spec: sparsity must be in [0, 1), got {self.sparsity}")
        if self.nm is not None:
            n, m = self.nm
            if not (0 < n < m):
                raise NdcError(f"bad spec: nm must be N:M with 0 < N < M, got {n}:{m}")
        masked = self.sparsity > 0 or self.nm is not None
        if self.slim is not None:
            if self.slim not in SLIM_MODES:
                raise NdcError(f"bad spec: slim must be one of {', '.join(SLIM_MODES)}, got {self.slim!r}")
            if masked:
                raise NdcError("bad spec: a slimmable job trains widths only; it cannot be combined with sparsity or nm")
        if self.gates is not None:
            if not (isinstance(self.gates, (int, float)) and math.isfinite(self.gates) and self.gates >= 0):
                raise NdcError(f"bad spec: gates (the gate penalty) must be 0 or more, got {self.gates}")
            if self.width != 1.0 or masked or self.slim is not None:
                raise NdcError("bad spec: gates learn the width themselves; they cannot be combined with width, "
                               "sparsity, nm or slim")

    KEYS = ("width", "sparsity", "nm", "slim", "gates")

    @classmethod
    def parse(cls, text: str) -> "Spec":
        """Parse ``key=value[,key=value...]``; keys: width, sparsity, nm (e.g. ``nm=2:4``), slim, gates."""
        values: dict[str, Any] = {}
        text = text.strip()
        if not text:
            raise NdcError("bad spec: empty; expected e.g. width=0.5 or sparsity=0.3")
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise NdcError(f"bad spec {text!r}: expected key=value, got {part!r}")
            if key not in cls.KEYS:
                raise NdcError(f"bad spec {text!r}: unknown key {key!r}; valid keys: {', '.join(cls.KEYS)}")
            if key in values:
                raise NdcError(f"bad spec {text!r}: {key} given twice")
            try:
                if key == "nm":
                    n, m = value.split(":")
                    values[key] = (int(n), int(m))
                elif key == "slim":
                    values[key] = value
                else:
                    values[key] = float(value)
            except ValueError:
                expected = "N:M such as 2:4" if key == "nm" else "a number"
                raise NdcError(f"bad spec {text!r}: {key} must be {expected}, got {value!r}") from None
        return cls(**values)

    def __str__(self) -> str:
        parts = []
        if self.width != 1.0 or (self.sparsity == 0 and self.nm is None and self.gates is None):
            parts.append(f"width={_num(self.width)}")
        if self.sparsity:
            parts.append(f"sparsity={_num(self.sparsity)}")
        if self.nm is not None:
            parts.append(f"nm={self.nm[0]}:{self.nm[1]}")
        if self.slim is not None:
            parts.append(f"slim={self.slim}")
        if self.gates is not None:
            parts.append(f"gates={_num(self.gates)}")
        return ",".join(parts)

    def _order(self) -> tuple:
        # None sorts first; a plain tuple comparison would fail on None against a value
        return (self.width, self.sparsity, self.nm or (0, 0), self.slim or "", -1.0 if self.gates is None else self.gates)

    def __lt__(self, other: "Spec") -> bool:  # the other comparisons: functools.total_ordering
        return self._order() < other._order()

    @property
    def is_identity(self) -> bool:
        return self.width == 1.0 and self.sparsity == 0 and self.nm is None and self.slim is None and self.gates is None

    def slug(self) -> str:
        """A file-name-safe form: ``width=0.5,sparsity=0.3`` -> ``width-0.5_sparsity-0.3``."""
        return str(self).replace("=", "-").replace(",", "_").replace(":", "-")


def _num(x: float) -> str:
    return repr(float(x)).rstrip("0").rstrip(".") if x != int(x) else f"{int(x)}.0"


# ------------------------------------------------------------------ neighbourhood


@dataclass
class Neighbourhood:
    """A subgraph of the teacher between two single-tensor boundaries.

    ``input`` and ``output`` are node names of the traced teacher graph; the
    neighbourhood computes ``output`` from ``input`` alone (plus parameters and
    constants). ``nodes`` lists the graph nodes it owns, in graph order.
    ``kept`` neighbourhoods (stem, head, glue) stay with the teacher.
    """

    name: str
    input: str
    output: str
    nodes: list[str]
    input_shape: list[int]
    output_shape: list[int]
    params: int = 0
    flops: int = 0
    kept: bool = False
    modules: list[str] = field(default_factory=list)
    fingerprint: str | None = None  # what it computes (ndc.plan.graph_fingerprint); None in plans older than it

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Neighbourhood":
        return cls(**d)


# ------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """The output of ``ndc partition``: where the teacher was cut, and how to rebuild it.

    ``source`` says how to load the teacher again (``kind`` is ``pickle`` or
    ``factory``, with ``path``/``target``, ``sha256`` and ``weights``);
    ``tracer`` records the settings that make tracing reproducible (leaf
    modules); ``partition`` the strategy and its options.
    """

    source: dict
    input_shape: list[int]
    tracer: dict
    partition: dict
    neighbourhoods: list[Neighbourhood]
    teacher: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def inputs(self):
        """The teacher's :class:`~ndc.passes.inputs.InputSpec` (floats, or token ids), as traced."""
        from ndc.passes.inputs import InputSpec

        return InputSpec.from_json(self.tracer.get("input"))

    def __getitem__(self, name: str) -> Neighbourhood:
        for n in self.neighbourhoods:
            if n.name == name:
                return n
        raise NdcError(f"no neighbourhood named {name!r}; the plan has: {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.neighbourhoods]

    @property
    def trainable(self) -> list[Neighbourhood]:
        """The neighbourhoods that get students (not kept)."""
        return [n for n in self.neighbourhoods if not n.kept]

    def index(self, name: str) -> int:
        return self.names.index(self[name].name)

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "source": self.source,
            "input_shape": list(self.input_shape),
            "tracer": self.tracer,
            "partition": self.partition,
            "teacher": self.teacher,
            "neighbourhoods": [n.to_json() for n in self.neighbourhoods],
            "notes": list(self.notes),
        }

    def dumps(self) -> str:
        """Canonical JSON text: the same plan always gives the same bytes."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise NdcError(f"plan version {d.get('version')} is not supported (expected {PLAN_VERSION}); rerun ndc partition")
        try:
            return cls(
                source=d["source"],
                input_shape=list(d["input_shape"]),
                tracer=d["tracer"],
                partition=d["partition"],
                teacher=d.get("teacher", {}),
                neighbourhoods=[Neighbourhood.from_json(n) for n in d["neighbourhoods"]],
                notes=list(d.get("notes", [])),
                version=d["version"],
            )
        except (KeyError, TypeError) as e:
            raise NdcError(f"plan.json is malformed ({e}); rerun ndc partition") from None

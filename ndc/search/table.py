"""The quality table (measured options per neighbourhood) and a search's result: pure data, no model runs here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from ndc.ir import Spec
from ndc.scoring import Metric, as_metric

DROP_DECIMALS = 9  # drops are compared to 1e-9 points, so sums in different orders tie exactly
QUALITY_FORMAT = 3


@dataclass(frozen=True)
class Option:
    """One choice for one neighbourhood: a trained candidate, or the teacher's own neighbourhood (``teacher``).

    ``accuracy`` is the held-out score (of the search's metric, accuracy by
    default) of the teacher with only this neighbourhood replaced; ``drop``
    how much worse it is than the teacher's: in points for metrics that are
    fractions, positive when worse (see :meth:`ndc.scoring.Metric.drop`).
    ``divergence``: how far that model's outputs are from the teacher's (see
    :class:`ndc.scoring.Divergence`; 0 for the teacher's option, None when not measured).
    """

    neighbourhood: str
    spec: Spec
    params: int
    flops: int
    accuracy: float
    drop: float
    teacher: bool = False
    error: float | None = None  # the job's final relative error on its held-out activations
    divergence: float | None = None

    @property
    def label(self) -> str:
        return "teacher" if self.teacher else str(self.spec)

    def size(self, kind: str) -> int:
        return self.params if kind == "params" else self.flops

    def to_json(self) -> dict:
        d = asdict(self)
        d["spec"] = str(self.spec)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Option":
        return cls(**{**d, "spec": Spec.parse(d["spec"])})


@dataclass
class QualityTable:
    """Measured options per trainable neighbourhood (in plan order), each list ordered smallest first.

    Invariants: every neighbourhood's list holds exactly one ``teacher``
    option, with drop 0 and the teacher neighbourhood's size; ``base`` is the
    size of everything that no option replaces, so a student's size is
    ``base + Σ chosen sizes`` and the all-teacher choice gives the teacher's.
    """

    metric: str
    examples: int
    teacher_accuracy: float
    options: dict[str, list[Option]]
    base: dict[str, int]
    teacher_size: dict[str, int]
    key: str = ""
    threshold: float | None = None  # the metric's multi-label threshold (see ndc.scoring.Metric)
    higher_is_better: bool = True   # recorded so reading a table never imports a user's metric
    divergence: str | None = None   # the kind of the options' divergences (ndc.scoring.DIVERGENCES); None: not measured

    def as_metric(self) -> Metric:
        return Metric(self.metric, self.threshold)

    @property
    def _unit(self) -> float:
        return 100.0 if self.as_metric().fraction else 1.0

    def predicted(self, drop: float) -> float:
        """The score a student whose predicted drop is ``drop`` is predicted to reach (within the metric's bounds)."""
        step = drop / self._unit
        value = self.teacher_accuracy - step if self.higher_is_better else self.teacher_accuracy + step
        low, high = self.as_metric().bounds
        return min(high, max(low, value))

    def drop_of(self, value: float) -> float:
        """How much worse ``value`` is than the teacher's score, in the drops' unit (points for fractions)."""
        step = self.teacher_accuracy - value if self.higher_is_better else value - self.teacher_accuracy
        return self._unit * step

    @property
    def has_divergence(self) -> bool:
        return self.divergence is not None and all(o.divergence is not None for opts in self.options.values() for o in opts)

    @property
    def drop_per_divergence(self) -> float | None:
        """How many drop units (points for fractions) one unit of divergence costs, fitted on the measured candidates.

        Least squares through the origin over every trained candidate,
        ``Σ drop·div / Σ div²``: each candidate was measured alone inside the
        teacher, so the pooled fit averages out the noise of single drops
        counted on a small held-out set. Never negative (drops that show no
        loss at all predict none); None when the table has no divergences, or
        none above 0.
        """
        if not self.has_divergence:
            return None
        trained = [o for name in self.options for o in self.trained(name)]
        spread = sum(o.divergence ** 2 for o in trained)
        if spread <= 0:
            return None
        return max(0.0, sum(o.drop * o.divergence for o in trained) / spread)

    def trained(self, name: str) -> list[Option]:
        return [o for o in self.options[name] if not o.teacher]

    def teacher_option(self, name: str) -> Option:
        return next(o for o in self.options[name] if o.teacher)

    def to_json(self) -> dict:
        return {"format": QUALITY_FORMAT, "key": self.key, "metric": self.metric, "threshold": self.threshold,
                "higher_is_better": self.higher_is_better, "divergence": self.divergence, "examples": self.examples,
                "teacher_accuracy": self.teacher_accuracy, "base": self.base, "teacher_size": self.teacher_size,
                "options": {k: [o.to_json() for o in v] for k, v in self.options.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "QualityTable":
        return cls(metric=d["metric"], examples=d["examples"], teacher_accuracy=d["teacher_accuracy"],
                   options={k: [Option.from_json(o) for o in v] for k, v in d["options"].items()},
                   base=d["base"], teacher_size=d["teacher_size"], key=d.get("key", ""), threshold=d.get("threshold"),
                   higher_is_better=d.get("higher_is_better", True), divergence=d.get("divergence"))


def _order(option: Option) -> tuple:
    return (option.params, option.flops, option.teacher, str(option.spec))


def build_table(plan, teacher_score: float, scores: Mapping[tuple[str, Spec], float], examples: int,
                sizes: Mapping[tuple[str, Spec], tuple[int, int]], metric: Metric | str,
                errors: Mapping[tuple[str, Spec], float | None] | None = None, key: str = "",
                divergences: Mapping[tuple[str, Spec], float] | None = None, divergence: str | None = None) -> QualityTable:
    """Assemble a :class:`QualityTable` from measured scores and sizes (pure); ``divergences`` of kind ``divergence``."""
    metric = as_metric(metric)
    errors = errors or {}
    divergences = divergences or {}
    divergence = divergence if divergences else None
    options: dict[str, list[Option]] = {}
    for nb in plan.trainable:
        opts = [Option(nb.name, Spec(), nb.params, nb.flops, teacher_score, 0.0, teacher=True,
                       divergence=0.0 if divergence else None)]
        for (name, spec), score in scores.items():
            if name == nb.name:
                params, flops = sizes[name, spec]
                opts.append(Option(name, spec, params, flops, score, round(metric.drop(teacher_score, score), DROP_DECIMALS),
                                   error=errors.get((name, spec)), divergence=divergences.get((name, spec))))
        options[nb.name] = sorted(opts, key=_order)
    searched = {"params": sum(nb.params for nb in plan.trainable), "flops": sum(nb.flops for nb in plan.trainable)}
    teacher_size = {"params": int(plan.teacher["params"]), "flops": int(plan.teacher["flops"])}
    base = {k: teacher_size[k] - searched[k] for k in ("params", "flops")}
    return QualityTable(metric.name, examples, teacher_score, options, base, teacher_size, key, metric.threshold,
                        metric.higher_is_better, divergence)



@dataclass
class SearchResult:
    """One option per trainable neighbourhood, the rule that chose it, and what it predicts."""

    table: QualityTable
    choice: dict[str, Option]
    rule: dict
    notes: list[str] = field(default_factory=list)

    @property
    def additive_drop(self) -> float:
        """The chosen options' summed drops: the paper's additive estimate of the student's drop."""
        return round(sum(o.drop for o in self.choice.values()), DROP_DECIMALS)

    @property
    def prediction(self) -> str:
        """How :attr:`predicted_drop` is estimated: ``divergence`` (calibrated summed divergence) or ``additive``."""
        return "additive" if self.table.drop_per_divergence is None else "divergence"

    @property
    def predicted_drop(self) -> float:
        """The student's predicted drop: the table's drop per unit of divergence times the summed divergence when
        divergences were measured (see :attr:`QualityTable.drop_per_divergence`), else the summed drops."""
        rate = self.table.drop_per_divergence
        if rate is None:
            return self.additive_drop
        return round(rate * self.summed_divergence, DROP_DECIMALS)

    @property
    def predicted_accuracy(self) -> float:
        return self.table.predicted(self.predicted_drop)

    @property
    def summed_divergence(self) -> float | None:
        """The chosen options' summed divergence from the teacher's outputs (None when not measured)."""
        values = [o.divergence for o in self.choice.values()]
        return None if any(v is None for v in values) else round(sum(values), DROP_DECIMALS)

    def size(self, kind: str) -> int:
        return self.table.base[kind] + sum(o.size(kind) for o in self.choice.values())

    @property
    def teacher_parts(self) -> list[str]:
        return [name for name, o in self.choice.items() if o.teacher]

    def selection(self) -> dict[str, Spec]:
        """What ``ndc stitch`` replaces: the chosen spec per neighbourhood.

        A neighbourhood that keeps the teacher's part is written as the
        identity spec (stitch uses the teacher's part for an identity spec
        that was never trained), except when a ``width=1.0`` student *was*
        trained there: then the identity spec would name that student, so the
        neighbourhood is left out (stitch keeps the teacher's part for every
        neighbourhood a selection does not name).
        """
        out = {}
        for name, option in self.choice.items():
            if option.teacher and any(o.spec.is_identity for o in self.table.trained(name)):
                continue
            out[name] = option.spec
        return out


def selection_key(result: SearchResult) -> tuple:
    return tuple(sorted((name, o.label) for name, o in result.choice.items()))


def uniform_specs(table: QualityTable) -> list[Spec]:
    """Specs trained on every searched neighbourhood."""
    common: set[Spec] | None = None
    for name in table.options:
        specs = {o.spec for o in table.trained(name)}
        common = specs if common is None else common & specs
    return sorted(common or set(), key=lambda s: (s.width, -s.sparsity, str(s)))



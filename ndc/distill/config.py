"""What a distillation run is: its configuration, its candidates, and the keys of their artefacts.

A *candidate* is one (neighbourhood, spec) pair. Its artefacts live in
``jobs/<neighbourhood>/<spec>/`` (:mod:`ndc.distill.store`) and are keyed by
everything that made them (teacher, neighbourhood, spec, training
configuration, engine), so a finished candidate is skipped on a rerun, a
changed configuration redoes it, and a file that no longer verifies is redone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.training import check_compile
from ndc.workspace import sha256_json

SOURCES = ("cache", "recompute", "noise")
NOISE_KINDS = ("gaussian", "matched")
BN_STATS = ("auto", "batch", "frozen")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DistillConfig:
    """Training settings shared by every job of a run (the paper's appendix B.2 defaults where it has them)."""

    data: str | None = None  # data spec; None with source="noise" is fully data-free
    limit: int | None = None
    normalize: bool | tuple = True  # ndc.data.open_data(normalize=...): training statistics, none, or (mean, std)
    source: str = "cache"
    noise: str = "gaussian"  # with source="noise": plain N(0, 1), or per-channel matched moments
    calibration: int = 256  # examples used to measure per-channel moments for noise="matched"
    epochs: int = 10
    steps: int | None = None  # per job; overrides epochs
    batch_size: int = 128
    lr: float = 3e-3  # measured best of 1e-3, 3e-3 on ResNet-20, CREPE tiny and PESTO (docs/benchmarks.md)
    weight_decay: float = 0.0
    lookahead: int = 0
    alpha: tuple[float, ...] = ()
    init: str = "teacher"
    round_to: int = 1
    augment_passes: int = 0  # cache: extra augmented passes of the training set (0: the plain set only)
    val_size: int = 1000  # held-out examples (test split, or noise) for errors and early stopping
    patience: int = 3  # evaluations without improvement before a job stops early
    evals: int = 10  # held-out evaluations per job
    seed: int = 0
    bn_stats: str = "auto"  # batch: students' batch norms learn from batch statistics; frozen: keep the teacher's
    engine: str = "jobs"  # jobs: one unit per candidate; fused: candidates trained together (batch order differs)
    precision: str = "fp32"  # autocast of the students' forward passes: fp32 (none), bf16, fp16 (with loss scaling)
    compile: str = "none"  # torch.compile mode of every candidate's training step (ndc.training.compiled)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):  # (mean, std) lists, from the CLI or a JSON round trip
            object.__setattr__(self, "normalize", tuple(tuple(float(x) for x in v) for v in self.normalize))
        if self.source not in SOURCES:
            raise NdcError(f"unknown --source {self.source!r}; valid sources: {', '.join(SOURCES)}")
        if self.noise not in NOISE_KINDS:
            raise NdcError(f"unknown --noise {self.noise!r}; valid kinds: {', '.join(NOISE_KINDS)}")
        if self.source != "noise" and not self.data:
            raise NdcError(f"--source {self.source} needs --data SPEC; use --data-free to distil from Gaussian noise")
        if self.noise == "matched" and self.source == "noise" and not self.data:
            raise NdcError("--noise matched measures the teacher's activations on a few real examples: give --data SPEC "
                           "(with --limit or --calibration N); without data use --noise gaussian")
        for name in ("epochs", "batch_size", "val_size", "evals", "calibration"):
            if getattr(self, name) < 1:
                raise NdcError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise NdcError("--steps must be at least 1")
        for name in ("augment_passes", "seed", "patience"):
            if getattr(self, name) < 0:
                raise NdcError(f"--{name.replace('_', '-')} must be 0 or more")
        if self.round_to < 1:
            raise NdcError("--round-to must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise NdcError(f"--lr must be a positive number, not {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise NdcError(f"--weight-decay must be 0 or a positive number, not {self.weight_decay}")
        if not all(math.isfinite(a) and a >= 0 for a in self.alpha):
            raise NdcError(f"--alpha must be finite numbers, 0 or more, not {','.join(str(a) for a in self.alpha)}")
        if self.lookahead < 0:
            raise NdcError("--lookahead must be 0 or more")
        if self.alpha and len(self.alpha) not in (1, self.lookahead):
            raise NdcError(f"--alpha takes one weight or one per look-ahead step ({self.lookahead}), got {len(self.alpha)}")
        if self.init not in ("teacher", "random"):
            raise NdcError(f"unknown --init {self.init!r}; valid: teacher, random")
        if self.bn_stats not in BN_STATS:
            raise NdcError(f"unknown --bn-stats {self.bn_stats!r}; valid: {', '.join(BN_STATS)}")
        if self.precision not in PRECISIONS:
            raise NdcError(f"unknown --precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        check_compile(self.compile)
        if self.engine not in ("jobs", "fused"):
            raise NdcError(f"unknown --engine {self.engine!r}; valid: jobs, fused")

    @property
    def frozen_bn(self) -> bool:
        """Noise has other statistics than real activations: by default its students keep the teacher's batch-norm statistics."""
        return self.bn_stats == "frozen" or (self.bn_stats == "auto" and self.source == "noise")

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        """The inverse of ``asdict`` after a JSON or pickle round trip."""
        return cls(**{**d, "alpha": tuple(d.get("alpha", ()))})

    def alphas(self) -> list[float]:
        """α_j for j = 1..lookahead (eq. 5 of the paper); one value is repeated, the default is 1."""
        if not self.lookahead:
            return []
        if not self.alpha:
            return [1.0] * self.lookahead
        return list(self.alpha) * self.lookahead if len(self.alpha) == 1 else list(self.alpha)

    def key_fields(self) -> dict:
        """The settings that change a trained student (not where or how fast it runs); a setting that does not
        apply to this run (``noise`` and ``calibration`` without noise inputs, ``augment_passes`` with them, α
        without look-ahead) counts as its default, so giving it changes nothing."""
        d = asdict(self)
        d.pop("device")
        d.pop("compile")  # the same training, compiled
        d["alpha"] = self.alphas()
        d["bn_stats"] = "frozen" if self.frozen_bn else "batch"
        defaults = DistillConfig.__dataclass_fields__
        if self.source != "noise":
            d["noise"], d["calibration"] = defaults["noise"].default, defaults["calibration"].default
        elif self.noise != "matched":
            d["calibration"] = defaults["calibration"].default
        if self.source == "noise":
            d["augment_passes"] = defaults["augment_passes"].default
        return d

    def ignored(self) -> list[str]:
        """Options given that this run does not use (a warning, not an error: they change nothing)."""
        defaults = DistillConfig.__dataclass_fields__
        out = []
        if self.source != "noise" and self.noise != defaults["noise"].default:
            out.append("--noise applies to noise inputs (--data-free or --source noise)")
        if (self.source != "noise" or self.noise != "matched") and self.calibration != defaults["calibration"].default:
            out.append("--calibration applies to --noise matched")
        if self.source == "noise" and self.augment_passes:
            out.append("--augment-passes translates real images; noise inputs have none")
        if self.alpha and not self.lookahead:
            out.append("--alpha weighs look-ahead terms; it needs --lookahead")
        return out


@dataclass(frozen=True)
class Candidate:
    neighbourhood: str
    spec: Spec

    @property
    def folder(self) -> str:
        """Workspace-relative folder of this candidate's artefacts (see :class:`ndc.distill.store.JobStore`)."""
        from ndc.distill.store import JOBS_DIR, folder_name

        return f"{JOBS_DIR}/{folder_name(self.neighbourhood)}/{self.spec.slug()}"

    def label(self) -> str:
        return f"{self.neighbourhood} {self.spec}"


# How gated jobs train (ndc.distill.gates); a new rule retrains the gated candidates made under the old one.
# 2: open gates fixed at 1 after the gate phase, and hand-written attention gated per head.
GATES_RULE = 2


def job_key(teacher_sha: str, neighbourhood: dict, spec: Spec, config: DistillConfig) -> str:
    """Hash of everything that made a trained candidate."""
    return sha256_json({
        "teacher": teacher_sha,
        "neighbourhood": _identity(neighbourhood),
        "spec": str(spec),
        "config": config.key_fields(),
        "format": 2,
        **({"gates_rule": GATES_RULE} if spec.gates is not None else {}),
    })


def made_for(teacher_sha: str, neighbourhood: dict) -> str:
    """Hash of the teacher's weights and the neighbourhood (name, boundaries, nodes) a candidate was distilled from.

    Recorded in each candidate's ``metrics.json``; ``stitch`` and ``search``
    refuse a candidate whose value is not the workspace's now (the teacher's
    weights changed, or the model was partitioned another way).
    """
    return sha256_json({"teacher": teacher_sha, "neighbourhood": _identity(neighbourhood)})


def _identity(neighbourhood: dict) -> dict:
    """What makes a neighbourhood the same one: its name, boundaries and nodes (not its measured sizes), and what it
    computes (its graph's fingerprint; absent from plans made before it was recorded, whose keys stay as they were)."""
    out = {k: neighbourhood[k] for k in ("name", "input", "output", "nodes")}
    if neighbourhood.get("fingerprint"):
        out["fingerprint"] = neighbourhood["fingerprint"]
    return out


def expand_specs(widths: list[float], sparsities: list[float], specs: list[str]) -> list[Spec]:
    """The specs of a run: every width × every sparsity, plus explicit ``--spec`` strings, deduplicated in order."""
    out: list[Spec] = []
    if widths or sparsities:
        for w in widths or [1.0]:
            for s in sparsities or [0.0]:
                out.append(Spec(width=w, sparsity=s))
    out += [Spec.parse(s) for s in specs]
    if not out:
        raise NdcError("nothing to distil: give --width K[,K...], --sparsity S[,S...], --spec SPEC, --slimmable K[,K...] or --gates")
    seen, unique = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique

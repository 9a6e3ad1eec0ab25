"""Which trainer a job needs: a plain candidate, a slimmable job (several widths), or a gated job.

The engines call :func:`make_trainer` and drive whatever it returns through
the :class:`~ndc.distill.trainer.CandidateTrainer` interface; adding a kind of
job means adding a branch here and a trainer, not touching an engine.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ndc.distill.config import DistillConfig
from ndc.distill.trainer import CandidateTrainer
from ndc.ir import Spec


def make_trainer(part: fx.GraphModule, item, index: int, ahead: list[nn.Module], cfg: DistillConfig, total: int,
                 device: str) -> CandidateTrainer:
    """The trainer of unit item ``item`` (an :class:`~ndc.distill.engine.Item`) for teacher neighbourhood ``part``."""
    spec = Spec.parse(item.spec)
    if "members" in item.extra:
        from ndc.distill.slimmable import SlimmableTrainer

        members = [Spec.parse(s) for s in item.extra["members"]]
        return SlimmableTrainer.build(part, item.neighbourhood, index, members, item.key, ahead, cfg, total, device, item.seed)
    if spec.gates is not None:
        from ndc.distill.gates import GatedTrainer

        return GatedTrainer.build(part, item.neighbourhood, index, spec, item.key, ahead, cfg, total, device, item.seed)
    from ndc.passes.rewrite import make_student

    student = make_student(part, spec, init=cfg.init, round_to=cfg.round_to, seed=item.seed)
    return CandidateTrainer(item.neighbourhood, index, spec, item.key, student, ahead, cfg, total, device)

"""Slimmable jobs share the widths' parameters only for a first part of the job; then every width trains its own."""

from __future__ import annotations

import json
import math

import torch

from ndc.distill.config import DistillConfig
from tests.conftest import NoiseBatch, train_steps


def _trainer(partitioned, total: int):
    from ndc.distill.engine import Item
    from ndc.distill.kinds import make_trainer
    from ndc.distill.trainer import heldout_errors
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    part = load_teacher(Workspace(partitioned)).part("layer2.0")
    item = Item("layer2.0", "width=1.0,slim=teacher", "cd" * 32, 0.0,
                {"members": ["width=1.0,slim=teacher", "width=0.5,slim=teacher", "width=0.25,slim=teacher"]})
    t = make_trainer(part, item, 2, [], DistillConfig(data="digits", lr=3e-3), total, "cpu")
    t.start(heldout_errors([t], [NoiseBatch(part, 100)])[0])
    return t, part


def test_the_widths_share_then_each_trains_its_own_copy(partitioned):
    from ndc.distill import slimmable

    t, part = _trainer(partitioned, 40)
    assert t.private_from == math.ceil(slimmable.SHARED_FRACTION * 40) and 0 < t.private_from < 40
    train_steps(t, part, range(t.private_from))
    assert not t.model.shared  # unshared at the step it was due
    at_switch = {k: t.model.state_of(k) for k in t.trained}
    full = {n: v.clone() for n, v in t.model.full.state_dict().items()}
    for k in t.trained:  # each width's own copy starts as its slices of the shared parameters
        assert all(torch.equal(v, at_switch[k][n]) for n, v in zip(t.model.names, t.model.own[k]))
    train_steps(t, part, range(t.private_from, t.private_from + 3))
    assert all(torch.equal(v, full[n]) for n, v in t.model.full.state_dict().items())  # no longer trained
    for k in t.trained:
        after = t.model.state_of(k)
        assert any(not torch.equal(after[n], at_switch[k][n]) for n in t.model.names)
    assert all(p.grad is None for p in t.model.widths[0].parameters())  # width 1.0 stays the teacher's part


def test_a_job_resumed_before_the_widths_stop_sharing_continues_exactly(partitioned):
    a, part = _trainer(partitioned, 40)
    train_steps(a, part, range(a.private_from - 1))
    tensors, meta = a.state()
    b, _ = _trainer(partitioned, 40)
    b.load_state({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    assert b.model.shared
    for t in (a, b):
        train_steps(t, part, range(a.private_from - 1, a.private_from + 3))
    assert not a.model.shared and not b.model.shared
    for (n, v), (m, w) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert n == m and torch.allclose(v, w, atol=1e-6), n

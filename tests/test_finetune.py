"""End-to-end training: the KD loss, training from scratch, checkpoints and resume, budgets, pruned weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ndc.data import open_data
from ndc.errors import NdcError
from ndc.finetune import NoiseImages, TrainConfig, accuracy, train
from ndc.losses import kd_loss
from ndc.scoring import Metric
from ndc.workspace import Workspace


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    return open_data("digits", (1, 8, 8), limit=400)


def test_kd_loss_matches_the_documented_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    tau, lam = 2.5, 0.7
    soft = F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean")
    entropy = -(F.softmax(t / tau, 1) * F.log_softmax(t / tau, 1)).sum(1).mean()
    expected = tau**2 * (soft + entropy) + lam * F.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, tau, lam), expected, atol=1e-5)
    paper = (soft + entropy) + lam * F.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, tau, lam, tau_squared=False), paper, atol=1e-5)


def test_training_from_scratch_learns(digits):
    model = small_net()
    before = accuracy(model, digits)
    result = train(model, digits, TrainConfig(loss="ce", epochs=4, lr=0.05, batch_size=32, augment=False))
    assert result["best_accuracy"] > max(before + 0.3, 0.6)
    assert len(result["history"]) == 4 and all(h["seconds"] > 0 for h in result["history"])
    assert accuracy(model, digits) == pytest.approx(result["best_accuracy"])


def test_kd_from_a_teacher_raises_an_undertrained_student(digits):
    teacher = small_net()
    train(teacher, digits, TrainConfig(loss="ce", epochs=4, lr=0.05, batch_size=32, augment=False))
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    before = accuracy(student, digits)
    result = train(student, digits, TrainConfig(loss="kd", epochs=3, lr=0.05, batch_size=32, augment=False), teacher=teacher)
    assert result["best_accuracy"] > before + 0.2


class Stop(Exception):
    pass


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, digits):
    ws = Workspace(tmp_path / "ws")
    cfg = TrainConfig(loss="ce", epochs=3, lr=0.05, batch_size=32, augment=False)

    def die_after_first_epoch(event):
        if event.get("event") == "epoch" and event["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train(small_net(), digits, cfg, ws=ws, folder="run", log=die_after_first_epoch)
    assert ws.read_json("run/checkpoint.json")["epoch"] == 1
    events = []
    resumed = train(small_net(), digits, cfg, ws=ws, folder="run", log=events.append)
    assert events[0] == {"event": "resumed", "epoch": 1}
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    fresh = train(small_net(), digits, cfg)
    assert resumed["best_accuracy"] == pytest.approx(fresh["best_accuracy"], abs=1e-6)


def test_time_budget_stops_training(digits):
    result = train(small_net(), digits, TrainConfig(loss="ce", epochs=50, lr=0.05, time_budget=0.05))
    assert result["epochs"] < 50


def test_pruned_weights_stay_zero(digits):
    model = small_net()
    with torch.no_grad():
        w = model[1].weight
        w[w.abs() < w.abs().median()] = 0
    zeros = model[1].weight == 0
    train(model, digits, TrainConfig(loss="ce", epochs=1, lr=0.05))
    assert torch.all(model[1].weight[zeros] == 0)


def test_noise_inputs_for_data_free_kd(digits):
    noise = NoiseImages((1, 8, 8), 256, digits)
    x, y = next(noise.batches("train", 64, seed=1))
    assert x.shape == (64, 1, 8, 8) and abs(float(x.mean())) < 0.1
    x2, _ = next(noise.batches("train", 64, seed=1))
    assert torch.equal(x, x2)
    assert next(noise.batches("test", 32))[0].shape == (32, 1, 8, 8)
    with pytest.raises(NdcError, match="give --data"):
        next(NoiseImages((1, 8, 8)).batches("test"))


def test_bad_configurations():
    with pytest.raises(NdcError, match="unknown --loss"):
        TrainConfig(loss="hinge")
    for loss in ("kd", "mse", "bce"):
        with pytest.raises(NdcError, match=f"--loss {loss} needs a teacher"):
            train(small_net(), None, TrainConfig(loss=loss))
    with pytest.raises(NdcError, match="--metric agreement needs a teacher"):
        train(small_net(), None, TrainConfig(loss="ce", metric=Metric("agreement")))
    for bad in ({"lr": math.nan}, {"lr": math.inf}, {"tau": math.nan}, {"lr": -1.0}, {"tau": 0.0}):
        (name, value), = bad.items()
        with pytest.raises(NdcError, match=f"^--{name} must be a positive finite number, not {value}$"):
            TrainConfig(**bad)
    with pytest.raises(NdcError, match="--lambda"):
        TrainConfig(lam=math.nan)
    with pytest.raises(NdcError, match="^--patience must be 0 or more$"):
        TrainConfig(patience=-1)
    with pytest.raises(NdcError, match="--time-budget"):
        TrainConfig(time_budget=math.nan)


def test_non_finite_loss_is_one_clear_error(digits):
    with pytest.raises(NdcError, match="loss became .* try a lower --lr"):
        train(small_net(), digits, TrainConfig(loss="ce", epochs=2, lr=1e12, weight_decay=0))
    assert math.isfinite(1.0)


def test_end_to_end_pruning_reaches_the_target_sparsity(digits):
    from ndc.passes.rewrite import Pruner

    model = small_net()
    pruner = Pruner(model, 0.6)
    result = train(model, digits, TrainConfig(loss="ce", epochs=4, lr=0.05, batch_size=32, augment=False),
                   pruner=pruner, sparsity=0.6)
    for name, achieved in pruner.sparsity().items():
        assert achieved == pytest.approx(0.6, abs=0.02), name
    assert result["best_epoch"] >= 2  # chosen only once the ramp reached the target
    assert result["best_accuracy"] > 0.5


def test_frozen_batch_norms_keep_their_statistics(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    before = model[2].running_mean.clone()
    noise = NoiseImages((1, 8, 8), 128, digits)
    train(model, noise, TrainConfig(loss="ce", epochs=1, lr=0.05, batch_size=32, augment=False, freeze_bn=True))
    assert torch.equal(model[2].running_mean, before)
    train(model, noise, TrainConfig(loss="ce", epochs=1, lr=0.05, batch_size=32, augment=False))
    assert not torch.equal(model[2].running_mean, before)


def test_batch_norms_at_momentum_zero_follow_the_weights_they_train(digits):
    """Converted models carry momentum 0: trained on batch statistics, their running statistics must still move."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32, momentum=0.0), nn.ReLU(), nn.Linear(32, 10))
    before = model[2].running_mean.clone()
    result = train(model, digits, TrainConfig(loss="ce", epochs=2, lr=0.05, batch_size=32, augment=False))
    assert not torch.equal(model[2].running_mean, before)
    assert result["best_accuracy"] > 0.5  # measured in eval mode, on statistics that describe the trained weights


def test_fine_tuning_that_only_hurts_returns_the_model_it_was_given(tmp_path, digits):
    model = small_net()
    train(model, digits, TrainConfig(loss="ce", epochs=4, lr=0.05, batch_size=32, augment=False))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    good = accuracy(model, digits)
    misleading = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # an untrained "teacher": its targets are noise
    cfg = TrainConfig(loss="kd", epochs=2, lr=0.5, lam=0.0, batch_size=32, augment=False, keep_initial=True)
    ws = Workspace(tmp_path / "ws")
    result = train(model, digits, cfg, teacher=misleading, ws=ws, folder="ft")
    assert result["history"][-1]["accuracy"] < good - 0.2  # training did hurt
    assert result["best_epoch"] == 0 and result["best_accuracy"] == pytest.approx(good)
    assert result["initial_accuracy"] == pytest.approx(good)
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    # a rerun from the same starting weights resumes the finished run and still hands them back
    other = small_net()
    other.load_state_dict(start)
    again = train(other, digits, cfg, teacher=misleading, ws=ws, folder="ft")
    assert again["initial_accuracy"] == pytest.approx(good)  # kept in the checkpoint
    assert again["best_epoch"] == 0 and all(torch.equal(v, start[k]) for k, v in other.state_dict().items())


def test_compiled_training_matches_eager_and_resumes_either_way(tmp_path, digits):
    teacher = small_net()
    train(teacher, digits, TrainConfig(loss="ce", epochs=2, lr=0.05, batch_size=32, augment=False))
    runs = {}
    for mode in ("none", "default"):
        student = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
        runs[mode] = train(student, digits, TrainConfig(loss="kd", epochs=2, lr=0.05, batch_size=32, compile=mode), teacher=teacher)
    assert [h["accuracy"] for h in runs["default"]["history"]] == pytest.approx([h["accuracy"] for h in runs["none"]["history"]],
                                                                                abs=0.01)
    ws = Workspace(tmp_path / "ws")
    first = train(small_net(), digits, TrainConfig(loss="ce", epochs=1, lr=0.05), ws=ws, folder="run")
    again = train(small_net(), digits, TrainConfig(loss="ce", epochs=1, lr=0.05, compile="default"), ws=ws, folder="run")
    assert again["history"] == first["history"]  # the eager run's checkpoint was taken up, not trained again


def test_a_compiler_failure_is_one_line_that_says_what_to_do(digits, monkeypatch):
    import torch._dynamo.exc

    def broken(fn, **_):
        def run(*args, **kwargs):
            raise torch._dynamo.exc.Unsupported("no C++ compiler\nfound")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(NdcError, match=r"^--compile default: torch.compile failed: no C\+\+ compiler found; try without --compile$"):
        train(small_net(), digits, TrainConfig(loss="ce", epochs=1, compile="default"))
    with pytest.raises(NdcError, match="unknown --compile 'fast'"):
        TrainConfig(compile="fast")

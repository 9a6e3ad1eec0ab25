"""End-to-end training: fine-tuning the stitched student, and the baselines it is measured against.

One loop serves three uses, so that every comparison is like for like:

* ``ndc finetune``: knowledge distillation of the stitched student from the
  teacher (the paper's eq. 3, learning rate 1e-2 and τ = 2.5 from its appendix);
* ``ndc kd``: the same student architecture trained from scratch end to end,
  by KD (``loss="kd"``) or by cross entropy alone (``loss="ce"``);
* training a teacher from scratch (``loss="ce"`` without a teacher), used by
  ``ndc demo`` and the benchmarks.

The losses (``kd``, ``ce``, ``mse``, ``bce``, one per kind of head) are
defined in :mod:`ndc.losses`; the per-epoch score (accuracy by default, any
:class:`~ndc.scoring.Metric`) comes from :func:`ndc.scoring.score`.

Training uses SGD with Nesterov momentum 0.9 (or AdamW, ``optimizer``; the
stages choose AdamW for transformers), a cosine learning-rate schedule over the
planned epochs, and random translations of up to 4 pixels. After every epoch
the test-split score and the training wall time (evaluation excluded) are
logged (time-to-accuracy curves),
a checkpoint is written atomically (model, optimizer, best weights and the
run's state in one file), and a killed run resumes from it, but only a run
of the same configuration, starting model, teacher and data. Early stopping watches that score with ``patience``
epochs; the best epoch's weights are kept (with ``keep_initial``, the
starting weights count as epoch 0, so fine-tuning that only hurts returns the
model it was given). Weights that were exactly zero
when training started (pruned students) stay zero. ``freeze_bn`` keeps every
batch norm's running statistics (data-free fine-tuning: training on noise in
train mode would replace the statistics of real data with those of noise).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from itertools import islice

import torch
import torch.nn as nn

from ndc.errors import NdcError
from ndc.losses import LOSSES, Loss
from ndc.scoring import Metric, score
from ndc.training import (DEFAULT_LR, BestWeights, SparsityRamp, check_compile, compiled, cosine, make_optimizer,
                          mark_step, set_lr, track_running_stats)
from ndc.workspace import Workspace, read_json, sha256_json


@dataclass(frozen=True)
class TrainConfig:
    loss: str = "kd"
    epochs: int = 10
    lr: float | None = None  # None: the optimizer's fine-tuning default (ndc.training.DEFAULT_LR: 1e-2 SGD, 1e-4 AdamW)
    optimizer: str = "sgd"  # sgd (Nesterov momentum) or adamw; the stages choose with ndc.training.choose_optimizer
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    tau: float = 2.5
    lam: float = 1.0
    tau_squared: bool = True
    augment: bool = True
    patience: int | None = None  # epochs without a better accuracy before stopping; None: never
    time_budget: float | None = None  # seconds of training (resumed runs count earlier time)
    seed: int = 0
    eval_batches: int | None = None  # limit the per-epoch evaluation (None: the whole test split)
    freeze_bn: bool = False  # keep batch norms' running statistics (data-free fine-tuning: noise has other statistics)
    keep_initial: bool = False  # the starting weights compete for best (fine-tuning never returns a worse model)
    metric: Metric = field(default_factory=lambda: Metric("accuracy"))  # the per-epoch score, which picks the best epoch
    probabilities: bool = False  # the model's outputs are probabilities (it ends in a sigmoid): for --loss bce
    labels: bool = True  # the loss's label term uses the data's labels (False: the teacher's outputs alone)
    compile: str = "none"  # torch.compile mode of the training step (ndc.training.compiled); not part of the checkpoint key

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise NdcError(f"unknown --loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.epochs < 1:
            raise NdcError("--epochs must be at least 1")
        if self.seed < 0:
            raise NdcError("--seed must be 0 or more")
        if self.patience is not None and self.patience < 0:
            raise NdcError("--patience must be 0 or more")
        # `not x > 0` (rather than `x <= 0`) also refuses NaN.
        if self.optimizer not in ("sgd", "adamw"):
            raise NdcError(f"unknown optimizer {self.optimizer!r}: sgd or adamw")
        for name in ("lr", "tau"):
            value = getattr(self, name)
            if name == "lr" and value is None:
                continue
            if not (math.isfinite(value) and value > 0):
                raise NdcError(f"--{name} must be a positive finite number, not {value}")
        if not math.isfinite(self.lam) or self.lam < 0:
            raise NdcError("--lambda must be a finite number, 0 or more")
        if self.time_budget is not None and not self.time_budget > 0:
            raise NdcError("--time-budget must be positive")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise NdcError(f"--{name.replace('_', '-')} must be 0 or a positive number, not {value}")
        if self.batch_size < 1:
            raise NdcError("--batch-size must be at least 1")
        check_compile(self.compile)

    def loss_fn(self) -> Loss:
        return Loss(self.loss, self.tau, self.lam, self.tau_squared, self.probabilities, self.labels)


def accuracy(model: nn.Module, data, split: str = "test", batch_size: int = 256, max_batches: int | None = None) -> float:
    """Accuracy of ``model`` on ``data``'s ``split`` (the first ``max_batches`` batches), through :func:`ndc.scoring.score`."""
    return epoch_score(model, data, Metric("accuracy"), None, split, batch_size, max_batches)


def epoch_score(model: nn.Module, data, metric: Metric, teacher: nn.Module | None, split: str = "test",
                batch_size: int = 256, max_batches: int | None = None) -> float:
    """``metric`` of ``model`` on ``data``'s ``split`` (the first ``max_batches`` batches)."""
    return score(model, islice(data.batches(split, batch_size), max_batches), metric, teacher)


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks of weights that are pruned (exactly zero in a matrix that is at least 1% zeros)."""
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            zeros = p.detach() == 0
            if zeros.float().mean() >= 0.01:
                masks[name] = ~zeros
    return masks


def module_digest(model: nn.Module) -> str:
    """Hash of a model's architecture (its graph or repr) and every tensor of its state: what it *is*."""
    h = hashlib.sha256()
    graph = getattr(model, "graph", None)
    h.update(str(graph if graph is not None else model).encode())
    for name, value in model.state_dict().items():
        h.update(name.encode())
        t = value.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_identity(data) -> dict:
    """What a data source's examples are: its spec, the identity of its files, limit and normalisation."""
    real = getattr(data, "real", None)
    if real is not None:  # noise inputs, measured on real data
        return {"noise": list(data.shape), "examples": data.train_size, "real": data_identity(real)}
    return {"spec": getattr(data, "name", None), "files": getattr(data, "fingerprint", None), "limit": getattr(data, "limit", None),
            "mean": getattr(data, "mean", None), "std": getattr(data, "std", None), "shape": list(getattr(data, "shape", ())),
            "train": getattr(data, "train_size", None), "test": getattr(data, "test_size", None)}


class Checkpoint:
    """One file, ``<folder>/checkpoint.safetensors``: model, optimiser and best weights with the run's state as metadata.

    One atomic write holds all of it, so the best weights can never belong
    to another run than the state that describes them (a killed ``--restart``
    used to leave exactly that mismatch). ``checkpoint.json`` beside it is a
    copy of the state for people and tools; nothing reads it back.
    """

    def __init__(self, ws: Workspace, folder: str):
        self.ws, self.folder = ws, folder
        self.path = f"{folder}/checkpoint.safetensors"

    def load(self, key: str) -> tuple[dict, dict[str, torch.Tensor]] | str | None:
        """``(state, tensors)`` for ``key``; the reason it cannot be used when it is stale or unreadable; None when absent."""
        path = self.ws.path(self.path)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                state = json.loads(f.metadata()["ndc"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:
            return "it is unreadable"
        if state.get("key") != key:
            return "it was made from another teacher, student, data set or configuration"
        return state, tensors

    def save(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.ws.save_tensors(self.path, tensors, metadata={"ndc": json.dumps(state)})
        self.ws.write_json(f"{self.folder}/checkpoint.json", state)

    def set_aside(self) -> str:
        """Move a checkpoint that must not be resumed out of the way (kept for inspection, never read)."""
        target = f"{self.folder}/checkpoint.stale.safetensors"
        os.replace(self.ws.path(self.path), self.ws.path(target))
        with contextlib.suppress(FileNotFoundError):
            self.ws.path(f"{self.folder}/checkpoint.json").unlink()
        return target

    def discard(self) -> None:
        for name in ("checkpoint.safetensors", "checkpoint.json"):
            with contextlib.suppress(FileNotFoundError):
                self.ws.path(f"{self.folder}/{name}").unlink()


def train(model: nn.Module, data, cfg: TrainConfig, *, teacher: nn.Module | None = None, ws: Workspace | None = None,
          folder: str | None = None, log: Callable[[dict], None] | None = None, resume: bool = True,
          pruner=None, sparsity: float = 0.0, made_from: dict | None = None, device: str = "cpu") -> dict:
    """Train ``model`` end to end; checkpoints in ``ws/folder`` and resumes from them. Returns the history and best accuracy.

    The checkpoint's key covers the configuration, the starting model's
    architecture and weights, the teacher's, the data's identity and
    ``made_from`` (what the caller built the model from): a checkpoint of any
    other run is set aside (``log`` hears why) and training starts fresh.
    ``resume=False`` discards an earlier checkpoint first.

    With ``pruner`` (a :class:`ndc.passes.rewrite.Pruner` over ``model``), magnitude pruning ramps to
    ``sparsity`` over the first half of training (Zhu & Gupta), as neighbourhood jobs do
    (:class:`ndc.training.SparsityRamp`); the end-to-end baseline of the sparsification experiments.

    On a GPU the data set is held in device memory when it fits
    (:mod:`ndc.devicedata`) and the loop reads nothing back to the host until
    the end of an epoch.
    """
    from ndc.devicedata import on_device, synchronize

    loss_fn = cfg.loss_fn()
    if teacher is None and (loss_fn.needs_teacher or cfg.metric.needs_teacher):
        what = f"--loss {cfg.loss}" if loss_fn.needs_teacher else f"--metric {cfg.metric.name}"
        raise NdcError(f"{what} needs a teacher")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NdcError("the model has no trainable parameters: there is nothing to train")
    model.to(device)
    if not cfg.freeze_bn:
        track_running_stats(model)
    if teacher is not None:
        teacher.eval().to(device)  # runs under no_grad below; its parameters' flags are the caller's business
    if cfg.lr is None:
        cfg = replace(cfg, lr=DEFAULT_LR[cfg.optimizer, "finetune"])
    settings = asdict(cfg)
    settings.pop("compile")  # the same training, compiled: a checkpoint resumes either way
    if cfg.optimizer == "sgd":
        settings.pop("optimizer")  # checkpoints made before AdamW was an option keep their keys
    key = sha256_json({"config": settings, "model": module_digest(model),
                       "teacher": module_digest(teacher) if teacher is not None else None,
                       "data": data_identity(data), "made_from": made_from or {}, "format": 2})
    data = on_device(data, device)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.momentum, cfg.weight_decay)
    masks = _zero_masks(model)
    named = dict(model.named_parameters())
    state = {"epoch": 0, "seconds": 0.0, "history": [], "best_accuracy": None, "best_epoch": 0, "bad": 0, "key": key}
    checkpoint = Checkpoint(ws, folder) if ws is not None and folder else None
    lower = not cfg.metric.higher_is_better
    best = BestWeights(model, None, cfg.patience, lower_is_better=lower)
    if checkpoint is not None and not resume:
        checkpoint.discard()
    elif checkpoint is not None:
        found = checkpoint.load(key)
        if isinstance(found, str):
            aside = checkpoint.set_aside()
            if log:
                log({"event": "stale", "why": found, "moved_to": aside})
        elif found is not None and found[0].get("epoch", 0) > 0:
            state, tensors = found
            _restore(model, optimizer, tensors)
            best.state = {k[len("best."):]: v.to(device) for k, v in tensors.items() if k.startswith("best.")} or None
            if state["best_accuracy"] is not None:
                best.score = state["best_accuracy"]
            best.bad = state["bad"]
            for entry in state["history"]:  # checkpoints written before entries had "score"
                entry.setdefault("score", entry.get("accuracy"))
            if log:
                log({"event": "resumed", "epoch": state["epoch"]})
    steps_per_epoch = max(1, math.ceil(data.train_size / cfg.batch_size))
    total_steps = cfg.epochs * steps_per_epoch
    ramp = SparsityRamp(pruner, sparsity, total_steps) if pruner is not None else None
    if state["epoch"] == 0 and cfg.keep_initial:
        initial = epoch_score(model, data, cfg.metric, teacher, max_batches=cfg.eval_batches)
        state.update(best_accuracy=initial, best_epoch=0, initial_accuracy=initial)
        best = BestWeights(model, initial, cfg.patience, lower_is_better=lower)

    def forward(x, y):
        """The step's forward: the student's loss against the teacher's outputs (one graph with --compile)."""
        out = model(x)
        with torch.no_grad():
            t = teacher(x) if loss_fn.needs_teacher else None
        return loss_fn(out, t, y)

    forward = compiled(forward, cfg.compile)
    start = time.perf_counter() - state["seconds"]
    out_of_time = False
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if cfg.freeze_bn else []
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        for m in norms:
            m.eval()
        loss_sum, batches = torch.zeros((), device=device), 0
        for k, (x, y) in enumerate(data.batches("train", cfg.batch_size, shuffle=True, augment=cfg.augment,
                                                seed=cfg.seed, epoch=epoch, drop_last=data.train_size > cfg.batch_size)):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True) if y is not None else None
            step = epoch * steps_per_epoch + k
            set_lr(optimizer, cfg.lr * cosine(step, total_steps))
            mark_step(cfg.compile)
            loss = forward(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ramp is not None:
                ramp.after_step(step + 1)
            if masks:
                with torch.no_grad():
                    for name, mask in masks.items():
                        named[name].mul_(mask)
            loss_sum += loss.detach()
            batches += 1
            if cfg.time_budget is not None and time.perf_counter() - start > cfg.time_budget:
                out_of_time = True
                break
        train_loss = float(loss_sum) / max(batches, 1)  # the epoch's one host synchronisation
        if not math.isfinite(train_loss):
            raise NdcError(f"the training loss became {train_loss} in epoch {epoch + 1}; try a lower --lr")
        synchronize(device)
        state["seconds"] = time.perf_counter() - start
        evaluated = time.perf_counter()
        acc = epoch_score(model, data, cfg.metric, teacher, max_batches=cfg.eval_batches)
        start += time.perf_counter() - evaluated  # the clock counts training, not the per-epoch evaluation
        state["epoch"] = epoch + 1
        entry = {"epoch": epoch + 1, "seconds": state["seconds"], "train_loss": train_loss, "score": acc,
                 **({"accuracy": acc} if cfg.metric.kind == "accuracy" else {})}
        state["history"].append(entry)
        if ramp is None or ramp.ramped((epoch + 1) * steps_per_epoch):  # a denser model is not a valid best
            if best.offer(acc):
                state.update(best_accuracy=acc, best_epoch=epoch + 1)
        else:
            best.bad += 1
        state["bad"] = best.bad
        if checkpoint is not None:
            tensors = _snapshot(model, optimizer)
            tensors.update({f"best.{k}": v for k, v in (best.state or {}).items()})
            checkpoint.save(state, tensors)
        if log:
            log({"event": "epoch", **entry})
        if out_of_time or best.exhausted:
            break
    best.restore()
    if ramp is not None:
        ramp.finish()
    model.eval()
    return {"history": state["history"], "metric": cfg.metric.name, "best_accuracy": state["best_accuracy"],
            "best_epoch": state["best_epoch"],
            "initial_accuracy": state.get("initial_accuracy"), "seconds": state["seconds"], "epochs": state["epoch"]}


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, group_state in optimizer.state_dict()["state"].items():
        for name, value in group_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{i}.{name}"] = value
    return tensors


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    device = next(model.parameters()).device
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value.to(device)
    optimizer.load_state_dict(state)


class NoiseImages:
    """A data source of Gaussian-noise training inputs (data-free KD); evaluation uses ``real`` when given.

    Labels of noise are meaningless, so train with ``lam=0`` (soft teacher targets only). ``inputs``
    (the plan's :class:`~ndc.passes.inputs.InputSpec`) makes the noise random token ids for a language model.
    """

    def __init__(self, shape, examples: int = 10_000, real=None, inputs=None):
        from ndc.passes.inputs import FLOAT

        self.shape, self.train_size, self.real = tuple(shape), examples, real
        self.inputs = inputs or FLOAT
        self.test_size = real.test_size if real is not None else 0

    def batches(self, split: str = "train", batch_size: int = 128, *, shuffle: bool = False, augment: bool = False,
                seed: int = 0, epoch: int = 0, drop_last: bool = False, **_):
        if split != "train":
            if self.real is None:
                raise NdcError("data-free training has no test data to measure accuracy on; give --data too")
            yield from self.real.batches(split, batch_size)
            return
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        for start in range(0, self.train_size, batch_size):
            n = min(batch_size, self.train_size - start)
            if drop_last and n < batch_size:
                break
            yield self.inputs.sample((n, *self.shape), gen), torch.zeros(n, dtype=torch.long)


def read_history(ws: Workspace, folder: str) -> list[dict]:
    """The per-epoch history of the run checkpointed in ``folder`` (empty when there is none)."""
    path = ws.path(f"{folder}/checkpoint.json")
    return read_json(path).get("history", []) if path.is_file() else []

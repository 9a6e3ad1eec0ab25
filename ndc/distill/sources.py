"""Where a job's inputs come from: the activation cache, recomputation, or noise.

Every source gives a job batches ``(a, targets)``: ``a`` is the teacher's
activation at the neighbourhood's input boundary, ``targets[0]`` the teacher
neighbourhood's output on ``a`` and ``targets[j]`` the output ``j``
neighbourhoods further on (the look-ahead targets). The teacher always runs in
eval mode without gradients.

* ``cache``: one teacher pass over the training set writes every boundary the
  run needs to memory-mapped fp16 arrays under ``cache/<key>/``, streaming
  batch by batch; ``meta.json`` is written last, so a killed pass is redone and
  never read half-written. Augmentation and a cache: the cache holds the plain
  training set plus ``augment_passes`` randomly translated copies of it (each
  copy drawn with its own seed); jobs sample from all of them. With no extra
  passes there is no augmentation, which is what the paper does for
  neighbourhood distillation.
* ``recompute``: the teacher's prefix runs on every batch (fresh augmentation
  every epoch when ``augment_passes`` > 0, no disk).
* ``noise``: Gaussian inputs at the neighbourhood's input (the paper's section
  6): N(0, 1), or ``matched``, N(μ_c, σ_c²) per channel with the moments the
  teacher's activations have at that boundary on a small calibration batch of
  real data (``calibration`` examples of ``--data``). Jobs are trained and
  early-stopped on noise alone: held-out inputs are fresh noise.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ndc.chain import run_parts
from ndc.errors import NdcError
from ndc.workspace import Workspace, read_json, sha256_json, write_json_atomic

CACHE_DIR = "cache"
DISK_MARGIN = 512 * 2**20  # keep this much disk free beside a cache
NOISE_EPOCH = 10_000  # examples per "epoch" of noise when --limit does not say


def feature_channels(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Axes that index channels of a batched activation: dim 1 for (B, C, ...) maps, the last for (B, N, C) tokens."""
    if len(shape) == 3:
        return (2,)
    return (1,) if len(shape) >= 2 else ()


# --------------------------------------------------------------------- teacher


class TeacherChain:
    """The teacher as its sequence of neighbourhoods, run in eval mode without gradients.

    Parts are extracted on first use, so a job that needs only its look-ahead
    parts never copies the rest of the teacher.
    """

    def __init__(self, teacher, device: str = "cpu"):
        self.teacher, self.device = teacher, device
        self.names = teacher.plan.names
        self._parts: dict[int, nn.Module] = {}

    def part(self, k: int) -> nn.Module:
        if k not in self._parts:
            self._parts[k] = self.teacher.part(self.names[k]).eval().requires_grad_(False).to(self.device)
        return self._parts[k]

    def run(self, x: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
        """Outputs of parts ``start .. stop-1`` applied in turn to ``x``; neither ``x`` nor any output is changed by a
        later part's in-place operation (:func:`ndc.chain.run_parts`)."""
        return run_parts([self.part(k) for k in range(start, stop)], x, keep=True)[1:]


# ----------------------------------------------------------------------- cache


@dataclass
class CacheLayout:
    """Which boundaries a run needs, with their per-example shapes."""

    boundaries: dict[str, list[int]]  # boundary node name -> per-example shape

    def bytes_per_example(self) -> int:
        return 2 * sum(math.prod(s) for s in self.boundaries.values())


def cache_key(teacher_sha: str, data, layout: CacheLayout, augment_passes: int, val_size: int, seed: int) -> str:
    return sha256_json({
        "teacher": teacher_sha,
        "data": data.name,
        "limit": data.limit,
        "mean": data.mean,
        "std": data.std,
        "shape": list(data.shape),
        "boundaries": layout.boundaries,
        "augment_passes": augment_passes,
        "val_size": val_size,
        "seed": seed,
        "format": 1,
    })[:16]


def cache_size(data, layout: CacheLayout, augment_passes: int, val_size: int) -> int:
    n = data.train_size * (1 + augment_passes) + min(val_size, data.test_size)
    return n * layout.bytes_per_example()


def free_bytes(ws: Workspace) -> int:
    ws.ensure()
    return shutil.disk_usage(ws.root).free


def build_cache(ws: Workspace, chain: TeacherChain, boundary_of_part: list[str], input_name: str, data,
                layout: CacheLayout, key: str, augment_passes: int, val_size: int, seed: int,
                batch_size: int = 256, progress=None) -> Path:
    """Run the teacher once over the data and stream the needed boundaries to fp16 memmaps.

    ``boundary_of_part[k]`` is the boundary node part ``k`` outputs; the input
    boundary is the data itself. Returns the cache folder; reuses a complete one.
    """
    folder = ws.path(f"{CACHE_DIR}/{key}")
    if (folder / "meta.json").is_file():
        return folder
    size = cache_size(data, layout, augment_passes, val_size)
    free = free_bytes(ws)
    if size + DISK_MARGIN > free:
        raise NdcError(f"the activation cache needs {size / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free "
                       f"under {ws.root}; use --source recompute, a smaller --limit, or free some space")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.f16"):
        stale.unlink()
    n_train = data.train_size * (1 + augment_passes)
    n_test = min(val_size, data.test_size)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for name, shape in layout.boundaries.items():
            arrays[split, name] = np.lib.format.open_memmap(folder / f"{name}.{split}.f16.npy", mode="w+",
                                                            dtype=np.float16, shape=(n, *shape))
    needed = set(layout.boundaries)
    last_part = max((k for k, b in enumerate(boundary_of_part) if b in needed), default=-1) + 1
    passes = [("train", p) for p in range(1 + augment_passes)] + [("test", 0)]
    done_examples, total = 0, n_train + n_test
    for split, p in passes:
        offset = p * data.train_size if split == "train" else 0
        limit = data.train_size if split == "train" else n_test
        written = 0
        batches = data.batches(split, batch_size, augment=p > 0, seed=seed + p, epoch=p)
        for x, _ in batches:
            x = x[: limit - written]
            if not len(x):
                break
            rows = slice(offset + written, offset + written + len(x))
            if input_name in needed:
                arrays[split, input_name][rows] = x.half().numpy()
            outs = chain.run(x.to(chain.device), 0, last_part)
            for k, out in enumerate(outs):
                if boundary_of_part[k] in needed:
                    arrays[split, boundary_of_part[k]][rows] = out.half().cpu().numpy()
            written += len(x)
            done_examples += len(x)
            if progress:
                progress(done_examples, total)
            if written >= limit:
                break
    for arr in arrays.values():
        arr.flush()
    del arrays
    write_json_atomic(folder / "meta.json", {"key": key, "train": n_train, "test": n_test, "boundaries": layout.boundaries,
                                             "augment_passes": augment_passes, "dtype": "float16", "bytes": size})
    return folder


class CachedArrays:
    """Read-only memory maps of one cache folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise NdcError(f"activation cache {self.folder} is incomplete; rerun ndc distill to rebuild it")
        self.meta = read_json(meta_path)
        self._maps: dict = {}

    def get(self, name: str, split: str) -> np.ndarray:
        if (name, split) not in self._maps:
            path = self.folder / f"{name}.{split}.f16.npy"
            try:
                self._maps[name, split] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise NdcError(f"activation cache file {path} is unreadable ({e}); delete {self.folder} and rerun") from None
        return self._maps[name, split]


# ----------------------------------------------------------------------- feeds


class Feed:
    """Batches of (input, targets) for one job."""

    steps_per_epoch: int

    def train(self, epoch: int) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        raise NotImplementedError

    def heldout(self) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        raise NotImplementedError


def _to_float(a: np.ndarray, device: str) -> torch.Tensor:
    """fp16 rows of a memory map -> a float32 tensor (torch converts half precision ~10x faster than numpy)."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # a slice of the read-only map: copy, so torch owns writable memory
        a = a.copy()
    return torch.from_numpy(a).to(device=device, dtype=torch.float32)


class CacheFeed(Feed):
    def __init__(self, arrays: CachedArrays, inp: str, targets: list[str], batch_size: int, seed: int, device: str):
        self.arrays, self.inp, self.targets = arrays, inp, targets
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.n = arrays.meta["train"]
        self.steps_per_epoch = max(1, math.ceil(self.n / batch_size))

    def train(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        for start in range(0, self.n, self.batch_size):
            # Sorted indices read the memmap front to back; the batch order stays random.
            idx = np.sort(order[start:start + self.batch_size])
            yield self._batch(idx, "train")

    def heldout(self):
        n = self.arrays.meta["test"]
        for start in range(0, n, 256):
            yield self._batch(slice(start, min(start + 256, n)), "test")

    def _batch(self, idx, split: str):
        a = _to_float(self.arrays.get(self.inp, split)[idx], self.device)
        return a, [_to_float(self.arrays.get(t, split)[idx], self.device) for t in self.targets]


class RecomputeFeed(Feed):
    """The teacher's prefix runs on every batch of real data."""

    def __init__(self, chain: TeacherChain, index: int, lookahead: int, data, batch_size: int, seed: int,
                 augment: bool, val_size: int):
        self.chain, self.index, self.lookahead = chain, index, lookahead
        self.data, self.batch_size, self.seed, self.augment = data, batch_size, seed, augment
        self.val_size = min(val_size, data.test_size)
        self.steps_per_epoch = max(1, math.ceil(data.train_size / batch_size))

    def _split(self, x: torch.Tensor):
        x = x.to(self.chain.device)
        prefix = self.chain.run(x, 0, self.index)
        a = prefix[-1] if prefix else x
        return a, self.chain.run(a, self.index, self.index + 1 + self.lookahead)

    def train(self, epoch: int):
        for x, _ in self.data.batches("train", self.batch_size, shuffle=True, augment=self.augment,
                                      seed=self.seed, epoch=epoch):
            yield self._split(x)

    def heldout(self):
        seen = 0
        for x, _ in self.data.batches("test", 256):
            x = x[: self.val_size - seen]
            if not len(x):
                return
            seen += len(x)
            yield self._split(x)


class NoiseFeed(Feed):
    """Gaussian inputs at the neighbourhood's input; targets from the teacher."""

    def __init__(self, chain: TeacherChain, index: int, lookahead: int, shape: list[int], batch_size: int, seed: int,
                 examples: int, moments: tuple[list[float], list[float]] | None, val_size: int):
        self.chain, self.index, self.lookahead = chain, index, lookahead
        self.shape, self.batch_size, self.seed = list(shape), batch_size, seed
        self.examples = examples
        self.steps_per_epoch = max(1, math.ceil(examples / batch_size))
        self.moments = None
        if moments is not None:
            mean, std = (torch.tensor(m, dtype=torch.float32) for m in moments)
            view = [1] * (len(shape) + 1)
            axis = feature_channels((1, *shape))
            if axis:
                view[axis[0]] = -1
            self.moments = (mean.view(view).to(chain.device), std.view(view).to(chain.device))
        self.val_size = val_size

    def _sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        a = torch.randn((n, *self.shape), generator=gen).to(self.chain.device)
        if self.moments is not None:
            a = a * self.moments[1] + self.moments[0]
        return a

    def _pair(self, a: torch.Tensor):
        return a, self.chain.run(a, self.index, self.index + 1 + self.lookahead)

    def train(self, epoch: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        for start in range(0, self.examples, self.batch_size):
            yield self._pair(self._sample(min(self.batch_size, self.examples - start), gen))

    def heldout(self):
        gen = torch.Generator().manual_seed(10**9 + self.seed)
        for start in range(0, self.val_size, 256):
            yield self._pair(self._sample(min(256, self.val_size - start), gen))


@torch.no_grad()
def channel_moments(chain: TeacherChain, data, indices: list[int], examples: int, batch_size: int = 256) -> dict[int, tuple[list[float], list[float]]]:
    """Per-channel mean and std of the teacher's activation at the input of parts ``indices``, on ``examples`` training examples."""
    wanted = set(indices)
    sums: dict[int, list] = {}
    seen = 0
    top = max(indices, default=0)
    for x, _ in data.batches("train", batch_size):
        x = x[: examples - seen].to(chain.device)
        if not len(x):
            break
        seen += len(x)
        values = [x] + chain.run(x, 0, top)  # values[i] is the input of part i
        for i in wanted:
            v = values[i].float()
            axes = feature_channels(tuple(v.shape))
            dims = [d for d in range(v.dim()) if d not in axes]
            count = v.numel() / (v.shape[axes[0]] if axes else 1)
            s1, s2 = v.sum(dims), (v * v).sum(dims)
            acc = sums.setdefault(i, [0.0, 0.0, 0.0])
            acc[0], acc[1], acc[2] = acc[0] + s1, acc[1] + s2, acc[2] + count
        if seen >= examples:
            break
    out = {}
    for i, (s1, s2, n) in sums.items():
        mean = s1 / n
        std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
        out[i] = (torch.atleast_1d(mean).tolist(), torch.atleast_1d(std).tolist())
    return out

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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ndc.chain import run_parts
from ndc.errors import NdcError
from ndc.workspace import Workspace, read_json, sha256_file, sha256_json, write_json_atomic

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
        "files": getattr(data, "fingerprint", None),  # the same spec over changed files is other data
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
    checksums = {p.name: sha256_file(p) for p in sorted(folder.glob("*.f16.npy"))}
    write_json_atomic(folder / "meta.json", {"key": key, "train": n_train, "test": n_test, "boundaries": layout.boundaries,
                                             "augment_passes": augment_passes, "dtype": "float16", "bytes": size,
                                             "sha256": checksums})
    if progress:
        progress(done_examples, total)  # again once the arrays are flushed and hashed: the cache is ready
    return folder


def verify_cache(folder: Path) -> str | None:
    """None when every array of a complete cache still has the checksum it was written with, else what is wrong."""
    try:
        meta = read_json(folder / "meta.json")
        checksums = meta["sha256"]
    except (NdcError, KeyError, TypeError):
        return "its metadata is unreadable or from an older ndc"
    for name, digest in checksums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} changed since it was written (corrupt)"
    return None


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
#
# A feed serves every candidate of a unit of work from one stream of batches.
# Each batch answers ``pair(i, lookahead)``: the input of neighbourhood ``i``
# and its targets (its output, then ``lookahead`` outputs further on). Cache
# and recompute batches hold teacher activations at named boundaries, read or
# computed once per step whatever the number of candidates; noise batches draw
# each neighbourhood's inputs on first use. The batch order comes from
# ``(seed, epoch)`` alone, so a unit can resume at any step.


class BoundaryBatch:
    """Teacher activations at named boundaries for one batch of examples."""

    def __init__(self, values: dict[str, torch.Tensor], inputs: list[str], outputs: list[str]):
        self.values, self.inputs, self.outputs = values, inputs, outputs

    def pair(self, i: int, lookahead: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.values[self.inputs[i]], [self.values[self.outputs[i + j]] for j in range(lookahead + 1)]


class Feed:
    """Batches for the candidates of one unit: ``train(epoch, skip)`` and ``heldout()``."""

    steps_per_epoch: int

    def train(self, epoch: int, skip: int = 0) -> Iterator:
        raise NotImplementedError

    def heldout(self) -> Iterator:
        raise NotImplementedError


def _to_float(a: np.ndarray, device: str) -> torch.Tensor:
    """fp16 rows of a memory map -> a float32 tensor (torch converts half precision ~10x faster than numpy)."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # a slice of the read-only map: copy, so torch owns writable memory
        a = a.copy()
    t = torch.from_numpy(a)
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True).float()
    return t.to(dtype=torch.float32)


class ResidentArrays:
    """The boundaries a unit needs, loaded once from the cache into (device) memory as fp16 tensors.

    Serving a batch is then one index_select per boundary on the device: no
    host round trip, no per-step copy (BRECQ's and airbench's habit).
    """

    def __init__(self, arrays: CachedArrays, names: list[str], device: str):
        self.device = device
        self.tensors = {(name, split): _resident(arrays.get(name, split), device) for name in names for split in ("train", "test")}

    def rows(self, name: str, split: str, idx: slice | torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (a slice, or indices already on the device) as float32."""
        t = self.tensors[name, split]
        return (t[idx] if isinstance(idx, slice) else t.index_select(0, idx)).float()


def _resident(rows: np.ndarray, device: str) -> torch.Tensor:
    """A read-only memory map's rows held in ``device`` memory: one copy, straight from the map."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.array(rows))  # in memory, and writable, as torch wants its arrays
    with warnings.catch_warnings():  # torch warns of a read-only array; this one is only read, by the copy to the device
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(rows)).to(device)


def resident_bytes(arrays: CachedArrays, names: list[str]) -> int:
    return sum(arrays.get(n, s).nbytes for n in names for s in ("train", "test"))


class CacheFeed(Feed):
    """Batches read from the activation cache: memory-mapped, or resident in (device) memory when it fits."""

    def __init__(self, arrays: CachedArrays, names: list[str], inputs: list[str], outputs: list[str], batch_size: int,
                 seed: int, device: str, resident_budget: int = 0):
        self.arrays, self.names, self.inputs, self.outputs = arrays, names, inputs, outputs
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.n = arrays.meta["train"]
        self.steps_per_epoch = max(1, math.ceil(self.n / batch_size))
        self.resident = ResidentArrays(arrays, names, device) if resident_bytes(arrays, names) <= resident_budget else None

    def train(self, epoch: int, skip: int = 0):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        # Sorted indices read the memmap front to back; the batch order stays random.
        batches = [np.sort(order[start:start + self.batch_size]) for start in range(skip * self.batch_size, self.n, self.batch_size)]
        if self.resident is not None and batches:
            # The epoch's indices go to the device in one copy: a copy per step would be a blocking
            # host-to-device transfer, which waits for the device every step.
            batches = torch.from_numpy(np.concatenate(batches)).to(self.resident.device).split(self.batch_size)
        for idx in batches:
            yield self._batch(idx, "train")

    def heldout(self):
        n = self.arrays.meta["test"]
        for start in range(0, n, 256):
            yield self._batch(slice(start, min(start + 256, n)), "test")

    def _batch(self, idx, split: str) -> BoundaryBatch:
        if self.resident is not None:
            values = {name: self.resident.rows(name, split, idx) for name in self.names}
        else:
            values = {name: _to_float(self.arrays.get(name, split)[idx], self.device) for name in self.names}
        return BoundaryBatch(values, self.inputs, self.outputs)


class RecomputeFeed(Feed):
    """One teacher forward per batch of real data captures every boundary the unit needs."""

    def __init__(self, chain: TeacherChain, data, names: list[str], inputs: list[str], outputs: list[str], batch_size: int,
                 seed: int, augment: bool, val_size: int):
        self.chain, self.data, self.inputs, self.outputs = chain, data, inputs, outputs
        self.names = set(names)
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self.val_size = min(val_size, data.test_size)
        self.steps_per_epoch = max(1, math.ceil(data.train_size / batch_size))
        self.parts = max((k for k, out in enumerate(outputs) if out in self.names), default=-1) + 1

    def _batch(self, x: torch.Tensor) -> BoundaryBatch:
        x = x.to(self.chain.device, non_blocking=True)
        values = {self.inputs[0]: x}
        for k, out in enumerate(self.chain.run(x, 0, self.parts)):
            if self.outputs[k] in self.names:
                values[self.outputs[k]] = out
        return BoundaryBatch(values, self.inputs, self.outputs)

    def train(self, epoch: int, skip: int = 0):
        batches = self.data.batches("train", self.batch_size, shuffle=True, augment=self.augment, seed=self.seed, epoch=epoch)
        for k, (x, _) in enumerate(batches):
            if k >= skip:
                yield self._batch(x)

    def heldout(self):
        seen = 0
        for x, _ in self.data.batches("test", 256):
            x = x[: self.val_size - seen]
            if not len(x):
                return
            seen += len(x)
            yield self._batch(x)


class NoiseBatch:
    """Gaussian inputs at each neighbourhood's input, drawn on first use; targets from the teacher."""

    def __init__(self, feed: "NoiseFeed", n: int, draw: tuple[int, ...]):
        self.feed, self.n, self.draw = feed, n, draw
        self._pairs: dict[tuple[int, int], tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def pair(self, i: int, lookahead: int):
        if (i, lookahead) not in self._pairs:
            a = self.feed.sample(i, self.n, self.draw)
            self._pairs[i, lookahead] = (a, self.feed.chain.run(a, i, i + 1 + lookahead))
        return self._pairs[i, lookahead]


class NoiseFeed(Feed):
    """Gaussian inputs at each neighbourhood's input (N(0,1), or matched per-channel moments)."""

    def __init__(self, chain: TeacherChain, shapes: dict[int, list[int]], batch_size: int, seed: int, examples: int,
                 moments: dict[int, tuple[list[float], list[float]]], val_size: int):
        self.chain, self.shapes = chain, {i: list(s) for i, s in shapes.items()}
        self.batch_size, self.seed, self.examples, self.val_size = batch_size, seed, examples, val_size
        self.steps_per_epoch = max(1, math.ceil(examples / batch_size))
        self.moments = {}
        for i, (mean, std) in moments.items():
            shape = self.shapes[i]
            view = [1] * (len(shape) + 1)
            axis = feature_channels((1, *shape))
            if axis:
                view[axis[0]] = -1
            self.moments[i] = tuple(torch.tensor(m, dtype=torch.float32).view(view).to(chain.device) for m in (mean, std))

    def sample(self, i: int, n: int, draw: tuple[int, ...]) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed, i, *draw]).generate_state(1, np.uint64)[0] >> 1)
        gen = torch.Generator(device=self.chain.device).manual_seed(seed)
        a = torch.randn((n, *self.shapes[i]), generator=gen, device=self.chain.device)
        if i in self.moments:
            mean, std = self.moments[i]
            a = a * std + mean
        return a

    def train(self, epoch: int, skip: int = 0):
        for k in range(skip, self.steps_per_epoch):
            yield NoiseBatch(self, min(self.batch_size, self.examples - k * self.batch_size), (epoch, k))

    def heldout(self):
        for k, start in enumerate(range(0, self.val_size, 256)):
            yield NoiseBatch(self, min(256, self.val_size - start), (2**31 - 1, k))


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

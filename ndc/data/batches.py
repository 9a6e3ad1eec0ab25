"""Batches: the :class:`DataSource` every stage iterates, and the vectorised batch operations it uses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ndc.data.fit import Fit
from ndc.data.splits import LazySplit, Raw, Split
from ndc.errors import NdcError

# Random translation of the paper's CIFAR setup: zero-pad 4, random crop.
AUGMENT_SHIFT = 4


def augment_shift(height: int, width: int) -> int:
    """The largest translation for images of this size: 4 px from 28 px up (the CIFAR setup), an eighth of the
    shorter side below (1 px for 8x8 digits, where 4 px would move half the image out of view)."""
    return max(1, min(AUGMENT_SHIFT, round(min(height, width) / 8)))


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """Raw batch -> float32 tensor; uint8 pixels are scaled to [0, 1], floats are taken as they are."""
    # np.array always copies: a float32 memory map would otherwise reach torch read-only (and torch warns).
    t = torch.from_numpy(np.array(x, dtype=np.float32))
    if x.dtype == np.uint8:
        t.mul_(1.0 / 255.0)
    return t

def translate(x: torch.Tensor, shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Shift each image of a (B, C, H, W) batch by up to ``shift`` px in each direction, zero-filled.

    The same as zero-padding by ``shift`` and cropping at a random offset (the
    CIFAR setup), done for the whole batch with one gather.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    offsets = torch.from_numpy(rng.integers(0, 2 * shift + 1, size=(b, 2)))
    rows = (offsets[:, 0:1] + torch.arange(h)).view(b, 1, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w)).view(b, 1, 1, w)
    return padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]


def flip(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Mirror each image of a (B, C, H, W) batch left-right with probability 1/2."""
    mask = torch.from_numpy(rng.random(x.shape[0]) < 0.5).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x)





class DataSource:
    """A resolved data spec: sizes, classes, the fitted example shape, statistics, and batches.

    Attributes (read-only by convention):

    * ``name``: the spec; ``labels``: ``classes`` (y holds class indices),
      ``targets`` (y holds float rows of ``target_shape``: multi-label 0/1
      targets when ``binary``, else values such as regression targets) or
      ``none`` (unlabelled: y is None);
    * ``classes``: number of classes (largest label + 1, or the number of class
      folders), None unless the labels are classes;
    * ``shape``: per-example shape of every batch (the model's input without
      the batch dimension, or the raw shape when no input shape was given);
    * ``mean``, ``std``: per-channel values that normalisation subtracts and
      divides by (0 and 1 when normalisation is off);
    * ``train_size``, ``test_size``: after the validation split and ``limit``.
    """

    def __init__(self, name: str, raw: Raw, train: Split, test: Split, fit: Fit, mean: list[float],
                 std: list[float], normalization: str, split: str, limit: int | None, stats_path: Path | None):
        self.name = name
        self.kind = raw.kind
        self.where = raw.where
        self.fingerprint = raw.fingerprint  # JSON-able identity of the underlying files
        self.labels = train.labels
        self.classes = raw.classes
        self.target_shape = train.target_shape if train.labels == "targets" else None
        self.binary = raw.binary
        self.class_names = raw.class_names
        self.raw_shape = fit.raw
        self.shape = fit.shape
        self.mean, self.std = mean, std
        self.normalization = normalization
        self.split = split
        self.limit = limit
        self.stats_path = stats_path
        self.train_size, self.test_size = len(train), len(test)
        self._splits = {"train": train, "test": test}
        self._fit = fit
        view = (1, len(mean), *([1] * (len(fit.shape) - 1)))  # (1, C, 1, 1) for images, (1, F) for features
        self._normalize = normalization != "none"
        self._mean = torch.tensor(mean, dtype=torch.float32).view(view)
        self._std = torch.tensor(std, dtype=torch.float32).view(view)

    def __repr__(self) -> str:
        return f"DataSource({self.name!r}, train={self.train_size}, test={self.test_size}, shape={self.shape})"

    def batches(self, split: str = "train", batch_size: int = 128, *, shuffle: bool = False, augment: bool = False,
                flip: bool = False, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Batches ``(x, y)`` of one split: x float32 (B, *shape), fitted and normalised; y as ``labels`` says.

        y is int64 (B,) for classes, float32 (B, *target_shape) for targets,
        None for unlabelled data.

        ``shuffle`` draws a permutation, ``augment`` a random translation by up
        to 4 px per image (images only; other data is left alone) and ``flip``
        adds random horizontal mirroring (with ``augment``). All randomness
        comes from ``(seed, epoch)``: the same pair gives the same order and the
        same augmentation, whatever else ran before. Without ``shuffle`` the
        order is the source's fixed order.
        """
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        return self._batches(self._splits[split], batch_size, shuffle, augment, flip, seed, epoch, drop_last)

    def _batches(self, data: Split, batch_size: int, shuffle: bool, augment: bool, flip_: bool, seed: int,
                 epoch: int, drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        rng = np.random.default_rng([seed, epoch])
        n = len(data)
        order = rng.permutation(n) if shuffle else None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size:
                break
            x, y = data.take(slice(start, stop) if order is None else order[start:stop])
            yield self._prepare(x, augment, flip_, rng), None if y is None else torch.from_numpy(y)

    def _prepare(self, x: np.ndarray, augment: bool, flip_: bool, rng: np.random.Generator) -> torch.Tensor:
        fit = self._fit
        t = fit.spatial(to_tensor(x))
        if augment and fit.image:
            # Augment before the channel repeat: one grey channel costs a third of three.
            t = translate(t, augment_shift(*t.shape[-2:]), rng)
            if flip_:
                t = flip(t, rng)
        t = fit.channel(t)
        if self._normalize:
            return (t - self._mean).div_(self._std)
        return t.contiguous()

    def check(self) -> None:
        """Read every example of both splits once, so a broken file fails now and not mid-training.

        Array sources were checked when opened and cost nothing here; image
        folders and user datasets are read one example at a time.
        """
        for split in self._splits.values():
            if isinstance(split, LazySplit):
                for start in range(0, len(split), 256):
                    split.take(slice(start, start + 256))

    def check_classes(self, outputs: int, hint: str = "") -> None:
        """Refuse class labels the model cannot score: one line naming the first example whose label is ``outputs`` or more.

        Only the examples this source serves (after ``limit``) are looked at,
        since only they reach the model. Nothing to check unless the labels are classes.
        """
        if self.labels != "classes" or self.classes is None or self.classes <= outputs:
            return
        for split in self._splits.values():
            bad = split.label_outside(outputs)
            if bad is not None:
                raise NdcError(f"{bad}, outside the model's {outputs} classes (0..{outputs - 1})"
                               + (f"; {hint}" if hint else ""))

    def describe(self) -> dict:
        """The JSON payload of ``ndc data``: required keys first (train, test, classes, shape, mean, std)."""
        return {
            "train": self.train_size,
            "test": self.test_size,
            "classes": self.classes,
            "shape": list(self.shape),
            "mean": self.mean,
            "std": self.std,
            "spec": self.name,
            "source": self.where,
            "raw_shape": list(self.raw_shape),
            "fit": self._fit.describe(),
            "split": self.split,
            "normalization": self.normalization,
            "limit": self.limit,
            "statistics": None if self.stats_path is None else str(self.stats_path),
            "labels": self.labels,
            "target_shape": None if self.target_shape is None else list(self.target_shape),
            "binary": self.binary,
        }



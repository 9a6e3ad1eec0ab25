"""Raw splits: the examples of one split as stored, before fitting, and the checks every source's arrays pass.

``take(index)`` returns ``(x, y)``: x of shape ``(B, *example_shape)`` as
uint8 (pixel values, scaled by 1/255 later) or float (taken as is); y is
what the split's ``labels`` say:

* ``classes``: int64 class indices, shape ``(B,)``;
* ``targets``: float32 values, shape ``(B, *target_shape)`` (multi-label 0/1
  targets, regression values);
* ``none``: no labels, y is None.

The example_shape is canonical: (C, H, W) for images, (D,) for vectors.
Every check names the array (or file) and the first bad example, so a NaN
pixel or a stray label is one line a user can act on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ndc.errors import NdcError, fmt_shape

LABELS = ("classes", "targets", "none")
# Elements per chunk when scanning an array for non-finite values: bounds memory for memory-mapped sets.
_SCAN_CHUNK_ELEMENTS = 1 << 24


class Split:
    example_shape: tuple[int, ...]
    labels: str = "classes"
    target_shape: tuple[int, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, index: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def subset(self, index: np.ndarray) -> Split:
        raise NotImplementedError

    def head(self, n: int) -> Split:
        return self if n >= len(self) else self.subset(np.arange(n))

    def label_outside(self, classes: int) -> str | None:
        """The first example whose class label is ``classes`` or more, described for a user; None when all fit."""
        raise NotImplementedError


class ArraySplit(Split):
    """Examples held in (possibly memory-mapped) arrays; ``index`` selects rows without copying.

    ``names`` are how messages call the two arrays (e.g. ``data.npz: x`` and ``data.npz: y``).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray | None, layout: str, index: np.ndarray | None = None,
                 names: tuple[str, str] = ("x", "y")):
        self.x, self.y, self.layout, self.index, self.names = x, y, layout, index, names
        self.example_shape = canonical_shape(x.shape[1:], layout)
        self.labels = label_kind(y)
        self.target_shape = tuple(int(d) for d in y.shape[1:]) if self.labels == "targets" else ()

    def __len__(self) -> int:
        return len(self.x) if self.index is None else len(self.index)

    def take(self, index: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.index is not None:
            index = self.index[index]
        # np.array copies: labels of a memory map are read-only, and torch wants writable memory.
        x, y = self.x[index], None
        if self.labels == "classes":
            y = np.array(self.y[index], dtype=np.int64)
        elif self.labels == "targets":
            y = np.array(self.y[index], dtype=np.float32)
        if self.layout == "nhw":
            x = x[:, None]
        elif self.layout == "nhwc":
            x = x.transpose(0, 3, 1, 2)
        return x, y

    def subset(self, index: np.ndarray) -> ArraySplit:
        if self.index is None and len(index) and np.array_equal(index, np.arange(len(index))):
            # A prefix stays a view: slicing a memory map reads nothing.
            y = None if self.y is None else self.y[: len(index)]
            return ArraySplit(self.x[: len(index)], y, self.layout, names=self.names)
        base = np.asarray(index) if self.index is None else self.index[index]
        return ArraySplit(self.x, self.y, self.layout, base, self.names)

    def label_outside(self, classes: int) -> str | None:
        if self.labels != "classes":
            return None
        y = self.y if self.index is None else self.y[self.index]
        bad = np.flatnonzero(np.asarray(y) >= classes)
        if not len(bad):
            return None
        row = int(bad[0]) if self.index is None else int(self.index[bad[0]])
        return f"{self.names[1]}: example {row} has label {int(y[bad[0]])}"


class LazySplit(Split):
    """Examples loaded one by one by ``load(i) -> (float32 array of example_shape, label)``.

    The label is an int (``classes``), a float32 array (``targets``) or None (``none``), the same kind for every item.
    """

    def __init__(self, n: int, load: Callable[[int], tuple[np.ndarray, Any]], example_shape: tuple[int, ...],
                 index: np.ndarray | None = None, labels: str = "classes", target_shape: tuple[int, ...] = (),
                 what: str = "the data"):
        self.n, self.load, self.example_shape, self.index = n, load, example_shape, index
        self.labels, self.target_shape, self.what = labels, target_shape, what

    def __len__(self) -> int:
        return self.n if self.index is None else len(self.index)

    def _rows(self, index: slice | np.ndarray) -> np.ndarray:
        return (np.arange(self.n) if self.index is None else self.index)[index]

    def take(self, index: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        items = [self.load(int(i)) for i in self._rows(index)]
        x = np.stack([a for a, _ in items]) if items else np.zeros((0, *self.example_shape), np.float32)
        if self.labels == "none":
            return x, None
        if self.labels == "targets":
            y = np.stack([t for _, t in items]) if items else np.zeros((0, *self.target_shape), np.float32)
            return x, y.astype(np.float32, copy=False)
        return x, np.asarray([label for _, label in items], dtype=np.int64)

    def subset(self, index: np.ndarray) -> LazySplit:
        base = np.asarray(index) if self.index is None else self.index[index]
        return LazySplit(self.n, self.load, self.example_shape, base, self.labels, self.target_shape, self.what)

    def label_outside(self, classes: int) -> str | None:
        if self.labels != "classes":
            return None
        rows = self._rows(slice(None))
        for start in range(0, len(rows), 256):
            for row in rows[start:start + 256]:
                label = self.load(int(row))[1]
                if label >= classes:
                    return f"{self.what}: example {int(row)} has label {label}"
        return None


@dataclass
class Raw:
    """What a spec resolves to before splitting, limiting and fitting."""

    kind: str                 # idx, digits, npz, imagefolder, function
    where: str                # for humans: which files or code
    train: Split
    test: Split | None        # None: hold out a validation split
    classes: int | None       # number of classes (labels "classes"), else None
    fingerprint: Any          # JSON-able; changes when the underlying files change
    class_names: list[str] | None = None
    binary: bool = False      # targets that are all 0 or 1 (multi-label)


def canonical_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if layout == "nhw":
        return (1, *shape)
    if layout == "nhwc":
        return (shape[2], shape[0], shape[1])
    return shape


def layout_of(per_example: Sequence[int], what: str) -> str:
    """How one example of this shape is laid out: flat (D), nhw (H, W), nchw (C, H, W) or nhwc (H, W, C).

    A 3-D example is channels-first unless its last size is 1 or 3 and its
    first is not (a 32x32x3 array is an RGB image stored channels-last).
    """
    if len(per_example) == 1:
        return "flat"
    if len(per_example) == 2:
        return "nhw"
    if len(per_example) == 3:
        channels_last = per_example[-1] in (1, 3) and per_example[0] not in (1, 3)
        return "nhwc" if channels_last else "nchw"
    raise NdcError(f"{what} has examples of shape {fmt_shape(per_example)}; expected a vector (D), "
                   "a grey image (H, W) or an image (C, H, W) / (H, W, C)")


def label_kind(y: np.ndarray | None) -> str:
    """``classes`` for a 1-D integer array, ``none`` for no array, else ``targets``."""
    if y is None:
        return "none"
    return "classes" if y.dtype.kind in "iu" and y.ndim == 1 else "targets"


def first_nonfinite(a: np.ndarray) -> tuple[int, float] | None:
    """(row, value) of the first row of ``a`` holding a NaN or infinity; None when every value is finite.

    Scans in chunks, so a memory-mapped array is read once without being loaded whole.
    """
    if a.dtype.kind != "f" or not a.size:
        return None
    rows = max(1, _SCAN_CHUNK_ELEMENTS // max(1, math.prod(a.shape[1:])))
    for start in range(0, len(a), rows):
        chunk = np.asarray(a[start:start + rows]).reshape(min(rows, len(a) - start), -1)
        bad = ~np.isfinite(chunk)
        if bad.any():
            row = int(np.flatnonzero(bad.any(1))[0])
            return start + row, float(chunk[row][bad[row]][0])
    return None


def array_split(x: Any, y: Any, what_x: str, what_y: str) -> ArraySplit:
    """Check an (x, y) pair of arrays (y may be None); every wrong dtype, shape or value is one line naming the array.

    y is class labels (1-D integers), targets (floats, or integers of more
    than one dimension, such as multi-label 0/1 rows) or None (no labels).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    x = np.asanyarray(x)
    if not (x.dtype == np.uint8 or x.dtype.kind == "f"):
        raise NdcError(f"{what_x} has dtype {x.dtype}; expected uint8 pixels (0..255) or floating point")
    if x.ndim < 2:
        raise NdcError(f"{what_x} has shape {fmt_shape(x.shape)}; expected one row per example, (N, ...)")
    if len(x) == 0:
        raise NdcError(f"{what_x} holds no examples")
    layout = layout_of(x.shape[1:], what_x)
    _check_finite(x, what_x)
    if y is not None:
        y = np.asanyarray(y)
        if y.dtype == np.bool_:
            y = y.astype(np.uint8)
        if y.dtype.kind not in "iuf":
            raise NdcError(f"{what_y} has dtype {y.dtype}; expected integer class labels or numeric targets")
        if y.ndim == 0 or len(y) != len(x):
            raise NdcError(f"{what_y} has shape {fmt_shape(y.shape)}; expected ({len(x)},) class labels or "
                           f"({len(x)}, ...) targets, one per example of x")
        if label_kind(y) == "classes" and y.dtype.kind == "i":
            negative = np.flatnonzero(y < 0)
            if len(negative):
                raise NdcError(f"{what_y} holds negative labels (example {int(negative[0])} is "
                               f"{int(y[negative[0]])}); expected classes 0..K-1")
        _check_finite(y, what_y)
    return ArraySplit(x, y, layout, names=(what_x, what_y))


def _check_finite(a: np.ndarray, what: str) -> None:
    bad = first_nonfinite(a)
    if bad is not None:
        row, value = bad
        raise NdcError(f"{what}: example {row} holds a non-finite value ({value}); "
                       "fix or drop that example (NaN and infinity poison training and every score)")


def same_examples(train: Split, test: Split, what_train: str, what_test: str) -> None:
    if train.example_shape != test.example_shape:
        raise NdcError(f"{what_test} has examples of shape {fmt_shape(test.example_shape)} but "
                       f"{what_train} has {fmt_shape(train.example_shape)}")
    arrays = isinstance(train, ArraySplit) and isinstance(test, ArraySplit)
    if arrays and (train.x.dtype == np.uint8) != (test.x.dtype == np.uint8):
        raise NdcError(f"{what_test} is {test.x.dtype} but {what_train} is {train.x.dtype}; "
                       "store both as uint8 pixels or both as floats")
    if train.labels != test.labels:
        raise NdcError(f"{what_test} has labels of kind {test.labels} but {what_train} has {train.labels}; "
                       "give both splits the same kind of labels (or none)")
    if train.target_shape != test.target_shape:
        raise NdcError(f"{what_test} has targets of shape {fmt_shape(test.target_shape)} per example but "
                       f"{what_train} has {fmt_shape(train.target_shape)}")


def array_classes(train: ArraySplit, test: ArraySplit | None) -> int | None:
    """Largest class label + 1 over both splits; None when the labels are not classes."""
    if train.labels != "classes":
        return None
    return 1 + max(int(s.y.max()) for s in (train, test) if s is not None)


def binary_targets(*splits: ArraySplit | None) -> bool:
    """Whether every target of these array splits is 0 or 1 (multi-label rows)."""
    ys = [s.y for s in splits if s is not None and s.labels == "targets"]
    return bool(ys) and all(bool(np.isin(np.asarray(y), (0, 1)).all()) for y in ys)


def file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def content_digest(split: Split | None) -> str | None:
    """A hash of what a split holds, for data that has no files to stamp (a user function's return value).

    Array splits hash every byte of ``x`` and ``y``; a dataset loaded item by
    item hashes its length and its first, middle and last examples (hashing
    every item would read the whole data set on every command).
    """
    import hashlib

    if split is None:
        return None
    h = hashlib.sha256()
    if isinstance(split, ArraySplit):
        for a in (split.x, split.y, split.index):
            if a is not None:
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(memoryview(a.reshape(-1).view(np.uint8)))
        return h.hexdigest()
    n = len(split)
    h.update(f"lazy {n} {split.example_shape}".encode())
    x, y = split.take(np.unique(np.array([0, n // 2, n - 1])))
    for a in (x, y):
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

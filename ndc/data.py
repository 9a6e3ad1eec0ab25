"""Data sources: one ``--data SPEC`` parser, fitting examples to the teacher's input, normalisation.

Every command that reads data calls :func:`open_data` and iterates
:meth:`DataSource.batches`. The guarantees, which the stages rely on:

* **One parser.** ``SPEC`` is one of ``fashion-mnist[:DIR]``, ``mnist:DIR``
  (IDX files, gzipped or not), ``digits`` (scikit-learn's bundled 8x8 set),
  ``path.npz`` (arrays ``x``, ``y``, optional ``x_test``, ``y_test``),
  ``imagefolder:DIR`` (one sub-folder per class, optional ``train``/``test``)
  or ``module:function`` / ``file.py:function`` (user code returning
  ``(train, test)``). See ``docs/data.md``.
* **Same examples, same order.** Sources have a fixed order; ``limit=N`` keeps
  the first N training and the first N test examples; a source without a test
  set holds out a validation split drawn with a fixed seed *before* the limit,
  so the held-out examples never change with ``limit``.
* **Fitted to the model.** Batches have the model's per-example shape
  (``input_shape`` without the batch dimension): grey images are repeated to
  three channels, images up to 25% smaller are zero-padded (28 -> 32 pads
  2 px per side), other sizes are resized (bilinear, antialiased).
* **Normalised with training statistics.** Per-channel mean and std of the
  fitted training split are computed once and kept in the workspace
  (``data/<hash>.json``), so every stage normalises the same way.
* **Deterministic.** The same ``(seed, epoch)`` gives the same order and the
  same augmentation.
* **Fast where it matters.** In-memory sources (IDX, digits, npz) keep their
  raw uint8/float arrays (npz members memory-mapped when stored uncompressed)
  and fit, augment and normalise a whole batch at once with tensor ops; only
  image folders and user datasets load examples one by one.

Every problem a user can cause raises :class:`~ndc.errors.NdcError` with one line.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ndc.errors import NdcError, fmt_shape, one_line
from ndc.workspace import sha256_json

if TYPE_CHECKING:
    from ndc.workspace import Workspace

DATA_SPEC_HELP = ("fashion-mnist[:DIR], mnist:DIR, digits, file.npz, imagefolder:DIR, text:FILE[,TOKENIZER], "
                  "module:function or file.py:function")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Held out when a source has no test set. One fifth keeps the digits split (359
# examples) large enough for accuracy to move in steps below a point.
VALIDATION_FRACTION = 0.2
# Zero-pad rather than resize when the model's side is at most this much larger:
# 28 -> 32 (the paper-style setup) pads; 8 -> 32 would leave a tiny digit in a
# black frame, so it is resized instead.
PAD_LIMIT = 0.25
# Random translation of the paper's CIFAR setup: zero-pad 4, random crop.
AUGMENT_SHIFT = 4
STATS_DIR = "data"
STATS_VERSION = 2
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
# Elements per chunk of the statistics pass: bounds its memory whatever the image size.
_STATS_CHUNK_ELEMENTS = 1 << 24
# ITU-R BT.601 luma, the weights PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------------------
# Raw splits: the examples of one split as stored, before fitting.
#
# take(index) returns (x, y): x of shape (B, *example_shape) as uint8 (pixel
# values, scaled by 1/255 later) or float (taken as is), y int64. The
# example_shape is canonical: (C, H, W) for images, (D,) for vectors.


class _Split:
    example_shape: tuple[int, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, index: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def subset(self, index: np.ndarray) -> _Split:
        raise NotImplementedError

    def head(self, n: int) -> _Split:
        return self if n >= len(self) else self.subset(np.arange(n))


class _ArraySplit(_Split):
    """Examples held in (possibly memory-mapped) arrays; ``index`` selects rows without copying."""

    def __init__(self, x: np.ndarray, y: np.ndarray, layout: str, index: np.ndarray | None = None):
        self.x, self.y, self.layout, self.index = x, y, layout, index
        self.example_shape = _canonical_shape(x.shape[1:], layout)

    def __len__(self) -> int:
        return len(self.x) if self.index is None else len(self.index)

    def take(self, index: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.index is not None:
            index = self.index[index]
        # np.array copies: labels of a memory map are read-only, and torch wants writable memory.
        x, y = self.x[index], np.array(self.y[index], dtype=np.int64)
        if self.layout == "nhw":
            x = x[:, None]
        elif self.layout == "nhwc":
            x = x.transpose(0, 3, 1, 2)
        return x, y

    def subset(self, index: np.ndarray) -> _ArraySplit:
        if self.index is None and len(index) and np.array_equal(index, np.arange(len(index))):
            # A prefix stays a view: slicing a memory map reads nothing.
            return _ArraySplit(self.x[: len(index)], self.y[: len(index)], self.layout)
        base = np.asarray(index) if self.index is None else self.index[index]
        return _ArraySplit(self.x, self.y, self.layout, base)


class _LazySplit(_Split):
    """Examples loaded one by one by ``load(i) -> (float32 array of example_shape, label)``."""

    def __init__(self, n: int, load: Callable[[int], tuple[np.ndarray, int]], example_shape: tuple[int, ...],
                 index: np.ndarray | None = None):
        self.n, self.load, self.example_shape, self.index = n, load, example_shape, index

    def __len__(self) -> int:
        return self.n if self.index is None else len(self.index)

    def take(self, index: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = (np.arange(self.n) if self.index is None else self.index)[index]
        items = [self.load(int(i)) for i in rows]
        x = np.stack([a for a, _ in items]) if items else np.zeros((0, *self.example_shape), np.float32)
        return x, np.asarray([label for _, label in items], dtype=np.int64)

    def subset(self, index: np.ndarray) -> _LazySplit:
        base = np.asarray(index) if self.index is None else self.index[index]
        return _LazySplit(self.n, self.load, self.example_shape, base)


@dataclass
class _Raw:
    """What a spec resolves to before splitting, limiting and fitting."""

    kind: str                 # idx, digits, npz, imagefolder, function
    where: str                # for humans: which files or code
    train: _Split
    test: _Split | None       # None: hold out a validation split
    classes: int
    fingerprint: Any          # JSON-able; changes when the underlying files change
    class_names: list[str] | None = None


def _canonical_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if layout == "nhw":
        return (1, *shape)
    if layout == "nhwc":
        return (shape[2], shape[0], shape[1])
    return shape


def _layout(per_example: Sequence[int], what: str) -> str:
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


# ---------------------------------------------------------------------------
# Spec parsing


def _resolve(spec: str) -> _Raw:
    """Parse SPEC and open its files (lazily where the format allows)."""
    name, sep, arg = spec.partition(":")
    if name in ("fashion-mnist", "mnist"):
        if sep and not arg:
            raise NdcError(f"data spec {spec!r} needs a directory after the colon, e.g. {name}:data/{name}")
        if name == "mnist" and not sep:
            raise NdcError("mnist needs the directory of its IDX files: --data mnist:DIR "
                           "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)")
        return _idx_source(Path(arg).expanduser() if arg else None, name)
    if spec == "digits":
        return _digits_source()
    if name == "imagefolder":
        if not arg:
            raise NdcError("imagefolder needs a directory: --data imagefolder:DIR (one sub-folder per class)")
        return _imagefolder_source(Path(arg).expanduser())
    if spec.endswith(".npz"):
        return _npz_source(Path(spec).expanduser())
    target, sep, attr = spec.rpartition(":")
    if sep and target and attr.isidentifier():
        return _function_source(spec)
    raise NdcError(f"unknown data spec {spec!r}; expected {DATA_SPEC_HELP}")


# ---------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 and 1 dimensions
_IDX_NAMES = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _idx_source(directory: Path | None, name: str) -> _Raw:
    if directory is None:
        directory = FASHION_MNIST_DIR
        if not directory.is_dir():
            raise NdcError(f"fashion-mnist: {directory} not found; install Debian's package "
                           "(apt-get install dataset-fashion-mnist) or give the IDX files' directory: "
                           "--data fashion-mnist:DIR")
    elif not directory.is_dir():
        raise NdcError(f"{name}: {directory}: no such directory")
    files = {key: _find_idx(directory, stems) for key, stems in _IDX_NAMES.items()}
    if files["train", "images"] is None or files["train", "labels"] is None:
        raise NdcError(f"{name}: {directory} lacks the training IDX files "
                       "train-images-idx3-ubyte and train-labels-idx1-ubyte (optionally .gz)")
    if (files["test", "images"] is None) != (files["test", "labels"] is None):
        missing = "t10k-images-idx3-ubyte" if files["test", "images"] is None else "t10k-labels-idx1-ubyte"
        raise NdcError(f"{name}: {directory} has only half of the test set: {missing}[.gz] is missing")

    def split(part: str) -> _ArraySplit | None:
        if files[part, "images"] is None:
            return None
        x = read_idx(files[part, "images"], "images")
        y = read_idx(files[part, "labels"], "labels")
        if len(x) != len(y):
            raise NdcError(f"{name}: {files[part, 'images'].name} has {len(x)} images but "
                           f"{files[part, 'labels'].name} has {len(y)} labels")
        return _ArraySplit(x, y, "nhw")

    train, test = split("train"), split("test")
    classes = 1 + max(int(s.y.max()) for s in (train, test) if s is not None and len(s))
    used = [p for p in files.values() if p is not None]
    return _Raw("idx", f"IDX files in {directory.resolve()}", train, test, classes,
                fingerprint=[_file_stamp(p) for p in sorted(used)])


def _find_idx(directory: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def read_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``kind`` "images": N x H x W, "labels": N).

    Gzipped files are decompressed into memory (about 0.2 s for Fashion-MNIST's
    training images); plain files are memory-mapped. The magic number and the
    size implied by the header are checked, so a wrong or truncated file is one
    clear error, never garbage examples.
    """
    path = Path(path)
    ndim = 3 if kind == "images" else 1
    header_size = 4 + 4 * ndim
    try:
        if path.suffix == ".gz":
            try:
                data = gzip.decompress(path.read_bytes())
            except (OSError, EOFError, zlib.error) as e:
                raise NdcError(f"{path}: not a readable gzip file ({e})") from None
            header = data[:header_size]
        else:
            with open(path, "rb") as f:
                header = f.read(header_size)
            data = None
    except FileNotFoundError:
        raise NdcError(f"{path}: no such file") from None
    if len(header) < 4:
        raise NdcError(f"{path}: not an IDX {kind} file (too short for a header)")
    magic = struct.unpack(">I", header[:4])[0]
    if magic != _IDX_MAGIC[kind]:
        raise NdcError(f"{path}: not an IDX {kind} file "
                       f"(magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[kind]:08x})")
    if len(header) < header_size:
        raise NdcError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", header[4:])
    expected = math.prod(dims)
    actual = (len(data) if data is not None else path.stat().st_size) - header_size
    if actual != expected:
        raise NdcError(f"{path}: the header promises {fmt_shape(dims)} = {expected} bytes of data "
                       f"but the file holds {actual}")
    if data is None:
        if expected == 0:
            return np.zeros(dims, np.uint8)
        return np.memmap(path, dtype=np.uint8, mode="r", offset=header_size, shape=dims)
    # A writable copy: batches are made with numpy/torch ops that dislike read-only buffers.
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims).copy()


# ---------------------------------------------------------------------------
# scikit-learn digits


def _digits_source() -> _Raw:
    from sklearn import __version__ as sklearn_version
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are counts 0..16; scaled to [0, 1] like every other source.
    x = (bunch.images / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return _Raw("digits", "scikit-learn's bundled digits (8x8 grey, 1797 images, no official test split)",
                _ArraySplit(x, y, "nhw"), None, 10, fingerprint={"sklearn": sklearn_version},
                class_names=[str(i) for i in range(10)])


# ---------------------------------------------------------------------------
# npz


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``; members stored uncompressed are memory-mapped.

    ``np.load(..., mmap_mode="r")`` does not map members of an npz, so a set
    larger than memory would be read whole. An uncompressed member (``np.savez``)
    is a plain ``.npy`` at a known offset inside the zip: we find that offset
    from the member's local header and map the data there. Compressed members
    (``np.savez_compressed``) are read into memory. Pickled (object) arrays are
    refused: loading them would run code.
    """
    path = Path(path)
    if not path.is_file():
        raise NdcError(f"{path}: no such file")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[:-4]
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                    arrays[key] = _map_stored_npy(path, raw, info)
                else:
                    with zf.open(info) as member:
                        arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
    except zipfile.BadZipFile:
        raise NdcError(f"{path}: not an npz file (not a zip archive)") from None
    except ValueError as e:
        # numpy raises ValueError for object arrays (allow_pickle=False) and bad .npy headers.
        raise NdcError(f"{path}: unreadable array ({' '.join(str(e).split())})") from None
    return arrays


def _map_stored_npy(path: Path, raw, info: zipfile.ZipInfo) -> np.ndarray:
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"bad zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(raw)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
    if dtype.hasobject:
        raise ValueError(f"{info.filename[:-4]} holds Python objects (pickled); save numeric arrays")
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape, order="F" if fortran else "C")


def _npz_source(path: Path) -> _Raw:
    arrays = load_npz(path)
    for key in ("x", "y"):
        if key not in arrays:
            found = ", ".join(sorted(arrays)) or "nothing"
            raise NdcError(f"{path} has no array {key!r} (found: {found}); "
                           "save with np.savez(path, x=images, y=labels)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise NdcError(f"{path} has {'x_test' if 'x_test' in arrays else 'y_test'} without "
                       f"{'y_test' if 'x_test' in arrays else 'x_test'}; give both or neither")
    train = _array_split(arrays["x"], arrays["y"], f"{path}: x", f"{path}: y")
    test = None
    if "x_test" in arrays:
        test = _array_split(arrays["x_test"], arrays["y_test"], f"{path}: x_test", f"{path}: y_test")
        _same_examples(train, test, f"{path}: x", "x_test")
    return _Raw("npz", str(path.resolve()), train, test, _classes(train, test), fingerprint=_file_stamp(path))


def _array_split(x: Any, y: Any, what_x: str, what_y: str) -> _ArraySplit:
    """Check an (x, y) pair of arrays; every wrong dtype or shape is one line naming the array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    x, y = np.asanyarray(x), np.asanyarray(y)
    if not (x.dtype == np.uint8 or x.dtype.kind == "f"):
        raise NdcError(f"{what_x} has dtype {x.dtype}; expected uint8 pixels (0..255) or floating point")
    if x.ndim < 2:
        raise NdcError(f"{what_x} has shape {fmt_shape(x.shape)}; expected one row per example, (N, ...)")
    if len(x) == 0:
        raise NdcError(f"{what_x} holds no examples")
    layout = _layout(x.shape[1:], what_x)
    if y.dtype.kind not in "iu":
        raise NdcError(f"{what_y} has dtype {y.dtype}; expected integer class labels")
    if y.shape != (len(x),):
        raise NdcError(f"{what_y} has shape {fmt_shape(y.shape)}; expected ({len(x)},), one label per example of x")
    if y.dtype.kind == "i" and int(y.min()) < 0:
        raise NdcError(f"{what_y} holds negative labels; expected classes 0..K-1")
    return _ArraySplit(x, y, layout)


def _same_examples(train: _Split, test: _Split, what_train: str, what_test: str) -> None:
    if train.example_shape != test.example_shape:
        raise NdcError(f"{what_test} has examples of shape {fmt_shape(test.example_shape)} but "
                       f"{what_train} has {fmt_shape(train.example_shape)}")
    arrays = isinstance(train, _ArraySplit) and isinstance(test, _ArraySplit)
    if arrays and (train.x.dtype == np.uint8) != (test.x.dtype == np.uint8):
        raise NdcError(f"{what_test} is {test.x.dtype} but {what_train} is {train.x.dtype}; "
                       "store both as uint8 pixels or both as floats")


def _classes(train: _ArraySplit, test: _ArraySplit | None) -> int:
    return 1 + max(int(s.y.max()) for s in (train, test) if s is not None)


# ---------------------------------------------------------------------------
# Image folders


def _imagefolder_source(root: Path) -> _Raw:
    from PIL import Image

    if not root.is_dir():
        raise NdcError(f"imagefolder: {root}: no such directory")
    train_dir, test_dir = root, None
    if (root / "train").is_dir():
        train_dir = root / "train"
        test_dir = root / "test" if (root / "test").is_dir() else None
    class_names = _class_folders(train_dir)
    if not class_names:
        raise NdcError(f"imagefolder: {train_dir} has no class sub-folders; expected DIR/<class>/<image>.png")
    train_files = _image_files(train_dir, class_names, class_names)
    test_files = None
    if test_dir is not None:
        unknown = sorted(set(_class_folders(test_dir)) - set(class_names))
        if unknown:
            raise NdcError(f"imagefolder: {test_dir} has classes the training set lacks: {', '.join(unknown)}")
        test_classes = _class_folders(test_dir)
        if not test_classes:
            raise NdcError(f"imagefolder: {test_dir} has no class sub-folders; expected {test_dir}/<class>/<image>.png")
        test_files = _image_files(test_dir, test_classes, class_names)

    first = train_files[0][0]
    try:
        with Image.open(first) as im:
            mode = "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            width, height = im.size
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise NdcError(f"imagefolder: cannot read image {first} ({one_line(e)})") from None
    shape = (1 if mode == "L" else 3, height, width)

    def loader(files: list[tuple[Path, int]]) -> Callable[[int], tuple[np.ndarray, int]]:
        def load(i: int) -> tuple[np.ndarray, int]:
            path, label = files[i]
            try:
                with Image.open(path) as im:
                    im = im.convert(mode)
                    if im.size != (width, height):
                        # Mixed sizes are brought to the first image's size so a batch stacks.
                        im = im.resize((width, height), Image.Resampling.BILINEAR)
                    a = np.asarray(im, dtype=np.float32) / 255.0
            except Exception as e:  # noqa: BLE001 - as above: any failure to decode is the file's fault
                raise NdcError(f"imagefolder: cannot read image {path} ({one_line(e)})") from None
            return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)), label
        return load

    train = _LazySplit(len(train_files), loader(train_files), shape)
    test = None if test_files is None else _LazySplit(len(test_files), loader(test_files), shape)
    listing = [str(p.relative_to(root)) for p, _ in train_files + (test_files or [])]
    return _Raw("imagefolder", f"image folder {root.resolve()} ({'train/test folders' if test_dir else 'one folder'})",
                train, test, len(class_names), fingerprint=sha256_json(listing), class_names=class_names)


def _class_folders(directory: Path) -> list[str]:
    return sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(directory: Path, names: list[str], class_names: list[str]) -> list[tuple[Path, int]]:
    """Files of each class, interleaved class by class (a, b, c, a, b, c, ...).

    Interleaving gives every ``--limit`` prefix a mix of classes instead of the
    first class only, and needs no randomness.
    """
    per_class = []
    for name in names:
        files = sorted(p for p in (directory / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise NdcError(f"imagefolder: class folder {directory / name} has no images "
                           f"({', '.join(sorted(s.lstrip('.') for s in IMAGE_SUFFIXES))})")
        per_class.append([(p, class_names.index(name)) for p in files])
    out = []
    for k in range(max(len(files) for files in per_class)):
        out += [files[k] for files in per_class if k < len(files)]
    return out


# ---------------------------------------------------------------------------
# User code


def _function_source(spec: str) -> _Raw:
    from ndc.load import _import_file

    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise NdcError(f"{target}: no such file")
        module, stamp = _import_file(path), _file_stamp(path)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise NdcError(f"cannot import module {target!r} ({e}); give a path like data.py:{attr} "
                           f"or one of {DATA_SPEC_HELP}") from None
        file = getattr(module, "__file__", None)
        stamp = _file_stamp(Path(file)) if file else None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise NdcError(f"{target} has no callable {attr!r}")
    try:
        result = fn()
    except NdcError:
        raise
    except Exception as e:  # noqa: BLE001 - user code may raise anything; report it in one line
        raise NdcError(f"data function {spec} raised {type(e).__name__}: {one_line(e)}") from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise NdcError(f"data function {spec} returned {type(result).__name__}; expected a pair (train, test), "
                       "test may be None")
    train = _user_split(result[0], f"{spec} train")
    test = None if result[1] is None else _user_split(result[1], f"{spec} test")
    if test is not None:
        _same_examples(train, test, f"{spec} train", "test")
    classes = _user_classes(result[0], train, test, result[1])
    return _Raw("function", spec, train, test, classes, fingerprint={"target": spec, "file": stamp})


def _user_split(obj: Any, what: str) -> _Split:
    """(x_array, y_array) -> in-memory split; a map-style Dataset of (x, y) items -> lazy split."""
    from torch.utils.data import TensorDataset

    if isinstance(obj, TensorDataset) and len(obj.tensors) == 2:
        obj = obj.tensors  # whole tensors: the fast, vectorised path
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(a, (np.ndarray, torch.Tensor)) for a in obj):
        return _array_split(obj[0], obj[1], f"{what} x", f"{what} y")
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        raise NdcError(f"{what} is a {type(obj).__name__}; expected a map-style torch Dataset of (x, y) "
                       "or a pair (x_array, y_array)")
    n = len(obj)
    if n == 0:
        raise NdcError(f"{what} holds no examples")
    first, _ = _user_item(obj, 0, what, None)
    shape, mode = first.shape, _pil_mode(obj[0][0])

    def load(i: int) -> tuple[np.ndarray, int]:
        x, y = _user_item(obj, i, what, mode)
        if x.shape != shape:
            raise NdcError(f"{what}: example {i} has shape {fmt_shape(x.shape)} but example 0 has {fmt_shape(shape)}")
        return x, y

    return _LazySplit(n, load, tuple(shape))


def _pil_mode(x: Any) -> str | None:
    from PIL import Image

    if isinstance(x, Image.Image):
        return "L" if x.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
    return None


def _user_item(dataset: Any, i: int, what: str, mode: str | None) -> tuple[np.ndarray, int]:
    """One (x, y) item as (float32 array in canonical layout, int label)."""
    from PIL import Image

    try:
        item = dataset[i]
    except Exception as e:  # noqa: BLE001 - user code, as above
        raise NdcError(f"{what}: reading example {i} raised {type(e).__name__}: {one_line(e)}") from None
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise NdcError(f"{what}: example {i} is a {type(item).__name__}; expected a pair (x, y)")
    x, y = item[0], item[1]
    if isinstance(x, Image.Image):
        x = np.asarray(x.convert(mode or _pil_mode(x)))
    elif isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif x.dtype.kind == "f":
        x = x.astype(np.float32)
    else:
        raise NdcError(f"{what}: example {i} has dtype {x.dtype}; expected uint8 pixels or floating point")
    layout = _layout(x.shape, f"{what}: example {i}")
    if layout == "nhw":
        x = x[None]
    elif layout == "nhwc":
        x = x.transpose(2, 0, 1)
    try:
        label = int(y)
        if label != y or label < 0:
            raise ValueError
    except (TypeError, ValueError, RuntimeError):
        raise NdcError(f"{what}: example {i} has label {y!r}; expected a class index 0..K-1") from None
    return np.ascontiguousarray(x), label


def _user_classes(train_obj: Any, train: _Split, test: _Split | None, test_obj: Any) -> int:
    """Class count: the dataset's ``classes`` (list or int), else ``targets``, else the largest label + 1."""
    for obj in (train_obj, test_obj):
        declared = getattr(obj, "classes", None)
        if isinstance(declared, int) and declared > 0:
            return declared
        if isinstance(declared, (list, tuple)) and declared:
            return len(declared)
    labels = []
    for split, obj in ((train, train_obj), (test, test_obj)):
        if split is None:
            continue
        if isinstance(split, _ArraySplit):
            labels.append(int(split.y.max()))
        elif getattr(obj, "targets", None) is not None:
            labels.append(int(np.asarray(obj.targets).max()))
        else:
            # Slow path: one pass over the examples; expose `classes` to avoid it.
            labels.append(int(split.take(slice(None))[1].max()))
    return 1 + max(labels)


# ---------------------------------------------------------------------------
# Fitting an example to the model's input


@dataclass(frozen=True)
class _Fit:
    """How a raw example of shape ``raw`` becomes the model's ``shape``.

    Invariant: ``channel(spatial(x))`` maps (B, *raw) to (B, *shape). The
    spatial step comes first so augmentation and statistics can work on the
    raw channels (one grey channel instead of three repeated ones).
    """

    raw: tuple[int, ...]
    shape: tuple[int, ...]
    channels: str = "keep"                       # keep, repeat (1 -> C) or grey (3 -> 1)
    pad: tuple[int, int, int, int] | None = None  # F.pad order: left, right, top, bottom
    resize: tuple[int, int] | None = None
    reshape: bool = False

    @property
    def image(self) -> bool:
        return len(self.shape) == 3 and not self.reshape

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        if self.reshape:
            return x.reshape(x.shape[0], *self.shape)
        if self.pad is not None:
            return F.pad(x, self.pad)
        if self.resize is not None:
            return F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        return x

    def channel(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == "repeat":
            return x.expand(-1, self.shape[0], -1, -1)
        if self.channels == "grey":
            return (x * torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return x

    def describe(self) -> str:
        steps = []
        if self.reshape:
            steps.append(f"reshape {fmt_shape(self.raw)} to {fmt_shape(self.shape)}")
        if self.pad is not None:
            left, right, top, bottom = self.pad
            if len({left, right, top, bottom}) == 1:
                steps.append(f"zero-pad {left} px per side")
            else:
                steps.append(f"zero-pad left {left}, right {right}, top {top}, bottom {bottom} px")
        if self.resize is not None:
            steps.append(f"resize {self.raw[1]}x{self.raw[2]} to {self.resize[0]}x{self.resize[1]} (bilinear)")
        if self.channels == "repeat":
            steps.append(f"repeat the grey channel {self.shape[0]} times")
        if self.channels == "grey":
            steps.append("convert RGB to grey (BT.601 luma)")
        return ", ".join(steps) or "none"


def plan_fit(raw: Sequence[int], shape: Sequence[int] | None) -> _Fit:
    """Decide how examples of shape ``raw`` (C, H, W) or (D,) become the model's per-example ``shape``.

    Images to images: 1 channel -> C repeats, 3 -> 1 takes the luma, equal
    counts stay; a side up to ``PAD_LIMIT`` (25%) smaller is zero-padded
    (centred; an odd difference puts the extra pixel bottom/right), anything
    else is resized. Other ranks: reshaped when the element counts agree.

    >>> plan_fit((1, 28, 28), (3, 32, 32)).describe()
    'zero-pad 2 px per side, repeat the grey channel 3 times'
    """
    raw = tuple(int(d) for d in raw)
    if shape is None or tuple(shape) == raw:
        return _Fit(raw, raw)
    shape = tuple(int(d) for d in shape)
    if not shape or any(d <= 0 for d in shape):
        raise NdcError(f"bad input shape {fmt_shape(shape)}: expected positive sizes such as 3x32x32")
    if len(raw) == 3 and len(shape) == 3:
        (c, h, w), (C, H, W) = raw, shape
        if c == C:
            channels = "keep"
        elif c == 1:
            channels = "repeat"
        elif c == 3 and C == 1:
            channels = "grey"
        else:
            raise NdcError(f"the data has {c} channels and the model takes {C}; only 1 -> C and 3 -> 1 are converted")
        if (h, w) == (H, W):
            return _Fit(raw, shape, channels)
        if h <= H <= h * (1 + PAD_LIMIT) and w <= W <= w * (1 + PAD_LIMIT):
            top, left = (H - h) // 2, (W - w) // 2
            return _Fit(raw, shape, channels, pad=(left, W - w - left, top, H - h - top))
        return _Fit(raw, shape, channels, resize=(H, W))
    if math.prod(raw) == math.prod(shape):
        return _Fit(raw, shape, reshape=True)
    hint = ("; the input shape is per example, leave out the batch size"
            if len(shape) == len(raw) + 1 and shape[0] == 1 else "")
    raise NdcError(f"cannot fit examples of shape {fmt_shape(raw)} to the model's input {fmt_shape(shape)}: "
                   f"images need a C x H x W input, other data the same number of elements{hint}")


# ---------------------------------------------------------------------------
# Batch operations: all vectorised over the batch.


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    """Raw batch -> float32 tensor; uint8 pixels are scaled to [0, 1], floats are taken as they are."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))  # always a fresh, writable array
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


class _Moments:
    """Per-channel mean and variance over chunks, combined exactly (Chan et al.) in float64."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, x: torch.Tensor) -> None:
        v = (x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 2 else x.reshape(1, -1)).double()
        n_b = v.shape[1]
        if n_b == 0:
            return
        mean_b = v.mean(1)
        m2_b = ((v - mean_b[:, None]) ** 2).sum(1)
        mean_b, m2_b = mean_b.numpy(), m2_b.numpy()
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / n
        self.n = n

    def result(self) -> tuple[list[float], list[float]]:
        std = np.sqrt(self.m2 / max(self.n, 1))
        # A constant channel (all zero, say) would divide by zero; leave it unscaled.
        std = np.where(std > 1e-8, std, 1.0)
        return [float(m) for m in self.mean], [float(s) for s in std]


def _stat_channels(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def training_statistics(train: _Split, fit: _Fit) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the fitted training split, in one streaming pass.

    Memory stays bounded (chunks of about 16M values) however large the split.
    Repeated grey channels share one set of statistics, so they are computed on
    the single raw channel.
    """
    repeat = fit.channels == "repeat"
    moments = _Moments(fit.raw[0] if repeat else _stat_channels(fit.shape))
    chunk = max(1, _STATS_CHUNK_ELEMENTS // max(1, math.prod(fit.shape)))
    if isinstance(train, _LazySplit):
        chunk = min(chunk, 256)
    for start in range(0, len(train), chunk):
        x, _ = train.take(slice(start, min(start + chunk, len(train))))
        t = fit.spatial(_to_tensor(x))
        moments.add(t if repeat else fit.channel(t))
    mean, std = moments.result()
    if repeat:
        mean, std = mean * fit.shape[0], std * fit.shape[0]
    return mean, std


# ---------------------------------------------------------------------------
# The data source


class DataSource:
    """A resolved data spec: sizes, classes, the fitted example shape, statistics, and batches.

    Attributes (read-only by convention):

    * ``name``: the spec; ``classes``: number of classes (largest label + 1, or
      the number of class folders);
    * ``shape``: per-example shape of every batch (the model's input without
      the batch dimension, or the raw shape when no input shape was given);
    * ``mean``, ``std``: per-channel values that normalisation subtracts and
      divides by (0 and 1 when normalisation is off);
    * ``train_size``, ``test_size``: after the validation split and ``limit``.
    """

    def __init__(self, name: str, raw: _Raw, train: _Split, test: _Split, fit: _Fit, mean: list[float],
                 std: list[float], normalization: str, split: str, limit: int | None, stats_path: Path | None):
        self.name = name
        self.kind = raw.kind
        self.where = raw.where
        self.classes = raw.classes
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
        view = (1, len(mean), *([1] * (len(fit.shape) - 1))) if len(fit.shape) >= 2 else (1, 1)
        self._normalize = normalization != "none"
        self._mean = torch.tensor(mean, dtype=torch.float32).view(view)
        self._std = torch.tensor(std, dtype=torch.float32).view(view)

    def __repr__(self) -> str:
        return f"DataSource({self.name!r}, train={self.train_size}, test={self.test_size}, shape={self.shape})"

    def batches(self, split: str = "train", batch_size: int = 128, *, shuffle: bool = False, augment: bool = False,
                flip: bool = False, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``(x, y)`` of one split: x float32 (B, *shape), fitted and normalised; y int64 (B,).

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

    def _batches(self, data: _Split, batch_size: int, shuffle: bool, augment: bool, flip_: bool, seed: int,
                 epoch: int, drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([seed, epoch])
        n = len(data)
        order = rng.permutation(n) if shuffle else None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size:
                break
            x, y = data.take(slice(start, stop) if order is None else order[start:stop])
            yield self._prepare(x, augment, flip_, rng), torch.from_numpy(y)

    def _prepare(self, x: np.ndarray, augment: bool, flip_: bool, rng: np.random.Generator) -> torch.Tensor:
        fit = self._fit
        t = fit.spatial(_to_tensor(x))
        if augment and fit.image:
            # Augment before the channel repeat: one grey channel costs a third of three.
            t = translate(t, AUGMENT_SHIFT, rng)
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
            if isinstance(split, _LazySplit):
                for start in range(0, len(split), 256):
                    split.take(slice(start, start + 256))

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
        }


def parse_normalize(text: str) -> bool | tuple[list[float], list[float]]:
    """``stats`` -> True, ``none`` -> False, ``M[,M...]/S[,S...]`` -> (mean, std) for :func:`open_data`."""
    value = text.strip().lower()
    if value in ("stats", "auto", "true", "yes"):
        return True
    if value in ("none", "off", "false", "no"):
        return False
    mean_text, sep, std_text = value.partition("/")
    try:
        mean = [float(v) for v in mean_text.split(",") if v.strip()]
        std = [float(v) for v in std_text.split(",") if v.strip()]
    except ValueError:
        mean = std = []
    if not sep or not mean or not std:
        raise NdcError(f"bad normalisation {text!r}: expected stats, none, or MEAN/STD such as "
                       "0.485,0.456,0.406/0.229,0.224,0.225")
    return mean, std


def open_data(spec: str, input_shape: Sequence[int] | None = None, *, limit: int | None = None,
              workspace: Workspace | None = None, normalize: bool | tuple[Sequence[float], Sequence[float]] = True,
              seed: int = 0) -> DataSource:
    """Resolve ``spec`` into a :class:`DataSource` fitted to ``input_shape``.

    ``input_shape`` is the model's **per-example** shape, without the batch
    dimension (``plan.input_shape[1:]``, e.g. ``(3, 32, 32)``); None keeps the
    raw shape. ``limit`` keeps the first N training and N test examples.
    ``normalize``: True uses training statistics (read from, or written to,
    ``workspace/data/<hash>.json`` when a workspace is given), False none, a
    pair ``(mean, std)`` those values (one per channel, or one for all).
    ``seed`` draws the validation split of a source without a test set; keep
    the default so that every stage holds out the same examples.

    >>> data = open_data("fashion-mnist", (3, 32, 32), limit=512)  # doctest: +SKIP
    >>> x, y = next(data.batches("train", 256, shuffle=True, augment=True))  # doctest: +SKIP
    >>> x.shape, y.dtype  # doctest: +SKIP
    (torch.Size([256, 3, 32, 32]), torch.int64)
    """
    if limit is not None and limit < 1:
        raise NdcError(f"--limit must be a positive number of examples, not {limit}")
    from ndc.tokens import token_source  # token ids (an integer .npz, text:FILE): see ndc.tokens

    tokens = token_source(spec, input_shape, limit=limit)
    if tokens is not None:
        return tokens
    raw = _resolve(spec)
    train, test = raw.train, raw.test
    if test is None:
        train, test = _validation_split(train, seed, spec)
        split = f"validation: {VALIDATION_FRACTION:.0%} of the training set held out, seed {seed}"
    else:
        split = "the source's own test set"
    # Statistics always come from the whole training split, so every stage
    # normalises the same way whatever --limit it runs with.
    full_train = train
    if limit is not None:
        train, test = train.head(limit), test.head(limit)
    fit = plan_fit(train.example_shape, input_shape)
    channels = _stat_channels(fit.shape)

    stats_path = None
    if normalize is True:
        key = {"version": STATS_VERSION, "spec": spec, "source": raw.fingerprint, "shape": list(fit.shape),
               "raw_shape": list(fit.raw), "seed": seed if raw.test is None else None}
        mean, std, stats_path = _cached_statistics(workspace, key, full_train, fit, raw.classes, len(test))
        normalization = "training statistics"
    elif normalize is False or normalize is None:
        mean, std, normalization = [0.0] * channels, [1.0] * channels, "none"
    else:
        mean, std = _explicit_statistics(normalize, channels)
        normalization = "given"
    return DataSource(spec, raw, train, test, fit, mean, std, normalization, split, limit, stats_path)


def _validation_split(train: _Split, seed: int, spec: str) -> tuple[_Split, _Split]:
    """Hold out ``VALIDATION_FRACTION`` of the examples, drawn with ``seed``; both parts keep the source's order."""
    n = len(train)
    if n < 2:
        raise NdcError(f"{spec} has {n} example(s) and no test set; too few to hold out a validation split")
    n_val = min(n - 1, max(1, round(n * VALIDATION_FRACTION)))
    perm = np.random.default_rng(seed).permutation(n)
    return train.subset(np.sort(perm[n_val:])), train.subset(np.sort(perm[:n_val]))


def _cached_statistics(ws: Workspace | None, key: dict, train: _Split, fit: _Fit, classes: int,
                       test_size: int) -> tuple[list[float], list[float], Path | None]:
    """Training statistics from the workspace when recorded for exactly this key, else computed and recorded."""
    if ws is None:
        return (*training_statistics(train, fit), None)
    rel = f"{STATS_DIR}/{sha256_json(key)[:16]}.json"
    if ws.verified(rel, made_from=key):
        stored = ws.read_json(rel)
        if stored.get("key") == key and len(stored.get("mean", [])) == _stat_channels(fit.shape):
            return stored["mean"], stored["std"], ws.path(rel)
    mean, std = training_statistics(train, fit)
    ws.write_json(rel, {"key": key, "mean": mean, "std": std, "train": len(train), "test": test_size,
                        "classes": classes, "shape": list(fit.shape)})
    ws.record(rel, made_from=key)
    return mean, std, ws.path(rel)


def _explicit_statistics(normalize: tuple[Sequence[float], Sequence[float]],
                         channels: int) -> tuple[list[float], list[float]]:
    try:
        mean, std = ([float(v) for v in part] for part in normalize)
    except (TypeError, ValueError):
        raise NdcError("normalisation must be True, False or a pair (mean, std) of number lists") from None
    for what, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise NdcError(f"normalisation {what} has {len(values)} values; "
                           f"the model's input has {channels} channel(s)")
    mean, std = (v * channels if len(v) == 1 else v for v in (mean, std))
    if any(not s > 0 for s in std):
        raise NdcError(f"normalisation std must be positive, got {std}")
    return mean, std


# ---------------------------------------------------------------------------
# helpers


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]

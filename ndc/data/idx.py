"""Built-in sets: IDX files (MNIST, Fashion-MNIST) and scikit-learn's bundled digits."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ndc.data.splits import ArraySplit, Raw, array_classes, array_split, file_stamp
from ndc.errors import NdcError, fmt_shape

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 and 1 dimensions
_IDX_NAMES = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def open_fashion_mnist(spec: str, arg: str) -> Raw:
    """``fashion-mnist`` (Debian's package) or ``fashion-mnist:DIR``."""
    if ":" in spec and not arg:
        raise NdcError(f"data spec {spec!r} needs a directory after the colon, e.g. fashion-mnist:data/fashion-mnist")
    return _idx_source(Path(arg).expanduser() if arg else None, "fashion-mnist")


def open_mnist(spec: str, arg: str) -> Raw:
    """``mnist:DIR``: IDX files, gzipped or not."""
    if ":" in spec and not arg:
        raise NdcError(f"data spec {spec!r} needs a directory after the colon, e.g. mnist:data/mnist")
    if not arg:
        raise NdcError("mnist needs the directory of its IDX files: --data mnist:DIR "
                       "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)")
    return _idx_source(Path(arg).expanduser(), "mnist")


def _idx_source(directory: Path | None, name: str) -> Raw:
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

    def split(part: str) -> ArraySplit | None:
        if files[part, "images"] is None:
            return None
        images, labels = files[part, "images"], files[part, "labels"]
        x, y = read_idx(images, "images"), read_idx(labels, "labels")
        if len(x) != len(y):
            raise NdcError(f"{name}: {images.name} has {len(x)} images but {labels.name} has {len(y)} labels")
        return array_split(x, y, str(images), str(labels))

    train, test = split("train"), split("test")
    used = [p for p in files.values() if p is not None]
    return Raw("idx", f"IDX files in {directory.resolve()}", train, test, array_classes(train, test),
               fingerprint=[file_stamp(p) for p in sorted(used)])


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


def open_digits(spec: str, arg: str) -> Raw:
    """scikit-learn's bundled 8x8 digits: nothing is downloaded."""
    if arg or spec != "digits":
        raise NdcError(f"data spec {spec!r}: digits takes no argument (write --data digits)")
    from sklearn import __version__ as sklearn_version
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are counts 0..16; scaled to [0, 1] like every other source.
    x = (bunch.images / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return Raw("digits", "scikit-learn's bundled digits (8x8 grey, 1797 images, no official test split)",
               ArraySplit(x, y, "nhw", names=("digits images", "digits labels")), None, 10,
               fingerprint={"sklearn": sklearn_version}, class_names=[str(i) for i in range(10)])

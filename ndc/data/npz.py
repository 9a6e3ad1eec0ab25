"""``file.npz``: arrays ``x`` and optional ``y``, ``x_test``, ``y_test``; uncompressed members are memory-mapped."""

from __future__ import annotations

import math
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from ndc.data.splits import Raw, array_classes, array_split, binary_targets, file_stamp, same_examples
from ndc.errors import NdcError


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



def open_npz(spec: str, arg: str) -> Raw:
    """``x`` (examples) is required; ``y`` may be left out (unlabelled data); ``x_test``/``y_test`` follow ``x``/``y``."""
    path = Path(arg).expanduser()
    arrays = load_npz(path)
    if "x" not in arrays:
        found = ", ".join(sorted(arrays)) or "nothing"
        raise NdcError(f"{path} has no array 'x' (found: {found}); "
                       "save with np.savez(path, x=examples, y=labels), y optional")
    if "x_test" not in arrays and "y_test" in arrays:
        raise NdcError(f"{path} has y_test without x_test; give both or neither")
    if "x_test" in arrays and ("y" in arrays) != ("y_test" in arrays):
        have, lack = ("x_test", "y_test") if "y" in arrays else ("y_test", "y")
        raise NdcError(f"{path} has {have} without {lack}; label both splits or neither")
    train = array_split(arrays["x"], arrays.get("y"), f"{path}: x", f"{path}: y")
    test = None
    if "x_test" in arrays:
        test = array_split(arrays["x_test"], arrays.get("y_test"), f"{path}: x_test", f"{path}: y_test")
        same_examples(train, test, f"{path}: x", "x_test")
    return Raw("npz", str(path.resolve()), train, test, array_classes(train, test), fingerprint=file_stamp(path),
               binary=binary_targets(train, test))

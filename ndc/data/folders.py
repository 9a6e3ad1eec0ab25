"""``imagefolder:DIR``: one sub-folder per class, images read one by one with Pillow."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ndc.data.splits import LazySplit, Raw
from ndc.errors import NdcError, one_line
from ndc.workspace import sha256_json

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def open_imagefolder(spec: str, arg: str) -> Raw:
    if not arg:
        raise NdcError("imagefolder needs a directory: --data imagefolder:DIR (one sub-folder per class)")
    return _imagefolder_source(Path(arg).expanduser())

def _imagefolder_source(root: Path) -> Raw:
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
            mode = "L" if im.mode in GREY_MODES else "RGB"
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

    train = LazySplit(len(train_files), loader(train_files), shape, what=f"imagefolder {train_dir}")
    test = None if test_files is None else LazySplit(len(test_files), loader(test_files), shape,
                                                     what=f"imagefolder {test_dir}")
    listing = [str(p.relative_to(root)) for p, _ in train_files + (test_files or [])]
    return Raw("imagefolder", f"image folder {root.resolve()} ({'train/test folders' if test_dir else 'one folder'})",
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



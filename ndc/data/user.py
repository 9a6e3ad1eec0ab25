"""``module:function`` / ``file.py:function``: user code returning ``(train, test)``.

Each split is a pair of arrays ``(x, y)`` (the vectorised path; ``y`` may be
None), an array ``x`` alone (no labels), or a map-style dataset whose items
are ``(x, y)`` or ``x`` alone, loaded one by one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ndc.data.folders import GREY_MODES
from ndc.data.splits import (ArraySplit, LazySplit, Raw, array_classes, array_split, binary_targets, content_digest, file_stamp,
                             first_nonfinite, layout_of, same_examples)
from ndc.errors import NdcError, fmt_shape, one_line
from ndc.usercode import find_function


def open_function(spec: str, arg: str) -> Raw:
    from ndc.data.registry import DATA_SPEC_HELP

    fn, file = find_function(spec, "data.py", DATA_SPEC_HELP)
    stamp = file_stamp(file) if file is not None else None
    try:
        result = fn()
    except NdcError:
        raise
    except Exception as e:  # noqa: BLE001 - user code may raise anything; report it in one line
        raise NdcError(f"data function {spec} raised {type(e).__name__}: {one_line(e)}") from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise NdcError(f"data function {spec} returned {type(result).__name__}; expected a pair (train, test), "
                       "test may be None")
    a, b = result
    if (all(hasattr(p, "shape") and len(p.shape) >= 1 for p in (a, b)) and a.shape[0] == b.shape[0]
            and tuple(a.shape[1:]) != tuple(b.shape[1:])):  # two arrays (unlabelled train, test)? No: one set's x and y
        raise NdcError(f"data function {spec} returned two arrays, one (x, y) pair; it returns two data sets, "
                       "(train, test), each (x, y) or a Dataset: ((x, y), None) for training examples alone")
    train = _user_split(result[0], f"{spec} train")
    test = None if result[1] is None else _user_split(result[1], f"{spec} test")
    if test is not None:
        same_examples(train, test, f"{spec} train", "test")
    classes = _user_classes(result[0], train, test, result[1])
    arrays = [s for s in (train, test) if isinstance(s, ArraySplit)]
    return Raw("function", spec, train, test, classes,
               fingerprint={"target": spec, "file": stamp, "content": [content_digest(train), content_digest(test)]},
               binary=_binary(train, test, arrays))


def _is_array(a: Any) -> bool:
    return isinstance(a, (np.ndarray, torch.Tensor))


def _user_split(obj: Any, what: str):
    """(x_array, y_array or None) or x_array -> in-memory split; a map-style Dataset of items -> lazy split."""
    from torch.utils.data import TensorDataset

    if isinstance(obj, TensorDataset) and len(obj.tensors) in (1, 2):
        obj = obj.tensors if len(obj.tensors) == 2 else obj.tensors[0]  # whole tensors: the fast, vectorised path
    if _is_array(obj):
        return array_split(obj, None, f"{what} x", f"{what} y")
    if (isinstance(obj, (tuple, list)) and len(obj) == 2 and _is_array(obj[0])
            and (obj[1] is None or _is_array(obj[1]))):
        return array_split(obj[0], obj[1], f"{what} x", f"{what} y")
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        raise NdcError(f"{what} is a {type(obj).__name__}; expected a map-style torch Dataset of (x, y) "
                       "or a pair (x_array, y_array)")
    n = len(obj)
    if n == 0:
        raise NdcError(f"{what} holds no examples")
    first, label = _user_item(obj, 0, what, None)
    labels = "none" if label is None else ("classes" if isinstance(label, int) else "targets")
    target_shape = tuple(label.shape) if labels == "targets" else ()
    shape, mode = first.shape, _pil_mode(_example_of(obj[0]))

    def load(i: int) -> tuple[np.ndarray, Any]:
        x, y = _user_item(obj, i, what, mode)
        if x.shape != shape:
            raise NdcError(f"{what}: example {i} has shape {fmt_shape(x.shape)} but example 0 has {fmt_shape(shape)}")
        kind = "none" if y is None else ("classes" if isinstance(y, int) else "targets")
        if kind != labels or (kind == "targets" and tuple(y.shape) != target_shape):
            raise NdcError(f"{what}: example {i} has a label unlike example 0's; give every example the same kind")
        return x, y

    return LazySplit(n, load, tuple(shape), labels=labels, target_shape=target_shape, what=what)


def _example_of(item: Any) -> Any:
    return item[0] if isinstance(item, (tuple, list)) else item


def _pil_mode(x: Any) -> str | None:
    from PIL import Image

    if isinstance(x, Image.Image):
        return "L" if x.mode in GREY_MODES else "RGB"
    return None


def _user_item(dataset: Any, i: int, what: str, mode: str | None) -> tuple[np.ndarray, Any]:
    """One item as (float32 array in canonical layout, label): an int class, a float32 target array, or None."""
    from PIL import Image

    try:
        item = dataset[i]
    except Exception as e:  # noqa: BLE001 - user code, as above
        raise NdcError(f"{what}: reading example {i} raised {type(e).__name__}: {one_line(e)}") from None
    if isinstance(item, (tuple, list)):
        if len(item) < 2:
            raise NdcError(f"{what}: example {i} is a {type(item).__name__} of {len(item)}; expected (x, y) or x")
        x, y = item[0], item[1]
    elif _is_array(item) or isinstance(item, Image.Image):
        x, y = item, None
    else:
        raise NdcError(f"{what}: example {i} is a {type(item).__name__}; expected a pair (x, y) or an example x")
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
    if first_nonfinite(x[None]) is not None:
        raise NdcError(f"{what}: example {i} holds a non-finite value (NaN or infinity); fix or drop that example")
    layout = layout_of(x.shape, f"{what}: example {i}")
    if layout == "nhw":
        x = x[None]
    elif layout == "nhwc":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x), _user_label(y, what, i)


def _user_label(y: Any, what: str, i: int) -> Any:
    if y is None:
        return None
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    if isinstance(y, np.ndarray) and y.ndim > 0:
        if y.dtype.kind not in "biuf":
            raise NdcError(f"{what}: example {i} has a target of dtype {y.dtype}; expected numbers")
        target = y.astype(np.float32)
        if first_nonfinite(target[None]) is not None:
            raise NdcError(f"{what}: example {i} has a non-finite target (NaN or infinity); fix or drop that example")
        return target
    try:
        label = int(y)
        if label != y or label < 0:
            raise ValueError
    except (TypeError, ValueError, RuntimeError):
        raise NdcError(f"{what}: example {i} has label {y!r}; expected a class index 0..K-1 "
                       "or an array of targets") from None
    return label


def _user_classes(train_obj: Any, train, test, test_obj: Any) -> int | None:
    """Class count: the dataset's ``classes`` (list or int), else ``targets``, else the largest label + 1."""
    if train.labels != "classes":
        return None
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
        if isinstance(split, ArraySplit):
            labels.append(array_classes(split, None) - 1)
        elif getattr(obj, "targets", None) is not None:
            labels.append(int(np.asarray(obj.targets).max()))
        else:
            # Slow path: one pass over the examples; expose `classes` to avoid it.
            labels.append(int(split.take(slice(None))[1].max()))
    return 1 + max(labels)


def _binary(train, test, arrays: list[ArraySplit]) -> bool:
    """Multi-label 0/1 targets: every target of array splits, or the first example of a dataset."""
    if train.labels != "targets":
        return False
    if len(arrays) == len([s for s in (train, test) if s is not None]):
        return binary_targets(*arrays)
    _, y = train.take(slice(0, 1))
    return bool(np.isin(y, (0, 1)).all())

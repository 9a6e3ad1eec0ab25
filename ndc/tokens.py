"""Token data: integer ids for language models, as a data source every stage reads like any other.

Two specs, both read from local files (nothing is downloaded):

* ``file.npz`` whose ``x`` is an integer array ``(N, L)`` of token ids, with
  optional labels ``y`` (``(N,)``, for a sequence classifier) and optional
  ``x_test`` / ``y_test``. Without labels, the labels are the next tokens
  (``(N, L)``: ``x`` shifted by one, -100 at the last position), what a
  language model predicts; a model whose output is not per position
  treats such data as unlabelled (:func:`ndc.heads.label_kind`).
* ``text:FILE`` or ``text:FILE,TOKENIZER``: a UTF-8 text file tokenised with
  a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library; by default
  the ``tokenizer.json`` beside FILE), cut into consecutive sequences of the
  model's length ``L``; the labels are the next tokens (across sequence
  ends, since the text runs on).

Ids are batches of int64 ``(B, L)``, never normalised or augmented. Without a
test split, the last fifth of the sequences is held out (the same ones
whatever ``limit``). :func:`token_source` is what :func:`ndc.data.open_data`
asks first; it returns None for every other spec.

>>> data = token_source("text:corpus.txt", (16,))          # doctest: +SKIP
>>> next(data.batches("train", 8))[0].dtype               # doctest: +SKIP
torch.int64
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ndc.errors import NdcError, first_line

HELD_OUT = 0.2


def token_source(spec: str, input_shape: Sequence[int] | None = None, *, limit: int | None = None,
                 inputs: Any = None) -> "TokenData | None":
    """The token data of ``spec``, or None when ``spec`` is not token data (an image .npz, another spec).

    ``inputs``: the model's :class:`~ndc.passes.inputs.InputSpec`, when known. For a model reading token ids, ids at
    or above its vocabulary and data that is not ids (a float .npz, images) are one line each; for a model reading
    floats, a uint8 .npz is image data, another integer one (N, L) is refused (ids or integer features), and text
    is refused.
    """
    integer = getattr(inputs, "is_integer", None)
    if spec.startswith("text:"):
        if integer is False:
            raise NdcError(f"{spec}: text is read as token ids, but the model reads floats (its plan was not traced "
                           "with --input-dtype int64)")
        data = _text(spec, input_shape, limit)
    elif spec.endswith(".npz") and (integer or (integer is None and _integer_npz(Path(spec).expanduser()))):
        data = _npz(spec, input_shape, limit)
    elif spec.endswith(".npz") and integer is False and _integer_npz(Path(spec).expanduser(), pixels=False):
        _refuse_ids(spec, input_shape)  # a model reading floats: not pixels (uint8) but ids
    elif integer:
        raise NdcError(f"{spec}: the model reads integer token ids, and this is not token data; give an .npz whose x "
                       "holds integer ids (N, L), or text:FILE")
    else:
        return None
    if integer:
        data.check_vocabulary(inputs.high)
    return data


class TokenData:
    """Token-id sequences: the :class:`ndc.data.DataSource` interface (sizes, shape, batches, describe)."""

    kind = "tokens"
    normalization = "none (token ids)"
    stats_path = None
    class_names = None
    labels = "classes"  # a class per sequence, or per position (the next token; -100 where there is none)
    binary = False
    target_shape = None

    def __init__(self, name: str, where: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 split: str, limit: int | None):
        self.name, self.where, self.split, self.limit = name, where, split, limit
        if limit is not None:
            train, test = tuple(a[:limit] for a in train), tuple(a[:limit] for a in test)
        self._splits = {"train": train, "test": test}
        self.shape = self.raw_shape = tuple(int(d) for d in train[0].shape[1:])
        self.mean, self.std = [0.0], [1.0]  # never applied: ids are not normalised
        self.train_size, self.test_size = len(train[0]), len(test[0])
        self.max_id = int(max(train[0].max(initial=0), test[0].max(initial=0)))
        # () one class per sequence (the user's y); (L,) the next token per position, which ndc made up from the ids
        # and which only a language model's per-position output uses (ndc.heads.label_kind)
        self.label_shape = tuple(int(d) for d in train[1].shape[1:])
        self.next_tokens = bool(self.label_shape)
        labels = np.concatenate([train[1].ravel(), test[1].ravel()])
        self.classes = int(labels.max(initial=0)) + 1 if not self.next_tokens else self.max_id + 1

    def __repr__(self) -> str:
        return f"TokenData({self.name!r}, train={self.train_size}, test={self.test_size}, shape={self.shape})"

    def batches(self, split: str = "train", batch_size: int = 128, *, shuffle: bool = False, augment: bool = False,
                flip: bool = False, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``(ids, y)``, both int64; ``augment`` and ``flip`` do nothing to token ids."""
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        x, y = self._splits[split]
        order = np.random.default_rng([seed, epoch]).permutation(len(x)) if shuffle else np.arange(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start: start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yield torch.from_numpy(x[idx].astype(np.int64)), torch.from_numpy(y[idx].astype(np.int64))

    @functools.cached_property
    def fingerprint(self) -> list:
        """What the ids are: a hash of both splits (in memory, so hashed rather than stamped; wherever they were read)."""
        import hashlib

        h = hashlib.sha256()
        for x, y in self._splits.values():
            h.update(np.ascontiguousarray(x).tobytes())
            h.update(np.ascontiguousarray(y).tobytes())
        return ["token ids", h.hexdigest()]

    def check(self) -> None:
        """Everything was checked when read."""

    def check_vocabulary(self, vocabulary: int) -> None:
        """Refuse ids the model has no embedding for: one line naming the largest id and the vocabulary size."""
        if self.max_id < vocabulary:
            return
        for split, (x, _) in self._splits.items():
            rows = np.flatnonzero((x == self.max_id).any(axis=1))
            if len(rows):
                raise NdcError(f"{self.name}: token id {self.max_id} ({split} example {int(rows[0])}) is the largest id, "
                               f"but the model's vocabulary has {vocabulary} ids (0..{vocabulary - 1}); "
                               "tokenise with the model's own tokenizer")

    def check_classes(self, outputs: int, hint: str = "") -> None:
        """Refuse labels (token ids) the model has no output for: one line naming the first such example."""
        for split, (_, y) in self._splits.items():
            bad = np.argwhere(y >= outputs)
            if len(bad):
                i = int(bad[0][0])
                raise NdcError(f"{self.name}: {split} example {i} has label {int(y.reshape(len(y), -1)[i].max())}, outside "
                               f"the model's {outputs} classes (0..{outputs - 1})" + (f"; {hint}" if hint else ""))

    def describe(self) -> dict:
        """The JSON of ``ndc data``: the keys of :meth:`ndc.data.DataSource.describe` (mean and std null: ids are not
        normalised), then ``max_token_id`` and ``label_shape`` ([] a class per sequence, [L] the next tokens)."""
        return {"train": self.train_size, "test": self.test_size, "classes": self.classes, "shape": list(self.shape),
                "mean": None, "std": None, "spec": self.name, "source": self.where, "raw_shape": list(self.shape),
                "fit": "none", "split": self.split, "normalization": self.normalization, "limit": self.limit,
                "statistics": None, "labels": self.labels, "target_shape": None, "binary": self.binary,
                "max_token_id": self.max_id, "label_shape": list(self.label_shape)}


# ------------------------------------------------------------------ npz


def _integer_npz(path: Path, pixels: bool = True) -> bool:
    """True when ``path`` is an npz whose ``x`` holds integers (uint8 too unless not ``pixels``), (N, L) (read from
    the array header only)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return ("x" in z.files and np.issubdtype(z["x"].dtype, np.integer) and z["x"].ndim == 2
                    and (pixels or z["x"].dtype != np.uint8))
    except (OSError, ValueError, zipfile.BadZipFile):
        return False  # not ours: the image/vector parser reports what is wrong with it


def _not_ids(spec: str, x: np.ndarray, input_shape) -> NdcError:
    """Token ids ``x`` given to a model that reads images or floats: what the data is and what the model reads (no
    advice to re-partition: another sequence length does not make an image model read ids)."""
    shape = list(input_shape) if input_shape is not None else []
    if len(shape) == 3:  # (N, L) integers beside an image model: a token file
        return NdcError(f"{spec} holds token ids ({x.dtype} sequences of length {x.shape[1]}), but the model reads "
                        f"images {shape}, not token ids")
    reads = f"floats of shape {shape}" if shape else "floats"  # integer features, or ids for a model traced for floats
    return NdcError(f"{spec}: x holds integers ({x.dtype}, {x.shape[1]} per example), but the model reads {reads}: "
                    "save x as float32 if they are features; token ids need a teacher partitioned with --input-dtype int64")


def _refuse_ids(spec: str, input_shape) -> None:
    with np.load(Path(spec).expanduser(), allow_pickle=False) as z:
        raise _not_ids(spec, z["x"], input_shape)


def _npz(spec: str, input_shape, limit) -> TokenData:
    from ndc.data.npz import load_npz

    # load_npz memory-maps what np.savez stored uncompressed, and a broken file is one line
    path = Path(spec).expanduser()
    arrays = load_npz(path)
    if "x" not in arrays:
        raise NdcError(f"{path} has no array 'x' (found: {', '.join(sorted(arrays)) or 'nothing'}); "
                       "save token ids with np.savez(path, x=ids)")
    x = _ids(arrays["x"], f"{path}: x")
    y = _labels(arrays.get("y"), x, f"{path}: y")
    if "x_test" in arrays:
        x_test = _ids(arrays["x_test"], f"{path}: x_test")
        test = (x_test, _labels(arrays.get("y_test"), x_test, f"{path}: y_test"))
        split = "the source's own test set"
    else:
        x, y, test, split = _hold_out(x, y)
    _check_length(x, input_shape, spec)
    _check_length(test[0], input_shape, spec)
    return TokenData(spec, str(path), (x, y), test, split, limit)


def _ids(x: np.ndarray, what: str) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.integer):
        raise NdcError(f"{what} holds {x.dtype} values, but the model reads integer token ids; "
                       "save the ids as integers (x.astype(np.int64))")
    if x.ndim != 2:
        raise NdcError(f"{what} must be integer token ids of shape (N, L), got {x.dtype} {list(x.shape)}")
    if x.size and x.min() < 0:
        raise NdcError(f"{what} holds negative token ids")
    return x


def _labels(y, x: np.ndarray, what: str) -> np.ndarray:
    if y is None:
        return next_tokens(x)
    n = len(x)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise NdcError(f"{what} must be {n} integer labels, got {y.dtype} {list(y.shape)}")
    return y


def next_tokens(x: np.ndarray, following: np.ndarray | None = None) -> np.ndarray:
    """Labels of a language model: each position's next id; the last position's is ``following`` or -100 (none)."""
    y = np.full(x.shape, -100, dtype=np.int64)
    y[:, :-1] = x[:, 1:]
    if following is not None:
        y[:, -1] = following
    return y


def _hold_out(x: np.ndarray, y: np.ndarray):
    """The last fifth as the test split: consecutive text stays together, and it never depends on --limit."""
    if len(x) < 2:
        raise NdcError(f"token data has {len(x)} sequence(s) and no test set; too few to hold out a validation split")
    n_val = max(1, round(len(x) * HELD_OUT))
    return x[:-n_val], y[:-n_val], (x[-n_val:], y[-n_val:]), f"validation: the last {HELD_OUT:.0%} of the sequences"


def _check_length(x: np.ndarray, input_shape, spec: str) -> None:
    if input_shape is not None and len(input_shape) == 3:  # an image model: another length would not help
        raise _not_ids(spec, x, input_shape)
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise NdcError(f"{spec} has sequences of length {x.shape[1]}; the model reads {list(input_shape)} "
                       "(partition with --input-shape 1,L for that length)")


# ----------------------------------------------------------------- text


def _text(spec: str, input_shape, limit) -> TokenData:
    rest = spec[len("text:"):]
    file, _, tokenizer = rest.partition(",")
    path = Path(file).expanduser()
    if not file or not path.is_file():
        raise NdcError(f"{spec}: no such text file (expected text:FILE or text:FILE,TOKENIZER.json)")
    tok_path = Path(tokenizer).expanduser() if tokenizer else path.parent / "tokenizer.json"
    if not tok_path.is_file():
        raise NdcError(f"{spec}: no tokenizer at {tok_path}; give text:FILE,path/to/tokenizer.json")
    if input_shape is None or len(input_shape) != 1:
        raise NdcError(f"{spec}: text data needs the model's sequence length (a plan whose input is 1,L token ids)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise NdcError("text data needs the tokenizers library: pip install tokenizers") from None
    try:
        tokenizer_ = Tokenizer.from_file(str(tok_path))
    except Exception as e:
        raise NdcError(f"{tok_path} is not a tokenizers tokenizer.json: {first_line(e)}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NdcError(f"{path} is not UTF-8 text: {first_line(e)}") from None
    ids = np.asarray(tokenizer_.encode(text).ids, dtype=np.int64)
    length = int(input_shape[0])
    n = len(ids) // length
    if n < 2:
        raise NdcError(f"{path} tokenises to {len(ids)} ids: fewer than two sequences of {length}")
    x = ids[: n * length].reshape(n, length)
    following = np.append(ids[length: n * length: length], ids[n * length] if len(ids) > n * length else -100)
    x, y, test, split = _hold_out(x, next_tokens(x, following))
    return TokenData(spec, f"{path} tokenised with {tok_path}", (x, y), test, split, limit)


# ---------------------------------------------------------- what to suggest

IMAGE_DATA = "e.g. --data fashion-mnist or --data digits"
TOKEN_DATA = ("the model reads token ids: e.g. --data ids.npz (an integer array x of shape (N, L)) or --data text:FILE "
              "(tokenised with the tokenizer.json beside it)")


def data_example(integer: bool | None) -> str:
    """How to give --data, for a message: token data for a model reading token ids, else images."""
    return TOKEN_DATA if integer else IMAGE_DATA


def reads_token_ids(ws) -> bool | None:
    """Whether the workspace's teacher reads token ids (None: no readable plan)."""
    from ndc.workspace import PLAN

    try:
        return ws.load_plan().inputs.is_integer if ws.exists(PLAN) else None
    except (NdcError, OSError):
        return None

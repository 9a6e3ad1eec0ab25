"""Data sources: one ``--data SPEC`` parser, fitting examples to the teacher's input, normalisation.

Every command that reads data calls :func:`open_data` and iterates
:meth:`DataSource.batches`. The package, by job:

* :mod:`~ndc.data.registry`: which source opens a spec (one entry per source),
  with the sources themselves in :mod:`~ndc.data.idx` (IDX files, digits),
  :mod:`~ndc.data.npz`, :mod:`~ndc.data.folders` and :mod:`~ndc.data.user`;
* :mod:`~ndc.data.splits`: examples as stored, their labels and the checks
  every array passes;
* :mod:`~ndc.data.fit`: fitting an example to the model's input;
* :mod:`~ndc.data.stats`: normalisation statistics;
* :mod:`~ndc.data.batches`: the :class:`DataSource` and its batches.

The guarantees, which the stages rely on:

* **One parser.** ``SPEC`` is one of ``fashion-mnist[:DIR]``, ``mnist:DIR``
  (IDX files, gzipped or not), ``digits`` (scikit-learn's bundled 8x8 set),
  ``path.npz`` (arrays ``x``, optional ``y``, ``x_test``, ``y_test``),
  ``imagefolder:DIR`` (one sub-folder per class, optional ``train``/``test``)
  or ``module:function`` / ``file.py:function`` (user code returning
  ``(train, test)``). See ``docs/data.md``.
* **Labels of any kind, or none.** Class indices, float targets (multi-label
  0/1 rows, regression values) or nothing at all; stages that need labels
  say so, the others work without.
* **Checked when opened.** A non-finite value, a negative class label or an
  empty split is one line naming the file and the first bad example; class
  labels the model has no output for are refused by
  :meth:`DataSource.check_classes` before training or scoring.
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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ndc.data.batches import AUGMENT_SHIFT, DataSource, augment_shift, flip, to_tensor, translate
from ndc.data.fit import PAD_LIMIT, Fit, plan_fit
from ndc.data.folders import IMAGE_SUFFIXES
from ndc.data.idx import FASHION_MNIST_DIR, read_idx
from ndc.data.npz import load_npz
from ndc.data.registry import DATA_SPEC_HELP, SOURCES, SourceEntry, resolve
from ndc.data.splits import LABELS, Split
from ndc.data.stats import (STATS_DIR, STATS_VERSION, cached_statistics, explicit_statistics, parse_normalize,
                            stat_channels, training_statistics)
from ndc.errors import NdcError

if TYPE_CHECKING:
    from ndc.workspace import Workspace

__all__ = [
    "AUGMENT_SHIFT", "DATA_SPEC_HELP", "FASHION_MNIST_DIR", "IMAGE_SUFFIXES", "LABELS", "PAD_LIMIT", "SOURCES",
    "STATS_DIR", "STATS_VERSION", "VALIDATION_FRACTION", "DataSource", "Fit", "SourceEntry", "augment_shift", "flip", "load_npz",
    "open_data", "parse_normalize", "plan_fit", "read_idx", "resolve", "to_tensor", "training_statistics", "translate",
]

# Held out when a source has no test set. One fifth keeps the digits split (359
# examples) large enough for accuracy to move in steps below a point.
VALIDATION_FRACTION = 0.2


def open_data(spec: str, input_shape: Sequence[int] | None = None, *, limit: int | None = None,
              workspace: Workspace | None = None, normalize: bool | tuple[Sequence[float], Sequence[float]] = True,
              seed: int = 0, inputs: Any = None) -> DataSource:
    """Resolve ``spec`` into a :class:`DataSource` fitted to ``input_shape``.

    ``input_shape`` is the model's **per-example** shape, without the batch
    dimension (``plan.input_shape[1:]``, e.g. ``(3, 32, 32)``); None keeps the
    raw shape. ``limit`` keeps the first N training and N test examples.
    ``normalize``: True uses training statistics (read from, or written to,
    ``workspace/data/<hash>.json`` when a workspace is given), False none, a
    pair ``(mean, std)`` those values (one per channel, or one for all).
    ``seed`` draws the validation split of a source without a test set; keep
    the default so that every stage holds out the same examples. ``inputs``
    is the model's :class:`~ndc.passes.inputs.InputSpec`; by default the
    workspace plan's, when ``input_shape`` is its input's. For a model that
    reads token ids, data that is not ids (a float .npz, images) and ids at
    or above its vocabulary are refused here, in one line.

    >>> data = open_data("fashion-mnist", (3, 32, 32), limit=512)  # doctest: +SKIP
    >>> x, y = next(data.batches("train", 256, shuffle=True, augment=True))  # doctest: +SKIP
    >>> x.shape, y.dtype  # doctest: +SKIP
    (torch.Size([256, 3, 32, 32]), torch.int64)
    """
    if limit is not None and limit < 1:
        raise NdcError(f"--limit must be a positive number of examples, not {limit}")
    from ndc.tokens import token_source  # token ids (an integer .npz, text:FILE): see ndc.tokens

    if inputs is None:
        inputs = _plan_inputs(workspace, input_shape)
    tokens = token_source(spec, input_shape, limit=limit, inputs=inputs)
    if tokens is not None:
        return tokens
    raw = resolve(spec)
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
    channels = stat_channels(fit)

    stats_path = None
    if normalize is True:
        key = {"version": STATS_VERSION, "spec": spec, "source": raw.fingerprint, "shape": list(fit.shape),
               "raw_shape": list(fit.raw), "seed": seed if raw.test is None else None}
        mean, std, stats_path = cached_statistics(workspace, key, full_train, fit, raw.classes, len(test))
        normalization = "training statistics"
    elif normalize is False or normalize is None:
        mean, std, normalization = [0.0] * channels, [1.0] * channels, "none"
    else:
        mean, std = explicit_statistics(normalize, channels)
        normalization = "given"
    return DataSource(spec, raw, train, test, fit, mean, std, normalization, split, limit, stats_path)


def _plan_inputs(workspace: Workspace | None, input_shape: Sequence[int] | None) -> Any:
    """The InputSpec of the workspace's plan when the data is opened for its model (``input_shape`` is the plan's)."""
    from ndc.workspace import PLAN

    if workspace is None or input_shape is None or not workspace.exists(PLAN):
        return None
    plan = workspace.load_plan()
    return plan.inputs if tuple(plan.input_shape[1:]) == tuple(input_shape) else None


def _validation_split(train: Split, seed: int, spec: str) -> tuple[Split, Split]:
    """Hold out ``VALIDATION_FRACTION`` of the examples, drawn with ``seed``; both parts keep the source's order."""
    n = len(train)
    if n < 2:
        raise NdcError(f"{spec} has {n} example(s) and no test set; too few to hold out a validation split")
    n_val = min(n - 1, max(1, round(n * VALIDATION_FRACTION)))
    perm = np.random.default_rng(seed).permutation(n)
    return train.subset(np.sort(perm[n_val:])), train.subset(np.sort(perm[:n_val]))

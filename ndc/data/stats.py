"""Normalisation statistics: per-channel (per-feature for vectors) mean and std of the fitted training split, stored
in the workspace."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ndc.data.batches import to_tensor
from ndc.data.fit import Fit
from ndc.data.splits import LazySplit, Split
from ndc.errors import NdcError
from ndc.workspace import sha256_json

if TYPE_CHECKING:
    from ndc.workspace import Workspace

STATS_DIR = "data"
STATS_VERSION = 3  # 3: a vector of features is standardised per feature, not by one value
# Elements per chunk of the statistics pass: bounds its memory whatever the image size.
_STATS_CHUNK_ELEMENTS = 1 << 24


class _Moments:
    """Per-channel mean and variance over chunks, combined exactly (Chan et al.) in float64.

    A batch (B, C, ...) has C channels; a batch of vectors (B, F) has F of them
    when ``channels`` is F (per feature), else one.
    """

    def __init__(self, channels: int):
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, x: torch.Tensor) -> None:
        if x.dim() == 2 and len(self.mean) == x.shape[1] > 1:
            v = x.t()
        else:
            v = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 2 else x.reshape(1, -1)
        v = v.double()
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


def stat_channels(fit: Fit) -> int:
    """How many (mean, std) pairs normalise this data: one per channel of a C x ... input; one per feature of a
    vector of features (tabular data, which features of their own scale); one for a vector reshaped from an image."""
    shape = fit.shape
    if len(shape) == 1:
        return shape[0] if not fit.reshape else 1
    return shape[0]


def training_statistics(train: Split, fit: Fit) -> tuple[list[float], list[float]]:
    """Per-channel (per-feature) mean and (population) std of the fitted training split, in one streaming pass.

    Memory stays bounded (chunks of about 16M values) however large the split.
    Repeated grey channels share one set of statistics, so they are computed on
    the single raw channel.
    """
    repeat = fit.channels == "repeat"
    moments = _Moments(fit.raw[0] if repeat else stat_channels(fit))
    chunk = max(1, _STATS_CHUNK_ELEMENTS // max(1, math.prod(fit.shape)))
    if isinstance(train, LazySplit):
        chunk = min(chunk, 256)
    for start in range(0, len(train), chunk):
        x, _ = train.take(slice(start, min(start + chunk, len(train))))
        t = fit.spatial(to_tensor(x))
        moments.add(t if repeat else fit.channel(t))
    mean, std = moments.result()
    if repeat:
        mean, std = mean * fit.shape[0], std * fit.shape[0]
    return mean, std




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




def cached_statistics(ws: Workspace | None, key: dict, train: Split, fit: Fit, classes: int,
                       test_size: int) -> tuple[list[float], list[float], Path | None]:
    """Training statistics from the workspace when recorded for exactly this key, else computed and recorded."""
    if ws is None:
        return (*training_statistics(train, fit), None)
    rel = f"{STATS_DIR}/{sha256_json(key)[:16]}.json"
    if ws.verified(rel, made_from=key):
        stored = ws.read_json(rel)
        if stored.get("key") == key and len(stored.get("mean", [])) == stat_channels(fit):
            return stored["mean"], stored["std"], ws.path(rel)
    mean, std = training_statistics(train, fit)
    ws.write_json(rel, {"key": key, "mean": mean, "std": std, "train": len(train), "test": test_size,
                        "classes": classes, "shape": list(fit.shape)})
    ws.record(rel, made_from=key)
    return mean, std, ws.path(rel)


def explicit_statistics(normalize: tuple[Sequence[float], Sequence[float]],
                         channels: int) -> tuple[list[float], list[float]]:
    try:
        mean, std = ([float(v) for v in part] for part in normalize)
    except (TypeError, ValueError):
        raise NdcError("normalisation must be True, False or a pair (mean, std) of number lists") from None
    for what, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise NdcError(f"normalisation {what} has {len(values)} values; the data takes one, or {channels} "
                           "(one per channel, or per feature of a vector)")
    mean, std = (v * channels if len(v) == 1 else v for v in (mean, std))
    if any(not s > 0 for s in std):
        raise NdcError(f"normalisation std must be positive, got {std}")
    return mean, std



"""Fitting an example to the model's input: channels, padding or resizing, reshaping."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ndc.errors import NdcError, fmt_shape

# Zero-pad rather than resize when the model's side is at most this much larger:
# 28 -> 32 (the paper-style setup) pads; 8 -> 32 would leave a tiny digit in a
# black frame, so it is resized instead.
PAD_LIMIT = 0.25
# ITU-R BT.601 luma, the weights PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)

@dataclass(frozen=True)
class Fit:
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


def plan_fit(raw: Sequence[int], shape: Sequence[int] | None) -> Fit:
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
        return Fit(raw, raw)
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
            return Fit(raw, shape, channels)
        if h <= H <= h * (1 + PAD_LIMIT) and w <= W <= w * (1 + PAD_LIMIT):
            top, left = (H - h) // 2, (W - w) // 2
            return Fit(raw, shape, channels, pad=(left, W - w - left, top, H - h - top))
        return Fit(raw, shape, channels, resize=(H, W))
    if math.prod(raw) == math.prod(shape):
        return Fit(raw, shape, reshape=True)
    hint = ("; the input shape is per example, leave out the batch size"
            if len(shape) == len(raw) + 1 and shape[0] == 1 else "")
    raise NdcError(f"cannot fit examples of shape {fmt_shape(raw)} to the model's input {fmt_shape(shape)}: "
                   f"images need a C x H x W input, other data the same number of elements{hint}")



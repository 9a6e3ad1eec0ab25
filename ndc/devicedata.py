"""A data source held in device memory, for training loops on a GPU.

On a GPU the end-to-end loops (``finetune``, ``kd``) and the distillation
feeds must not pay a host-to-device copy and a host-side augmentation per
step (airbench's lesson: keep the whole data set on the device). A
:class:`DeviceData` reads every example of a :class:`~ndc.data.DataSource`
once, fitted and normalised, into device tensors, and then serves batches by
index with the augmentation (random translation by up to 4 px, the same as
the host source's) done on the device. It has the source's interface
(``batches``, sizes, ``classes``, ``shape``), so a loop does not know which
it was given.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ndc.data import augment_shift

DEVICE_FRACTION = 0.4  # at most this share of the device's free memory goes to the data set


class DeviceData:
    """``data`` resident on ``device``; batches are tensors already there."""

    def __init__(self, data, device: str):
        self.source, self.device = data, device
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split in ("train", "test"):
            xs, ys = [], []
            for x, y in data.batches(split, 1024):
                xs.append(x)
                ys.append(y)
            x = torch.cat(xs) if xs else torch.empty((0, *data.shape))
            y = None
            if all(t is not None for t in ys):  # unlabelled data (a bare .npz of inputs) has y None
                y = (torch.cat(ys) if ys else torch.empty((0,), dtype=torch.long)).to(device)
            self.tensors[split] = (x.to(device), y)
        # What a zero pixel becomes after normalisation: the value translation pads with, as on the host.
        mean = torch.tensor(data.mean, dtype=torch.float32) if data.normalization != "none" else torch.zeros(1)
        std = torch.tensor(data.std, dtype=torch.float32) if data.normalization != "none" else torch.ones(1)
        self._zero = (-mean / std).to(device)

    def __getattr__(self, name: str):
        return getattr(self.source, name)  # sizes, classes, shape, name, mean, std, ...

    def batches(self, split: str = "train", batch_size: int = 128, *, shuffle: bool = False, augment: bool = False,
                seed: int = 0, epoch: int = 0, drop_last: bool = False, **_) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.tensors[split]
        n = len(x)
        gen = torch.Generator(device=self.device).manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        order = torch.randperm(n, generator=gen, device=self.device) if shuffle else None
        image = len(self.source.shape) == 3
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if drop_last and stop - start < batch_size:
                break
            idx = slice(start, stop) if order is None else order[start:stop]
            xb = x[idx]
            if augment and image:
                xb = translate(xb, augment_shift(*xb.shape[-2:]), gen, self._zero)
            yield xb, (y[idx] if y is not None else None)


def translate(x: torch.Tensor, shift: int, gen: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """Each image moved by its own random offset in [-shift, shift]², the uncovered border set to ``fill``."""
    b, c, h, w = x.shape
    padded = fill.view(1, -1, 1, 1).expand(b, c, h + 2 * shift, w + 2 * shift).clone()
    padded[:, :, shift:shift + h, shift:shift + w] = x
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def on_device(data, device: str):
    """``data`` as a :class:`DeviceData` on a GPU when it fits in a share of its free memory, else ``data`` itself."""
    if not str(device).startswith("cuda") or isinstance(data, DeviceData) or not hasattr(data, "normalization"):
        return data
    per_example = 4 * int(np.prod(data.shape)) + 8
    free = torch.cuda.mem_get_info(torch.device(device))[0]
    if (data.train_size + data.test_size) * per_example > DEVICE_FRACTION * free:
        return data
    return DeviceData(data, device)


def synchronize(device: str) -> None:
    """Wait for the device (timings on a GPU need it; a CPU has nothing to wait for)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))

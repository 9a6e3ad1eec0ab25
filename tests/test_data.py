"""Data specs as a user meets them: sizes, shapes, statistics, determinism, and one-line errors.

Every fixture is written here, small, in tmp_path: IDX files, npz archives,
folders of PNGs, a Python file with a data function. The real Fashion-MNIST
is read from Debian's package when installed.
"""

from __future__ import annotations

import gzip
import json
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ndc.data.idx as idx_mod
import ndc.data.stats as stats_mod
from ndc.data import DATA_SPEC_HELP, FASHION_MNIST_DIR, load_npz, open_data, plan_fit, read_idx
from ndc.errors import NdcError
from ndc.workspace import Workspace

# ---------------------------------------------------------------------------
# fixtures


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, truncate: int = 0) -> Path:
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz)."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    blob = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    blob = blob[: len(blob) - truncate]
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return path


def tagged_images(n: int, h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    """Random uint8 images whose top-left pixel is the example's index, so tests can tell examples apart."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n)
    return x


def ids(x: torch.Tensor) -> list[int]:
    """Example indices back from an un-normalised, unfitted batch of tagged images."""
    return [round(v) for v in (x[:, 0, 0, 0] * 255).tolist()]


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    d = tmp_path / "idx"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte.gz", tagged_images(50))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(50) % 4)
    write_idx(d / "t10k-images-idx3-ubyte", tagged_images(20, seed=1))  # plain files are read too
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(20) % 4)
    return d


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three classes of 12x12 RGB PNGs: 4 cats, 3 dogs, 2 fish."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name, count in (("cat", 4), ("dog", 3), ("fish", 2)):
        for i in range(count):
            save_png(root / name / f"{i}.png", rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8))
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    return root


def error_line(result) -> str:
    """The single error line of a failed command (and no traceback)."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------
# IDX


def test_idx_sizes_and_shapes(idx_dir):
    data = open_data(f"mnist:{idx_dir}")
    assert (data.train_size, data.test_size, data.classes, data.shape) == (50, 20, 4, (1, 28, 28))
    x, y = next(data.batches("train", 16))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [i % 4 for i in range(16)]


def test_idx_fitted_to_3x32x32_pads_and_repeats(idx_dir):
    data = open_data(f"fashion-mnist:{idx_dir}", (3, 32, 32), normalize=False)
    x, _ = next(data.batches("test", 20))
    assert x.shape == (20, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # 2 px of zeros per side, then the image itself
    assert x[:, :, :2].abs().sum() == 0 and x[:, :, -2:].abs().sum() == 0 and x[:, :, :, :2].abs().sum() == 0
    raw = read_idx(idx_dir / "t10k-images-idx3-ubyte", "images")
    assert torch.allclose(x[:, 0, 2:30, 2:30], torch.from_numpy(raw.astype(np.float32) / 255))


def test_plain_idx_is_memory_mapped(idx_dir):
    assert isinstance(read_idx(idx_dir / "t10k-images-idx3-ubyte", "images"), np.memmap)


def test_idx_without_test_files_holds_out_a_fixed_validation_split(idx_dir):
    for f in idx_dir.glob("t10k-*"):
        f.unlink()
    data = open_data(f"mnist:{idx_dir}", normalize=False)
    assert (data.train_size, data.test_size) == (40, 10)
    train = ids(torch.cat([x for x, _ in data.batches("train", 64)]))
    test = ids(torch.cat([x for x, _ in data.batches("test", 64)]))
    assert sorted(train + test) == list(range(50)) and train == sorted(train) and test == sorted(test)
    again = open_data(f"mnist:{idx_dir}", normalize=False)
    assert ids(next(again.batches("test", 64))[0]) == test
    # the limit keeps a prefix of the same held-out examples
    limited = open_data(f"mnist:{idx_dir}", normalize=False, limit=3)
    assert ids(next(limited.batches("test", 64))[0]) == test[:3]
    assert ids(next(limited.batches("train", 64))[0]) == train[:3]


@pytest.mark.parametrize("case, fragment", [
    ("magic", "not an IDX images file (magic number 0x00000801, expected 0x00000803)"),
    ("count", "has 50 images but train-labels-idx1-ubyte.gz has 49 labels"),
    ("truncated", "the header promises 50x28x28 = 39200 bytes of data but the file holds 39190"),
    ("not-gzip", "not a readable gzip file"),
    ("half-test", "only half of the test set: t10k-labels-idx1-ubyte[.gz] is missing"),
    ("no-train", "lacks the training IDX files"),
])
def test_bad_idx_is_one_clear_line(run_cli, idx_dir, case, fragment):
    images, labels = idx_dir / "train-images-idx3-ubyte.gz", idx_dir / "train-labels-idx1-ubyte.gz"
    if case == "magic":
        write_idx(images, tagged_images(50), magic=0x0801)
    elif case == "count":
        write_idx(labels, np.arange(49) % 4)
    elif case == "truncated":
        write_idx(images, tagged_images(50), truncate=10)
    elif case == "not-gzip":
        images.write_bytes(b"plain bytes, not gzip")
    elif case == "half-test":
        (idx_dir / "t10k-labels-idx1-ubyte").unlink()
    elif case == "no-train":
        labels.unlink()
    line = error_line(run_cli("data", f"mnist:{idx_dir}"))
    assert fragment in line


def test_missing_directories(run_cli, tmp_path, monkeypatch):
    assert "no such directory" in error_line(run_cli("data", f"mnist:{tmp_path / 'nowhere'}"))
    assert "mnist needs the directory" in error_line(run_cli("data", "mnist"))
    monkeypatch.setattr(idx_mod, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    line = error_line(run_cli("data", "fashion-mnist"))
    assert "apt-get install dataset-fashion-mnist" in line and "fashion-mnist:DIR" in line


# ---------------------------------------------------------------------------
# Fashion-MNIST from Debian's package

needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                                         reason=f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")


@needs_fashion_mnist
def test_fashion_mnist_json(run_cli, tmp_path):
    r = run_cli("data", "fashion-mnist", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["train"], doc["test"], doc["classes"], doc["shape"]) == (60000, 10000, 10, [1, 28, 28])
    # the well-known Fashion-MNIST statistics
    assert doc["mean"][0] == pytest.approx(0.2860, abs=1e-4) and doc["std"][0] == pytest.approx(0.3530, abs=1e-4)
    assert doc["statistics"] is None and not (tmp_path / "ndc-work").exists()  # no workspace made just to look
    r = run_cli("data", "fashion-mnist", "--limit", "100", "-w", "ws")
    assert r.exit_code == 0, r.stderr
    kept = list((tmp_path / "ws" / "data").glob("*.json"))
    assert len(kept) == 1 and f"statistics     {kept[0]}" in r.stdout


@needs_fashion_mnist
def test_fashion_mnist_limited_and_fitted(run_cli):
    r = run_cli("data", "fashion-mnist", "--input-shape", "1,3,32,32", "--limit", "500", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["train"], doc["test"], doc["shape"]) == (500, 500, [3, 32, 32])
    assert len(doc["mean"]) == 3 and doc["fit"] == "zero-pad 2 px per side, repeat the grey channel 3 times"


# ---------------------------------------------------------------------------
# digits


def test_digits():
    data = open_data("digits", (1, 16, 16), limit=None)
    assert data.train_size + data.test_size == 1797 and data.test_size == 359 and data.classes == 10
    assert data.shape == (1, 16, 16) and "resize" in data.describe()["fit"]
    x, y = next(data.batches("test", 359))
    assert x.shape == (359, 1, 16, 16) and int(y.max()) == 9


def test_normalised_training_data_has_zero_mean_unit_std_per_channel(idx_dir):
    data = open_data(f"mnist:{idx_dir}", (3, 32, 32))
    x = torch.cat([x for x, _ in data.batches("train", 7)])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    digits = open_data("digits")
    x = torch.cat([x for x, _ in digits.batches("train", 500)])
    assert abs(float(x.mean())) < 1e-5 and float(x.std(unbiased=False)) == pytest.approx(1, abs=1e-5)


def test_a_vector_of_features_is_standardised_per_feature(tmp_path, idx_dir):
    # Tabular features each have their own scale (a price, an age): one scalar over all of them would leave
    # the small ones near zero. Per feature, as scikit-learn's StandardScaler does.
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(400, 3)) * [1000.0, 1.0, 0.01] + [5e4, 0.0, 3.0]).astype(np.float32)
    x[:, 2] = 3.0  # a constant feature stays unscaled rather than dividing by zero
    np.savez(tmp_path / "t.npz", x=x, y=rng.normal(size=400).astype(np.float32))
    data = open_data(str(tmp_path / "t.npz"), (3,))
    assert len(data.mean) == 3 and data.std[2] == 1.0 and data.std[0] == pytest.approx(1000, rel=0.1)
    xb = torch.cat([b for b, _ in data.batches("train", 64)])
    assert torch.allclose(xb[:, :2].mean(0), torch.zeros(2), atol=1e-4)
    assert torch.allclose(xb[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.all(xb[:, 2] == 0)
    given = open_data(str(tmp_path / "t.npz"), (3,), normalize=([5e4, 0, 3], [1000, 1, 1]))
    assert given.std == [1000.0, 1.0, 1.0]
    # an image flattened for an MLP keeps one value for its one channel: its pixels share a scale
    flat = open_data(f"mnist:{idx_dir}", (784,))
    assert len(flat.mean) == 1


def test_explicit_and_disabled_normalisation(idx_dir):
    raw = open_data(f"mnist:{idx_dir}", (3, 32, 32), normalize=False)
    given = open_data(f"mnist:{idx_dir}", (3, 32, 32), normalize=([0.5, 0.25, 0.0], [0.5]))
    assert given.mean == [0.5, 0.25, 0.0] and given.std == [0.5, 0.5, 0.5]
    xr, xg = next(raw.batches("train", 8))[0], next(given.batches("train", 8))[0]
    assert float(xr.min()) >= 0 and float(xr.max()) <= 1
    expected = (xr - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / 0.5
    assert torch.allclose(xg, expected)
    with pytest.raises(NdcError, match="has 2 values"):
        open_data(f"mnist:{idx_dir}", (3, 32, 32), normalize=([0.1, 0.2], [1.0]))


def test_statistics_are_stored_in_the_workspace_and_reused(idx_dir, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    first = open_data(f"mnist:{idx_dir}", (3, 32, 32), workspace=ws)
    assert first.stats_path is not None and first.stats_path.parent == ws.root / "data"
    stored = json.loads(first.stats_path.read_text())
    assert stored["mean"] == first.mean and stored["std"] == first.std

    def must_not_recompute(*_):
        raise AssertionError("statistics recomputed although the workspace has them")

    monkeypatch.setattr(stats_mod, "training_statistics", must_not_recompute)
    again = open_data(f"mnist:{idx_dir}", (3, 32, 32), workspace=ws)
    assert again.mean == first.mean and again.stats_path == first.stats_path
    limited = open_data(f"mnist:{idx_dir}", (3, 32, 32), workspace=ws, limit=10)  # same statistics whatever the limit
    assert limited.mean == first.mean and limited.std == first.std
    with pytest.raises(AssertionError):  # another input shape, other statistics
        open_data(f"mnist:{idx_dir}", (1, 32, 32), workspace=ws)


# ---------------------------------------------------------------------------
# batches: order, limit, augmentation


def test_limit_keeps_the_first_examples_in_order(idx_dir):
    full = open_data(f"mnist:{idx_dir}", normalize=False)
    short = open_data(f"mnist:{idx_dir}", normalize=False, limit=7)
    assert (short.train_size, short.test_size) == (7, 7)
    assert ids(next(short.batches("train", 100))[0]) == ids(next(full.batches("train", 100))[0])[:7] == list(range(7))


def test_shuffle_and_augmentation_repeat_under_a_seed(idx_dir):
    data = open_data(f"mnist:{idx_dir}", (3, 32, 32))

    def epoch(seed, number):
        return [b for b in data.batches("train", 16, shuffle=True, augment=True, flip=True, seed=seed, epoch=number)]

    a, b, c = epoch(0, 0), epoch(0, 0), epoch(0, 1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted((np.arange(50) % 4).tolist())
    sizes = [len(y) for _, y in data.batches("train", 16, drop_last=True)]
    assert sizes == [16, 16, 16]


def test_augmentation_translates_by_at_most_4_pixels(idx_dir):
    data = open_data(f"mnist:{idx_dir}", (1, 28, 28), normalize=False)
    plain = next(data.batches("train", 50))[0]
    moved = next(data.batches("train", 50, augment=True, seed=3))[0]
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    shifts = set()
    for i in range(50):
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(padded[i, :, dy:dy + 28, dx:dx + 28], moved[i])]
        assert found, f"example {i} is not a translation of the original by at most 4 px"
        shifts.add(found[0])
    assert len(shifts) > 10  # offsets differ between examples
    flipped = next(data.batches("train", 50, augment=True, flip=True, seed=3))[0]
    assert not torch.equal(flipped, moved)


def test_small_images_are_translated_by_an_eighth_of_their_side():
    from ndc.data import augment_shift

    assert [augment_shift(s, s) for s in (8, 16, 28, 32, 224)] == [1, 2, 4, 4, 4]
    data = open_data("digits", (1, 8, 8), normalize=False)
    plain = next(data.batches("train", 50))[0]
    moved = next(data.batches("train", 50, augment=True, seed=3))[0]
    padded = torch.nn.functional.pad(plain, (1, 1, 1, 1))
    for i in range(50):  # 4 px would move half of an 8x8 digit out of view
        assert any(torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], moved[i]) for dy in range(3) for dx in range(3))


# ---------------------------------------------------------------------------
# fitting rules


@pytest.mark.parametrize("raw, shape, text", [
    ((1, 28, 28), (3, 32, 32), "zero-pad 2 px per side, repeat the grey channel 3 times"),
    ((1, 28, 28), (1, 28, 28), "none"),
    ((1, 8, 8), (3, 32, 32), "resize 8x8 to 32x32 (bilinear), repeat the grey channel 3 times"),
    ((3, 32, 32), (3, 28, 28), "resize 32x32 to 28x28 (bilinear)"),
    ((3, 32, 32), (1, 32, 32), "convert RGB to grey (BT.601 luma)"),
    ((1, 28, 28), (784,), "reshape 1x28x28 to 784"),
    ((1, 28, 29), (1, 32, 32), "zero-pad left 1, right 2, top 2, bottom 2 px"),
])
def test_fit_rules(raw, shape, text):
    fit = plan_fit(raw, shape)
    assert fit.describe() == text
    assert fit.channel(fit.spatial(torch.rand(2, *raw))).shape == (2, *shape)


def test_unfittable_shapes():
    with pytest.raises(NdcError, match="4 channels and the model takes 3"):
        plan_fit((4, 8, 8), (3, 8, 8))
    with pytest.raises(NdcError, match="cannot fit examples of shape 1x28x28 to the model's input 100"):
        plan_fit((1, 28, 28), (100,))
    with pytest.raises(NdcError, match="leave out the batch size"):
        plan_fit((1, 28, 28), (1, 3, 32, 32))


# ---------------------------------------------------------------------------
# npz


def test_npz_stored_members_are_memory_mapped(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(30, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3, x_test=x[:5], y_test=np.arange(5) % 3)
    arrays = load_npz(tmp_path / "d.npz")
    assert isinstance(arrays["x"], np.memmap) and np.array_equal(arrays["x"], x)
    data = open_data(str(tmp_path / "d.npz"), normalize=False)
    assert (data.train_size, data.test_size, data.classes, data.shape) == (30, 5, 3, (3, 8, 8))
    assert torch.allclose(next(data.batches("train", 30))[0], torch.from_numpy(x / 255).float())


def test_npz_compressed_channels_last_floats(tmp_path):
    x = np.random.default_rng(0).random((25, 10, 10, 3)).astype(np.float32)  # N, H, W, C
    np.savez_compressed(tmp_path / "c.npz", x=x, y=np.arange(25) % 5)
    arrays = load_npz(tmp_path / "c.npz")
    assert not isinstance(arrays["x"], np.memmap)
    data = open_data(str(tmp_path / "c.npz"), normalize=False)
    assert data.shape == (3, 10, 10) and (data.train_size, data.test_size) == (20, 5)
    xb = torch.cat([b for b, _ in data.batches("train", 8)])
    assert torch.allclose(xb[0], torch.from_numpy(x[0].transpose(2, 0, 1)))  # example 0 is in train for seed 0


def test_npz_vectors(tmp_path):
    np.savez(tmp_path / "v.npz", x=np.random.default_rng(0).random((20, 64)), y=np.arange(20) % 2)
    data = open_data(str(tmp_path / "v.npz"), (1, 8, 8))
    assert data.shape == (1, 8, 8) and next(data.batches("train", 4))[0].shape == (4, 1, 8, 8)


@pytest.mark.parametrize("arrays, fragment", [
    ({"y": np.zeros(4, np.int64)}, "has no array 'x' (found: y)"),
    ({"x": np.zeros((4, 8, 8), np.int32), "y": np.zeros(4, np.int64)}, "x has dtype int32; expected uint8"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array(["a"] * 4)}, "y has dtype <U1; expected integer class labels"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(3, np.int64)}, "y has shape 3; expected (4,)"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.int64(3)}, "y has shape (); expected (4,)"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "x_test": np.zeros((2, 8, 8), np.uint8), "y_test": np.zeros(2, np.int64)},
     "has y_test without y"),
    ({"x": np.zeros(4, np.uint8), "y": np.zeros(4, np.int64)}, "x has shape 4; expected one row per example"),
    ({"x": np.zeros((4, 2, 2, 2, 2), np.uint8), "y": np.zeros(4, np.int64)}, "examples of shape 2x2x2x2"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(4, np.int64), "x_test": np.zeros((2, 8, 8), np.uint8)},
     "has x_test without y_test"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(4, np.int64),
      "x_test": np.zeros((2, 9, 9), np.uint8), "y_test": np.zeros(2, np.int64)}, "x_test has examples of shape 1x9x9"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": -np.ones(4, np.int64)}, "negative labels"),
])
def test_bad_npz_is_one_clear_line(run_cli, tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert fragment in error_line(run_cli("data", str(tmp_path / "bad.npz")))


def test_npz_labels_may_be_targets_or_absent(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((30, 6)).astype(np.float32)
    np.savez(tmp_path / "bare.npz", x=x)
    bare = open_data(str(tmp_path / "bare.npz"))
    assert (bare.labels, bare.classes, bare.describe()["labels"]) == ("none", None, "none")
    assert all(y is None for _, y in bare.batches("test", 4))
    np.savez(tmp_path / "multi.npz", x=x, y=(x[:, :3] > 0.5).astype(np.uint8))
    multi = open_data(str(tmp_path / "multi.npz"))
    assert (multi.labels, multi.target_shape, multi.binary) == ("targets", (3,), True)
    np.savez(tmp_path / "values.npz", x=x, y=x.sum(1))
    values = open_data(str(tmp_path / "values.npz"), normalize=False)
    assert (values.labels, values.target_shape, values.binary) == ("targets", (), False)
    _, y = next(values.batches("train", 5))
    assert y.dtype == torch.float32 and y.shape == (5,)


@pytest.mark.parametrize("arrays, fragment", [
    ({"x": np.where(np.arange(40).reshape(5, 8) == 19, np.nan, 1.0)}, "bad.npz: x: example 2 holds a non-finite value (nan)"),
    ({"x": np.ones((5, 8)), "y": np.where(np.arange(5) == 4, np.inf, 0.0)}, "bad.npz: y: example 4 holds a non-finite value (inf)"),
    ({"x": np.ones((4, 8), np.float32), "x_test": np.zeros((0, 8), np.float32)}, "bad.npz: x_test holds no examples"),
    ({"x": np.zeros((0, 8, 8), np.uint8)}, "bad.npz: x holds no examples"),
    ({"x": np.ones((5, 8)), "y": np.array([0, 1, -2, 1, 0])}, "y holds negative labels (example 2 is -2)"),
])
def test_bad_values_are_one_line_naming_the_file_and_the_example(run_cli, tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert fragment in error_line(run_cli("data", str(tmp_path / "bad.npz")))


def test_labels_outside_the_teachers_classes(run_cli, tmp_path):
    assert run_cli("partition", "ndc.zoo:resnet20", "--input-shape", "1,3,32,32").exit_code == 0  # 10 classes
    y = np.arange(30) % 10
    y[17] = 18
    np.savez(tmp_path / "stray.npz", x=np.zeros((30, 8, 8), np.uint8), y=y)
    line = error_line(run_cli("data", str(tmp_path / "stray.npz")))
    assert "stray.npz: y: example 17 has label 18, outside the model's 10 classes (0..9)" in line
    assert run_cli("data", str(tmp_path / "stray.npz"), "-w", tmp_path / "no-plan").exit_code == 0  # no teacher: fine


def test_empty_idx_split_is_one_line(run_cli, idx_dir):
    write_idx(idx_dir / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8))
    assert "t10k-images-idx3-ubyte holds no examples" in error_line(run_cli("data", f"mnist:{idx_dir}"))


def test_float_memory_maps_reach_torch_without_a_warning(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.ones((8, 4), np.float32), y=np.zeros(8, np.int64))
    data = open_data(str(tmp_path / "f.npz"), normalize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = next(data.batches("train", 4))
    x.add_(1)  # writable: not a view of the read-only map
    assert float(x[0, 0]) == 2.0


def test_npz_not_a_zip_missing_or_pickled(run_cli, tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "not an npz file" in error_line(run_cli("data", str(tmp_path / "junk.npz")))
    assert "no such file" in error_line(run_cli("data", str(tmp_path / "absent.npz")))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, np.int64))
    assert "unreadable array" in error_line(run_cli("data", str(tmp_path / "obj.npz")))
    with zipfile.ZipFile(tmp_path / "obj.npz") as zf:  # the fixture really holds a pickle
        assert zf.read("x.npy")[:6] == b"\x93NUMPY"


# ---------------------------------------------------------------------------
# image folders


def test_imagefolder_lazy_interleaved_classes(folder):
    data = open_data(f"imagefolder:{folder}", (3, 16, 16), limit=None)
    assert data.classes == 3 and data.class_names == ["cat", "dog", "fish"]
    assert data.train_size + data.test_size == 9 and data.test_size == 2 and data.shape == (3, 16, 16)
    x, _ = next(data.batches("train", 7))
    assert x.shape == (7, 3, 16, 16)
    first = open_data(f"imagefolder:{folder}", limit=3, normalize=False, seed=1)
    assert first.shape == (3, 12, 12)


def test_imagefolder_train_test_folders_and_grey(tmp_path):
    root = tmp_path / "set"
    for part, count in (("train", 3), ("test", 1)):
        for name in ("a", "b"):
            for i in range(count):
                value = 40 * i + (100 if name == "b" else 0)
                save_png(root / part / name / f"{i}.png", np.full((10, 10), value, np.uint8))
    data = open_data(f"imagefolder:{root}", normalize=False)
    assert (data.train_size, data.test_size, data.classes, data.shape) == (6, 2, 2, (1, 10, 10))
    x, y = next(data.batches("train", 6))
    assert y.tolist() == [0, 1, 0, 1, 0, 1]  # interleaved, so any prefix mixes classes
    assert float(x[1, 0, 0, 0]) == pytest.approx(100 / 255)


def test_imagefolder_errors(run_cli, folder, tmp_path):
    assert "no such directory" in error_line(run_cli("data", f"imagefolder:{tmp_path / 'none'}"))
    (tmp_path / "flat").mkdir()
    assert "has no class sub-folders" in error_line(run_cli("data", f"imagefolder:{tmp_path / 'flat'}"))
    (folder / "empty").mkdir()
    line = error_line(run_cli("data", f"imagefolder:{folder}"))
    assert "class folder" in line and "empty has no images" in line
    (folder / "empty").rmdir()
    (folder / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    line = error_line(run_cli("data", f"imagefolder:{folder}"))
    assert "cannot read image" in line and "dog/1.png" in line


# ---------------------------------------------------------------------------
# user code

USER_CODE = '''
import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

rng = np.random.default_rng(0)
X = rng.integers(0, 256, size=(24, 8, 8), dtype=np.uint8)
Y = np.arange(24) % 3

def arrays():
    return (X[:20], Y[:20]), (X[20:], Y[20:])

def train_only():
    return (torch.from_numpy(X), torch.from_numpy(Y)), None

class Items(Dataset):
    classes = ["a", "b", "c"]
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi
    def __len__(self):
        return self.hi - self.lo
    def __getitem__(self, i):
        return torch.from_numpy(X[self.lo + i]).float()[None] / 255, int(Y[self.lo + i])

def datasets():
    return Items(0, 20), Items(20, 24)

def tensors():
    return TensorDataset(torch.rand(10, 2, 4, 4), torch.arange(10) % 2), None

class Unlabelled(Dataset):
    def __len__(self):
        return 6
    def __getitem__(self, i):
        return torch.full((4,), float(i))

class Poisoned(Dataset):
    def __len__(self):
        return 5
    def __getitem__(self, i):
        return torch.full((4,), float("nan") if i == 3 else 1.0), 0

class Targets(Dataset):
    def __len__(self):
        return 6
    def __getitem__(self, i):
        return torch.full((4,), float(i)), np.array([i % 2, 1 - i % 2], np.float32)

def unlabelled():
    return Unlabelled(), None

def poisoned():
    return Poisoned(), None

def targets():
    return Targets(), None

def empty_test():
    return (X[:20], Y[:20]), Items(0, 0)

def wrong():
    return 42

def one_pair():
    return X[:20], Y[:20]

def broken():
    raise RuntimeError("disk on fire")
'''


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "userdata.py"
    path.write_text(USER_CODE)
    return path


def test_function_returning_arrays_and_datasets_agree(user_file):
    arrays = open_data(f"{user_file}:arrays", (3, 8, 8))
    lazy = open_data(f"{user_file}:datasets", (3, 8, 8))
    assert (arrays.train_size, arrays.test_size, arrays.classes) == (20, 4, 3)
    assert (lazy.train_size, lazy.test_size, lazy.classes) == (20, 4, 3)
    assert np.allclose(arrays.mean, lazy.mean) and np.allclose(arrays.std, lazy.std)
    xa, ya = next(arrays.batches("train", 20, shuffle=True, augment=True, seed=5))
    xl, yl = next(lazy.batches("train", 20, shuffle=True, augment=True, seed=5))
    assert torch.equal(ya, yl) and torch.allclose(xa, xl, atol=1e-5)


def test_function_train_only_and_tensor_dataset(user_file):
    data = open_data(f"{user_file}:train_only")
    assert (data.train_size, data.test_size) == (19, 5)
    t = open_data(f"{user_file}:tensors", normalize=False)
    assert t.shape == (2, 4, 4) and (t.train_size, t.test_size, t.classes) == (8, 2, 2)


def test_module_function(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert open_data("userdata:arrays").train_size == 20


def test_function_labels_of_every_kind(user_file):
    bare = open_data(f"{user_file}:unlabelled", normalize=False)
    assert bare.labels == "none" and bare.classes is None and next(bare.batches("train", 4))[1] is None
    rows = open_data(f"{user_file}:targets", normalize=False)
    assert (rows.labels, rows.target_shape, rows.binary) == ("targets", (2,), True)
    x, y = next(rows.batches("train", 4))
    assert y.dtype == torch.float32 and y.shape == (4, 2) and torch.equal(y.sum(1), torch.ones(4))


def test_function_errors(run_cli, user_file):
    line = error_line(run_cli("data", f"{user_file}:poisoned"))  # found when ndc data reads every item
    assert f"{user_file}:poisoned train: example 3 holds a non-finite value" in line
    assert f"{user_file}:empty_test test holds no examples" in error_line(run_cli("data", f"{user_file}:empty_test"))
    assert "expected a pair (train, test)" in error_line(run_cli("data", f"{user_file}:wrong"))
    assert "returned two arrays, one (x, y) pair; it returns two data sets, (train, test)" in error_line(
        run_cli("data", f"{user_file}:one_pair"))
    assert "raised RuntimeError: disk on fire" in error_line(run_cli("data", f"{user_file}:broken"))
    assert "has no callable 'absent'" in error_line(run_cli("data", f"{user_file}:absent"))
    assert "cannot import module 'no_such_module_xyz'" in error_line(run_cli("data", "no_such_module_xyz:load"))


# ---------------------------------------------------------------------------
# the command


def test_cli_json_keys_text_and_options(run_cli, idx_dir):
    r = run_cli("data", f"mnist:{idx_dir}", "--input-shape", "1,3,32,32", "--limit", "10", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert list(doc)[:6] == ["train", "test", "classes", "shape", "mean", "std"]
    assert (doc["train"], doc["test"], doc["classes"], doc["shape"]) == (10, 10, 4, [3, 32, 32])
    r = run_cli("data", f"mnist:{idx_dir}", "--normalize", "none")
    assert r.exit_code == 0 and "train" in r.stdout and "50" in r.stdout and "normalisation  none" in r.stdout
    r = run_cli("data", f"mnist:{idx_dir}", "--normalize", "0.5/0.5", "--format", "json")
    assert json.loads(r.stdout)["mean"] == [0.5] and json.loads(r.stdout)["statistics"] is None


def test_cli_takes_the_input_shape_from_the_workspace_plan(run_cli, idx_dir):
    r = run_cli("partition", "ndc.zoo:resnet20", "--input-shape", "1,3,32,32")
    assert r.exit_code == 0, r.stderr
    r = run_cli("data", f"mnist:{idx_dir}", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["shape"] == [3, 32, 32]


def test_cli_usage_errors(run_cli, idx_dir):
    assert "unknown data spec 'cifar'" in error_line(run_cli("data", "cifar"))
    assert DATA_SPEC_HELP in error_line(run_cli("data", "cifar"))
    assert "batch size first" in error_line(run_cli("data", f"mnist:{idx_dir}", "--input-shape", "784"))
    assert "cannot fit" in error_line(run_cli("data", f"mnist:{idx_dir}", "--input-shape", "1,100"))
    assert run_cli("data", f"mnist:{idx_dir}", "--normalize", "bogus").exit_code == 2
    assert run_cli("data", f"mnist:{idx_dir}", "--limit", "0").exit_code == 2


def test_a_data_function_in_a_package_of_the_working_folder(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])  # as under the ndc script
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ndc_test_pkg").mkdir()
    (tmp_path / "ndc_test_pkg" / "__init__.py").write_text("")
    (tmp_path / "ndc_test_pkg" / "mydata.py").write_text(
        "import numpy as np\n"
        "def load():\n"
        "    x = np.random.default_rng(0).random((40, 8, 8), dtype=np.float32)\n"
        "    return (x, np.arange(40) % 4), None\n")
    data = open_data("ndc_test_pkg.mydata:load", (1, 8, 8))
    assert data.classes == 4 and data.train_size + data.test_size == 40
    sys.modules.pop("ndc_test_pkg.mydata", None)
    sys.modules.pop("ndc_test_pkg", None)

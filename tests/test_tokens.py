"""Token data: integer .npz and text tokenised with a local tokenizer.json, read by every stage like other data."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from ndc.data import open_data
from ndc.errors import NdcError

pytest.importorskip("tokenizers")

HF = pathlib.Path(__file__).resolve().parent.parent / "examples" / "transformers_models.py"
WORDS = "the cat sat on a mat and the dog ran to the cat while a bird sang on the old mat".split()


def _corpus(folder: pathlib.Path, words: int = 400) -> pathlib.Path:
    """A text file and, beside it, a word-level tokenizer.json trained on it (vocabulary below 30)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(WORDS, size=words))
    path = folder / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(folder / "tokenizer.json"))
    return path


def test_integer_npz_is_token_data(tmp_path):
    x = np.random.default_rng(0).integers(0, 50, size=(30, 8))
    np.savez(tmp_path / "ids.npz", x=x, y=np.arange(30) % 3)
    data = open_data(str(tmp_path / "ids.npz"), (8,), limit=20)
    assert (data.kind, data.train_size, data.test_size, data.classes, data.shape) == ("tokens", 20, 6, 3, (8,))
    ids, y = next(data.batches("train", 5, shuffle=True))
    assert ids.dtype == torch.int64 and ids.shape == (5, 8) and y.dtype == torch.int64
    # the held-out sequences are the last fifth, whatever the limit
    assert np.array_equal(next(data.batches("test", 6))[0].numpy(), x[24:])
    with pytest.raises(NdcError, match="sequences of length 8; the model reads \\[16\\]"):
        open_data(str(tmp_path / "ids.npz"), (16,))


def test_a_float_npz_is_still_image_data(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((10, 4), np.float32), y=np.zeros(10, np.int64))
    assert open_data(str(tmp_path / "f.npz"), (4,)).kind == "npz"


def test_text_is_tokenised_with_the_local_tokenizer(tmp_path):
    path = _corpus(tmp_path)
    data = open_data(f"text:{path}", (16,))
    assert data.train_size + data.test_size == 400 // 16 and data.max_id < 30
    ids, _ = next(data.batches("train", 4))
    from tokenizers import Tokenizer

    expected = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(path.read_text()).ids[:16]
    assert ids[0].tolist() == expected
    other = tmp_path / "elsewhere.json"
    (tmp_path / "tokenizer.json").rename(other)
    with pytest.raises(NdcError, match="no tokenizer at"):
        open_data(f"text:{path}", (16,))
    assert open_data(f"text:{path},{other}", (16,)).train_size == data.train_size
    with pytest.raises(NdcError, match="no such text file"):
        open_data(f"text:{tmp_path / 'missing.txt'}", (16,))


def test_a_language_model_distils_on_text(run_cli, tmp_path):
    path = _corpus(tmp_path, words=800)
    assert run_cli("partition", f"{HF}:llama", "--input-shape", "1,16").exit_code == 0
    r = run_cli("data", f"text:{path}", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["shape"] == [16]
    r = run_cli("distill", "--data", f"text:{path}", "--width", "0.5", "--steps", "3", "--batch-size", "8",
                "--val-size", "8", "--only", "model.layers.0.mlp", "--format", "json", "--quiet")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == "cache" and doc["candidates"][0]["status"] == "done"


def test_a_language_model_goes_through_the_end_to_end_stages(run_cli, tmp_path):
    """Next-token labels, KD over every position, random token ids as data-free noise; eval scores every position."""
    path = _corpus(tmp_path, words=800)
    data = open_data(f"text:{path}", (8,))
    ids, labels = next(data.batches("train", 2))
    assert labels.shape == (2, 8) and torch.equal(labels[0, :-1], ids[0, 1:]) and labels[0, -1] == ids[1, 0]
    assert run_cli("partition", f"{HF}:llama", "--input-shape", "1,8").exit_code == 0
    fast = ["--limit", "16", "--batch-size", "8", "--epochs", "1"]
    assert run_cli("distill", "--data-free", "--width", "0.5", "--steps", "2", "--batch-size", "8", "--val-size", "8",
                   "--quiet").exit_code == 0
    assert run_cli("stitch", "-o", "s.pt2", "--width", "0.5").exit_code == 0
    for args in (["finetune", "--data-free", "--data", f"text:{path}"], ["finetune", "--data", f"text:{path}"],
                 ["kd", "--width", "0.5", "--data", f"text:{path}"]):
        r = run_cli(*args, *fast, "--format", "json")
        assert r.exit_code == 0, (args, r.stderr)
    for metric in ("auto", "accuracy", "top-5", "agreement"):  # next-token scores, every position with a label counted
        r = run_cli("eval", "s.pt2", "--data", f"text:{path}", "--limit", "16", "--metric", metric, "--format", "json")
        assert r.exit_code == 0, (metric, r.stderr)
        doc = json.loads(r.stdout)
        assert doc["metric"] == ("accuracy" if metric == "auto" else metric) and 0 <= doc["score"] <= 1


def test_ids_are_checked_against_the_models_input(tmp_path):
    """The vocabulary and the dtype the plan records (its InputSpec) are checked when the data is opened."""
    from ndc.passes.inputs import InputSpec

    ids = InputSpec("int64", 100)
    x = np.random.default_rng(0).integers(0, 100, size=(20, 8))
    x[13, 2] = 149
    np.savez(tmp_path / "bad.npz", x=x)
    with pytest.raises(NdcError, match=r"bad.npz: token id 149 \(train example 13\) is the largest id, but the "
                                       r"model's vocabulary has 100 ids \(0..99\)"):
        open_data(str(tmp_path / "bad.npz"), (8,), inputs=ids)
    assert open_data(str(tmp_path / "bad.npz"), (8,), inputs=InputSpec("int64", 150)).max_id == 149
    np.savez(tmp_path / "float.npz", x=x.astype(np.float32))
    with pytest.raises(NdcError, match="float.npz: x holds float32 values, but the model reads integer token ids"):
        open_data(str(tmp_path / "float.npz"), (8,), inputs=ids)
    with pytest.raises(NdcError, match="the model reads integer token ids, and this is not token data"):
        open_data("digits", (8,), inputs=ids)
    # a model reading floats: integer pixels are image data, text is refused
    np.savez(tmp_path / "pixels.npz", x=x.astype(np.uint8))
    assert open_data(str(tmp_path / "pixels.npz"), (8,), inputs=InputSpec()).kind == "npz"
    path = _corpus(tmp_path)
    with pytest.raises(NdcError, match="text is read as token ids, but the model reads floats"):
        open_data(f"text:{path}", (16,), inputs=InputSpec())


def test_token_data_describes_its_labels_and_largest_id(tmp_path):
    x = np.random.default_rng(0).integers(0, 50, size=(30, 8))
    np.savez(tmp_path / "ids.npz", x=x)
    np.savez(tmp_path / "labelled.npz", x=x, y=np.arange(30) % 3)
    doc = open_data(str(tmp_path / "ids.npz"), (8,)).describe()
    assert {k: doc[k] for k in ("labels", "target_shape", "binary", "mean", "std", "label_shape", "max_token_id")} == {
        "labels": "classes", "target_shape": None, "binary": False, "mean": None, "std": None, "label_shape": [8],
        "max_token_id": int(x.max())}
    assert open_data(str(tmp_path / "labelled.npz"), (8,)).describe()["label_shape"] == []


def test_labels_that_do_not_fit_the_model_are_measured_by_agreement(run_cli, tmp_path):
    """Next-token labels made up for a classifier, one label per sequence for a language model, and ids the model
    cannot read: agreement, or one line, never a traceback."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 100, (60, 16))
    np.savez(tmp_path / "labelled.npz", x=x, y=x[:, 0] % 3)
    np.savez(tmp_path / "ids.npz", x=x)
    np.savez(tmp_path / "badid.npz", x=x + 50)
    np.savez(tmp_path / "float.npz", x=x.astype(np.float32))
    assert run_cli("partition", f"{HF}:bert", "-w", "bert").exit_code == 0
    for args in (["data", "ids.npz"], ["eval", "--data", "ids.npz"]):
        r = run_cli(*args, "-w", "bert", "--format", "json")
        assert r.exit_code == 0, (args, r.stderr)
    assert json.loads(r.stdout)["metric"] == "agreement" and "ids.npz has no labels" in r.stderr
    r = run_cli("data", "ids.npz", "-w", "bert")
    assert "max token id   99" in r.stdout and "mean" not in r.stdout
    for args, message in ((["data", "badid.npz"], "badid.npz: token id 149 (train example "),
                          (["data", "badid.npz"], "is the largest id, but the model's vocabulary has 100 ids (0..99)"),
                          (["distill", "--width", "0.5", "--data", "float.npz"],
                           "float.npz: x holds float32 values, but the model reads integer token ids")):
        r = run_cli(*args, "-w", "bert")
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert run_cli("partition", f"{HF}:gpt2", "-w", "gpt2").exit_code == 0
    r = run_cli("eval", "--data", "labelled.npz", "-w", "gpt2", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["metric"] == "agreement" and "labels of labelled.npz have shape B" in r.stderr
    r = run_cli("kd", "--width", "0.5", "--data", "labelled.npz", "--epochs", "1", "--batch-size", "16", "-w", "gpt2",
                "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert "so only the teacher is matched" in r.stderr


def test_one_file_named_two_ways_is_one_data_set(run_cli, tmp_path):
    # the job keys and the students' data identity took --data as typed: a retrain, and stitch warned that the
    # students came from other data than the (remembered, absolute) file they came from
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (80, 6))
    np.savez(tmp_path / "ids.npz", x=x, y=x[:, 0] % 3)
    model = pathlib.Path(__file__).resolve().parent / "models_for_tests.py"
    assert run_cli("partition", f"{model}:token_classifier", "--input-shape", "1,6", "--input-dtype", "int64").exit_code == 0
    fast = ["--width", "0.5", "--steps", "4", "--batch-size", "16", "--val-size", "16", "--format", "json"]
    r = run_cli("distill", "--data", "ids.npz", *fast)
    assert r.exit_code == 0, r.stderr
    assert {row["status"] for row in json.loads(r.stdout)["candidates"]} == {"done"}
    r = run_cli("distill", "--data", str(tmp_path / "ids.npz"), *fast)
    assert r.exit_code == 0 and "replacing" not in r.stderr, r.stderr
    assert {row["status"] for row in json.loads(r.stdout)["candidates"]} == {"skipped"}
    r = run_cli("stitch", "-o", "s.onnx")
    assert r.exit_code == 0, r.stderr
    assert "distilled from other data" not in r.stderr

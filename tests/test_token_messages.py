"""One line, exit status 1 and the right fix when token data does not fit the model (or the model reads images)."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from click.testing import CliRunner

from ndc.cli import main

pytest.importorskip("transformers")

HF = pathlib.Path(__file__).resolve().parent.parent / "examples" / "transformers_models.py"
CNN = '''
import torch.nn as nn

def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10)).eval()
'''
OOV = "token id 110 ({}) is the largest id, but the model's vocabulary has 100 ids (0..99); " \
      "tokenise with the model's own tokenizer"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _error(result) -> str:
    """The one line a refusal prints (besides warnings), after checking it is one line with exit status 1."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0][len("Error: "):]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A GPT-2 (vocabulary 100, 64 positions) read at length 8, in workspace lm and as lm.onnx/.pt2/.pt; a CNN reading
    1x16x16 images in workspace cnn and as cnn.onnx; token data with an id of 110 in a training sequence (big.npz)
    or only at position 0 of a test sequence (first.npz, so that it is no next-token label)."""
    folder = tmp_path_factory.mktemp("token_messages")
    before = os.getcwd()
    os.chdir(folder)
    try:
        (folder / "cnn.py").write_text(CNN)
        x = np.random.default_rng(0).integers(0, 100, size=(20, 8))
        np.savez("tokens.npz", x=x)
        big = x.copy()
        big[3, 5] = 110
        np.savez("big.npz", x=big)
        first = x.copy()
        first[18, 0] = 110  # the held-out test split is the last 4 sequences: test example 2
        np.savez("first.npz", x=first)
        assert _cli("partition", f"{HF}:gpt2", "--input-shape", "1,8", "-w", "lm").exit_code == 0
        assert _cli("partition", "cnn.py:cnn", "--input-shape", "1,1,16,16", "-w", "cnn").exit_code == 0
        for ws, out in (("lm", "lm.onnx"), ("lm", "lm.pt2"), ("lm", "lm.pt"), ("cnn", "cnn.onnx")):
            r = _cli("stitch", "-w", ws, "--width", "1.0", "-o", out)
            assert r.exit_code == 0, r.stderr
        yield folder
    finally:
        os.chdir(before)


@pytest.fixture
def here(made, monkeypatch):
    monkeypatch.chdir(made)
    return made


@pytest.mark.parametrize("model", ["lm.onnx", "lm.pt2", "lm.pt"])
def test_an_id_outside_the_vocabulary_is_named_without_a_workspace(here, model):
    # it was a label outside the model's classes, with advice (--metric agreement) that needs a workspace
    pickle = ["--trust-pickle"] if model.endswith(".pt") else []
    for extra in ([], ["--metric", "agreement"], ["-w", "lm"]):
        assert _error(_cli("eval", model, "--data", "big.npz", *pickle, *extra)) == \
            "big.npz: " + OOV.format("train example 3"), extra
        # at position 0 the id is no next-token label: it went straight to "agreement ... pass -w"
        assert _error(_cli("eval", model, "--data", "first.npz", *pickle, *extra)) == \
            "first.npz: " + OOV.format("test example 2"), extra


def test_class_labels_outside_the_outputs_without_a_teacher_give_advice_that_works(here):
    from ndc.heads import Head
    from ndc.scoring import pick_metric

    class Data:
        name, labels, label_shape, classes, binary, target_shape = "d.npz", "classes", (), 12, False, None

        def check_classes(self, outputs, hint=""):
            raise AssertionError(hint)

    with pytest.raises(AssertionError) as e:
        pick_metric("auto", Data(), Head((10,)), labels_must_fit=True, without_teacher="pass -w with the workspace m.onnx was made from")
    assert str(e.value) == "to score by agreement with the teacher instead, pass -w with the workspace m.onnx was made from"


def test_token_data_for_an_image_model_says_so(here):
    message = "tokens.npz holds token ids (int64 sequences of length 8), but the model reads images [1, 16, 16], not token ids"
    assert _error(_cli("eval", "cnn.onnx", "--data", "tokens.npz")) == message
    assert _error(_cli("eval", "cnn.onnx", "--data", "tokens.npz", "-w", "cnn")) == message
    assert _error(_cli("eval", "--data", "tokens.npz", "-w", "cnn")) == message


def test_eval_without_data_suggests_token_data_for_a_token_model(here):
    token = ("ndc eval needs --data SPEC; the model reads token ids: e.g. --data ids.npz (an integer array x of "
             "shape (N, L)) or --data text:FILE (tokenised with the tokenizer.json beside it)")
    assert _error(_cli("eval", "lm.onnx", "-w", "lm")) == token
    assert _error(_cli("eval", "-w", "lm")) == token
    assert _error(_cli("eval", "lm.onnx")) == token
    assert _error(_cli("eval", "cnn.onnx", "-w", "cnn")) == "ndc eval needs --data SPEC, e.g. --data fashion-mnist or --data digits"
    # the other stages that need data say the same for a token workspace
    tail = token.split("; ", 1)[1]
    assert _error(_cli("distill", "--width", "0.5", "-w", "lm")) == f"give --data SPEC ({tail}) or --data-free"
    assert _error(_cli("probe", "-w", "lm")) == f"ndc probe measures accuracy under noise: give --data SPEC, {tail}"
    assert _error(_cli("search", "--max-drop", "1", "-w", "lm")).endswith(f"(the data the teacher was trained on), {tail}")


def test_a_sequence_longer_than_the_position_table_is_named(here):
    r = _cli("partition", f"{HF}:gpt2", "--input-shape", "1,100", "-w", "long")
    assert _error(r) == ("the model does not run on the example input: its sequence of 100 positions is longer than "
                         "the model's position table (64 positions) at node embedding_1; give --input-shape 1,L "
                         "with L at most 64")
    r = _cli("partition", f"{HF}:gpt2", "--input-shape", "1,100", "--frontend", "fx", "-w", "long")
    assert _error(r) == ("the model does not run on the example input [1, 100] (int64): its sequence of 100 positions "
                         "is longer than the model's position table (64 positions) in module transformer.wpe "
                         "(Embedding); give --input-shape 1,L with L at most 64")

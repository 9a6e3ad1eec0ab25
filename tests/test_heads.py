"""Losses and metrics for any head: a sigmoid (multi-label) teacher and a regression teacher, end to end.

Each teacher is a small MLP on 16-vectors, trained here for a moment on an
.npz of random inputs: five 0/1 targets per example for the sigmoid head,
three real values for the regression head. Both are partitioned, distilled
(a few steps), stitched, then fine-tuned, trained from scratch, evaluated,
searched and probed with the new --loss and --metric options.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ndc.errors import NdcError
from ndc.losses import Loss, bce_loss, choose_loss, mse_loss
from ndc.heads import Head
from ndc.scoring import Divergence, Metric, choose_metric, score

HERE = pathlib.Path(__file__).resolve().parent
MODELS = HERE / "models_for_tests.py"


def invoke(*args):
    from ndc.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def make_data(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    labels = (x @ rng.standard_normal((16, 5)) > 0).astype(np.uint8)
    values = np.tanh(x @ rng.standard_normal((16, 3))).astype(np.float32)
    paths = {"multi": folder / "multi.npz", "values": folder / "values.npz", "inputs": folder / "inputs.npz"}
    np.savez(paths["multi"], x=x[:320], y=labels[:320], x_test=x[320:], y_test=labels[320:])
    np.savez(paths["values"], x=x[:320], y=values[:320], x_test=x[320:], y_test=values[320:])
    np.savez(paths["inputs"], x=x)
    return paths


def train_teacher(factory: str, data: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    from safetensors.torch import save_file

    from tests import models_for_tests

    torch.manual_seed(0)
    model = getattr(models_for_tests, factory)()
    arrays = np.load(data)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]).float()
    loss_fn = F.binary_cross_entropy if factory == "sigmoid_mlp" else F.mse_loss
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """{"sigmoid": ..., "regression": ...}: each a workspace with a width-0.25 student stitched, and its data."""
    root = tmp_path_factory.mktemp("heads")
    data = make_data(root)
    out = {"inputs": data["inputs"]}
    for name, factory, spec in (("sigmoid", "sigmoid_mlp", data["multi"]), ("regression", "regression_mlp", data["values"])):
        ws = root / name
        weights = train_teacher(factory, spec, root / f"{name}.safetensors")
        for args in (["partition", f"{MODELS}:{factory}", "--weights", weights, "--input-shape", "1,16", "--by", "layers",
                      "--every", "2"],
                     ["distill", "--width", "0.25,0.5", "--data", spec, "--steps", "10", "--quiet"],
                     ["stitch", "--width", "0.25", "-o", root / f"{name}.onnx", "--data", spec]):
            r = invoke(*args, "-w", ws)
            assert r.exit_code == 0, r.output
        out[name] = {"ws": ws, "data": spec, "onnx": root / f"{name}.onnx"}
    return out


def run_json(*args) -> dict:
    r = invoke(*args, "--format", "json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def one_line_error(*args) -> str:
    r = invoke(*args)
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1, r.stderr
    return r.stderr


# ------------------------------------------------------------------ end to end


def test_finetune_picks_bce_for_a_sigmoid_head_and_mse_for_a_regression_head(heads):
    sigmoid, regression = heads["sigmoid"], heads["regression"]
    r = invoke("finetune", "--data", sigmoid["data"], "--epochs", "2", "-w", sigmoid["ws"], "--format", "json")
    assert r.exit_code == 0, r.output
    assert "loss bce: the teacher's output comes from a sigmoid" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["loss"] == "bce" and doc["metric"] == "accuracy" and len(doc["history"]) == 2
    assert doc["score"] == doc["accuracy"] >= doc["initial_score"]  # the starting weights compete: never worse
    assert all(e["score"] == e["accuracy"] for e in doc["history"])

    r = invoke("finetune", "--data", regression["data"], "--epochs", "2", "-w", regression["ws"], "--format", "json")
    assert r.exit_code == 0, r.output
    assert "loss mse: the labels are real-valued targets" in r.stderr
    doc = json.loads(r.stdout)
    # real-valued targets that fit the output: epochs are chosen by R² against them, not by closeness to the teacher
    assert doc["loss"] == "mse" and doc["metric"] == "r2" and doc["higher_is_better"] is True
    assert "accuracy" not in doc and 0.5 < doc["teacher_score"] < 1  # the teacher's own R²
    assert all("accuracy" not in e for e in doc["history"])
    assert doc["score"] == max([doc["initial_score"]] + [e["score"] for e in doc["history"]])


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_finetune_takes_an_explicit_loss(heads, loss):
    sigmoid = heads["sigmoid"]
    doc = run_json("finetune", "--data", sigmoid["data"], "--loss", loss, "--epochs", "1", "--restart", "-w", sigmoid["ws"])
    assert doc["loss"] == loss and doc["epochs"] == 1


def test_kd_baselines_on_both_heads(heads):
    sigmoid, regression = heads["sigmoid"], heads["regression"]
    doc = run_json("kd", "--width", "0.25", "--data", sigmoid["data"], "--loss", "bce", "--epochs", "2", "-w", sigmoid["ws"])
    assert doc["loss"] == "bce" and doc["folder"].startswith("kd/bce-") and 0 <= doc["score"] <= 1
    doc = run_json("kd", "--width", "0.25", "--data", regression["data"], "--loss", "mse", "--epochs", "2",
                   "--metric", "output-error", "-w", regression["ws"])
    assert doc["loss"] == "mse" and doc["metric"] == "output-error" and doc["score"] > 0
    assert (regression["ws"] / doc["folder"] / "checkpoint.json").is_file()
    assert "class labels" in one_line_error("kd", "--width", "0.25", "--data", regression["data"], "--loss", "ce",
                                             "-w", regression["ws"])
    # a loss asked for by name that cannot use the targets: refused, not trained on the teacher alone with a warning
    assert one_line_error("kd", "--width", "0.25", "--data", regression["data"], "--loss", "bce", "-w", regression["ws"]) \
        .endswith("values.npz (3 values per example, not 0/1) with the teacher's output Bx3; give targets that fit, "
                  "another --loss, or --lambda 0 to match the teacher alone\n")


def test_eval_metrics_on_both_heads(heads, tmp_path):
    sigmoid, regression = heads["sigmoid"], heads["regression"]
    doc = run_json("eval", "--data", sigmoid["data"], "-w", sigmoid["ws"])
    assert doc["metric"] == "accuracy" and 0.5 < doc["teacher_score"] <= 1 and doc["agreement"] is not None
    agree = run_json("eval", "--data", sigmoid["data"], "-w", sigmoid["ws"], "--metric", "agreement")
    assert agree["score"] == pytest.approx(doc["agreement"]) and agree["accuracy"] is None
    err = run_json("eval", "--data", regression["data"], "-w", regression["ws"], "--metric", "output-error")
    assert err["metric"] == "output-error" and err["score"] > 0 and err["higher_is_better"] is False
    # regression targets: R² against them by default, the teacher's too; agreement means nothing here
    r2 = run_json("eval", "--data", regression["data"], "-w", regression["ws"])
    assert r2["metric"] == "r2" and r2["higher_is_better"] is True and r2["agreement"] is None
    assert 0.5 < r2["teacher_score"] < 1 and r2["score"] < 1
    r = invoke("eval", "--data", regression["data"], "-w", regression["ws"])
    assert r.exit_code == 0 and "R²" in r.stdout and "warning" not in r.stderr, r.output

    # A user's function sees the whole set's outputs, the teacher's, and the labels.
    (tmp_path / "metrics.py").write_text(
        "def neg_mse(student, teacher, y):\n"
        "    return -float(((student - y) ** 2).mean())\n"
        "neg_mse.higher_is_better = True\n")
    doc = run_json("eval", "--data", regression["data"], "-w", regression["ws"], "--metric", f"{tmp_path / 'metrics.py'}:neg_mse")
    from ndc.data import open_data
    from ndc.plan import load_teacher
    from ndc.stitch import latest_student, load_student
    from ndc.workspace import Workspace

    ws = Workspace(regression["ws"])
    data = open_data(str(regression["data"]), (16,), workspace=ws)
    student = load_student(ws, latest_student(ws), teacher=load_teacher(ws))  # what eval scores
    x, y = (torch.cat(t) for t in zip(*data.batches("test", 64)))
    with torch.no_grad():
        expected = -float(((student(x) - y) ** 2).mean())
    assert doc["score"] == pytest.approx(expected, rel=1e-5)
    rmse = run_json("eval", "--data", regression["data"], "-w", regression["ws"], "--metric", "rmse")
    assert rmse["score"] == pytest.approx(math.sqrt(-expected), rel=1e-5) and rmse["higher_is_better"] is False
    # inputs the teacher was not trained on predict worse than the targets' mean: said, as near-chance accuracy is
    r = invoke("eval", "--data", regression["data"], "-w", regression["ws"], "--normalize", "3/0.2")
    assert r.exit_code == 0 and "warning: the teacher scores R² -" in r.stderr \
        and "its predictions are worse than the targets' mean" in r.stderr, r.output
    # without the attribute, which way is better is a guess: said (search and fine-tuning rely on it)
    (tmp_path / "metrics.py").write_text("def mae(student, teacher, y):\n    return float((student - y).abs().mean())\n")
    r = invoke("eval", "--data", regression["data"], "-w", regression["ws"], "--metric", f"{tmp_path / 'metrics.py'}:mae")
    assert r.exit_code == 0 and ":mae: higher values taken as better (the function has no higher_is_better attribute; " \
        "set it to False for an error or a loss)" in r.stderr, r.stderr

    assert "real-valued targets" in one_line_error("eval", "--data", regression["data"], "-w", regression["ws"],
                                                   "--metric", "accuracy")
    assert "multi-label" in one_line_error("eval", "--data", sigmoid["data"], "-w", sigmoid["ws"], "--metric", "top-2")
    r = invoke("eval", "--data", sigmoid["data"], "-w", sigmoid["ws"], "--metric", "nonsense")
    assert r.exit_code == 2 and "unknown metric 'nonsense'" in r.stderr


def test_eval_of_an_exported_file_finds_its_sigmoid(heads):
    sigmoid = heads["sigmoid"]
    doc = run_json("eval", sigmoid["onnx"], "--data", sigmoid["data"], "-w", "no-workspace-here")
    assert doc["metric"] == "accuracy" and doc["teacher_score"] is None
    with_teacher = run_json("eval", sigmoid["onnx"], "--data", sigmoid["data"], "-w", sigmoid["ws"])
    assert doc["score"] == pytest.approx(with_teacher["score"])  # thresholded at 0.5 with or without the teacher


def test_a_file_without_the_teachers_sigmoid_is_scored_by_its_own_threshold(heads, tmp_path):
    # The sigmoid teacher's own weights exported without the sigmoid: logits, whose positives are those above 0.
    # Scored against the workspace's teacher (probabilities, positive above 0.5), it predicts exactly as it does.
    from safetensors.torch import load_file

    from ndc.passes.export import export_model
    from tests.models_for_tests import HeadMLP

    sigmoid = heads["sigmoid"]
    logits = HeadMLP(5, sigmoid=False)
    logits.load_state_dict(load_file(str(sigmoid["ws"].parent / "sigmoid.safetensors")))
    export_model(logits, tmp_path / "logits.onnx", (1, 16), latency_runs=0)
    doc = run_json("eval", tmp_path / "logits.onnx", "--data", sigmoid["data"], "-w", sigmoid["ws"])
    assert doc["agreement"] == 1.0 and doc["score"] == pytest.approx(doc["teacher_score"])


def test_search_and_probe_by_output_error_on_a_regression_head(heads):
    regression = heads["regression"]
    doc = run_json("search", "--data", regression["data"], "--metric", "output-error", "--budget", "params=60%",
                   "-w", regression["ws"])
    assert doc["metric"] == "output-error" and doc["teacher_accuracy"] == 0.0
    assert doc["objective"] == "divergence" and doc["divergence"] == "squared-error"
    for options in doc["table"].values():
        assert all(o["drop"] == pytest.approx(100 * o["accuracy"]) for o in options)  # error in points above 0
    assert doc["predicted_accuracy"] == pytest.approx(doc["predicted_drop"] / 100)  # lower is better: teacher + drop
    assert doc["params"] <= 0.6 * doc["teacher_params"]
    assert doc["measured_accuracy"] > 0

    probe = run_json("probe", "--data", regression["data"], "--metric", "output-error", "--eps", "0,1", "-w",
                     regression["ws"])
    assert probe["metric"] == "output-error" and probe["baseline"] == 0.0
    for curve in probe["curves"].values():
        assert curve[0]["drop"] == 0.0 and curve[1]["drop"] > 0


def test_unlabelled_data_trains_and_scores_against_the_teacher(heads):
    sigmoid = heads["sigmoid"]
    r = invoke("finetune", "--data", heads["inputs"], "--epochs", "1", "--restart", "-w", sigmoid["ws"], "--format", "json")
    assert r.exit_code == 0, r.output
    assert "has no labels, so only the teacher is matched" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["metric"] == "agreement" and doc["teacher_score"] == 1.0
    assert "has no labels" in one_line_error("eval", "--data", heads["inputs"], "-w", sigmoid["ws"], "--metric", "accuracy")
    doc = run_json("search", "--data", heads["inputs"], "-w", sigmoid["ws"])
    assert doc["metric"] == "agreement" and doc["teacher_accuracy"] == 1.0


# ------------------------------------------------------------------ the pieces


class Fake:
    """What choose_loss and choose_metric read of a data source (``label_shape``: where the class labels are, () per
    example, (L,) per position; ``next_tokens``: labels ndc made up from unlabelled token ids)."""

    def __init__(self, labels="classes", classes=10, target_shape=None, binary=False, label_shape=(), next_tokens=False):
        self.name, self.labels, self.classes = "fake", labels, classes
        self.target_shape, self.binary = target_shape, binary
        self.label_shape, self.next_tokens = label_shape, next_tokens

    def check_classes(self, outputs, hint=""):
        if self.classes > outputs:
            raise NdcError(f"fake: a label is outside the model's {outputs} classes")


@pytest.mark.parametrize("head, data, loss, labels", [
    (Head((10,)), Fake(), "kd", True),
    (Head((5,), sigmoid=True), Fake("targets", None, (5,), True), "bce", True),
    (Head((5,)), Fake("targets", None, (5,), True), "bce", True),  # logits of a multi-label head
    (Head((3,)), Fake("targets", None, (3,)), "mse", True),
    (Head((1,)), Fake("none", None), "mse", False),
    (Head((8, 4, 4)), Fake(), "mse", False),  # a feature map: not class scores
    (Head((10,)), Fake("none", None), "kd", False),
])
def test_auto_loss(head, data, loss, labels):
    name, uses_labels, why = choose_loss("auto", head, data)
    assert (name, uses_labels) == (loss, labels) and why.startswith(f"loss {loss}: ")


def test_explicit_losses_the_head_cannot_take_are_one_line():
    with pytest.raises(NdcError, match="needs a vector of scores per example"):
        choose_loss("kd", Head((8, 4, 4)), Fake())
    with pytest.raises(NdcError, match="--loss ce trains on class labels alone, but fake has no labels"):
        choose_loss("ce", Head((10,)), Fake("none", None))
    with pytest.raises(NdcError, match=r"targets, not class labels; use --loss bce \(0/1 targets, one per output\)"):
        choose_loss("ce", Head((5,)), Fake("targets", None, (5,), True))  # multi-label rows
    name, _, why = choose_loss("kd", Head((5,), sigmoid=True), Fake("targets", None, (5,), True))
    assert name == "kd" and why.endswith("; the teacher ends in a sigmoid: --loss bce matches its probabilities, kd "
                                         "softmaxes them as class scores")  # said (warned), not refused
    with pytest.raises(NdcError, match="unknown --loss 'hinge'"):
        choose_loss("hinge", Head((10,)), Fake())


@pytest.mark.parametrize("head, data, metric, threshold", [
    (Head((10,)), Fake(), "accuracy", None),
    (Head((5,), sigmoid=True), Fake("targets", None, (5,), True), "accuracy", 0.5),
    (Head((5,)), Fake("targets", None, (5,), True), "accuracy", 0.0),
    (Head((1,), sigmoid=True), Fake("classes", 2), "accuracy", 0.5),  # 0/1 labels, one sigmoid output
    (Head((5,)), Fake("classes", 10), "agreement", None),  # labels the output cannot score
    (Head((10,)), Fake("none", None), "agreement", None),
    (Head((3,)), Fake("targets", None, (3,)), "r2", None),  # regression: R² against the targets
    (Head((2,)), Fake("targets", None, (3,)), "output-error", None),  # targets the output cannot be compared with
    (Head((8, 4, 4)), Fake(), "output-error", None),
])
def test_auto_metric(head, data, metric, threshold):
    chosen, why = choose_metric("auto", data, head)
    assert (chosen.name, chosen.threshold) == (metric, threshold)
    assert (why is None) == (metric in ("accuracy", "r2"))


def test_label_error_metrics_need_targets_of_the_outputs_size():
    assert choose_metric("rmse", Fake("targets", None, (3,)), Head((3,)))[0].name == "rmse"
    with pytest.raises(NdcError, match=r"cannot measure mae: .* and the labels of fake are classes; use --metric "
                                       "output-error or a function"):
        choose_metric("mae", Fake(), Head((10,)))
    with pytest.raises(NdcError, match="the targets of fake have shape 3, the teacher's output Bx2"):
        choose_metric("r2", Fake("targets", None, (3,)), Head((2,)))


def test_losses_match_their_formulas():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), (torch.rand(6, 5) > 0.5).float()
    assert torch.allclose(mse_loss(s, t, y, lam=0.5), F.mse_loss(s, t) + 0.5 * F.mse_loss(s, y))
    logits = bce_loss(s, t, y)
    expected = (F.binary_cross_entropy(torch.sigmoid(s), torch.sigmoid(t))
                + F.binary_cross_entropy(torch.sigmoid(s), y))
    assert torch.allclose(logits, expected, atol=1e-5)
    # A model that outputs probabilities itself gets the same loss from its probabilities.
    probabilities = bce_loss(torch.sigmoid(s), torch.sigmoid(t), y, probabilities=True)
    assert torch.allclose(probabilities, expected, atol=1e-4)
    # Without labels (or with λ = 0) only the teacher term remains.
    assert torch.allclose(Loss("mse", labels=False)(s, t, y), F.mse_loss(s, t))
    assert torch.allclose(Loss("kd", lam=0.0)(s, t, torch.zeros(6, dtype=torch.long)),
                          Loss("kd", labels=False)(s, t, None))


def test_metric_values():
    x = torch.eye(4)
    labels = torch.tensor([0, 1, 3, 3])
    batches = [(x, labels)]
    identity = torch.nn.Identity()
    assert score(identity, batches, Metric("accuracy")) == 0.75
    assert score(lambda v: v + torch.tensor([0, 0, 0.5, 0]), batches, Metric("top-2")) == 1.0  # the 2nd best counts
    assert score(identity, batches, Metric("agreement"), teacher=lambda v: v.flip(1)) == 0.0
    half = score(lambda v: 0.5 * v, batches, Metric("output-error"), teacher=identity)
    assert half == pytest.approx(0.5)  # ‖0.5x − x‖ / ‖x‖
    assert Metric("output-error").better(0.1, 0.2) and Metric("accuracy").better(0.2, 0.1)
    assert Metric("accuracy").drop(0.9, 0.8) == pytest.approx(10.0)
    assert Metric("output-error").drop(0.0, 0.1) == pytest.approx(10.0)
    with pytest.raises(NdcError, match="unknown metric 'top-0'"):
        Metric("top-0")
    # against real-valued targets: y has mean 2 and Σ(y − ȳ)² = 8; the errors are 1, −1, 0, 2
    y = torch.tensor([[0.0], [2.0], [2.0], [4.0]])
    off = [(x[:, :1] * 0 + y - torch.tensor([[1.0], [-1.0], [0.0], [2.0]]), y)]
    assert score(identity, off, Metric("r2")) == pytest.approx(1 - 6 / 8)
    assert score(identity, off, Metric("rmse")) == pytest.approx(math.sqrt(6 / 4))
    assert score(identity, off, Metric("mae")) == pytest.approx(1.0)
    assert score(lambda v: v * 0 + 2, off, Metric("r2")) == pytest.approx(0.0)  # the mean itself: R² 0
    assert Metric("r2").better(0.9, 0.8) and Metric("rmse").better(0.1, 0.2) and not Metric("mae").fraction
    assert Metric("r2").fraction and Metric("r2").drop(0.9, 0.8) == pytest.approx(10.0)
    assert math.isinf(score(identity, [(x, None)], Metric("output-error"), teacher=lambda v: 0 * v))


@pytest.mark.parametrize("head, data, kind, probabilities", [
    (Head((10,)), Fake(), "kl", False),
    (Head((12, 50)), Fake("none", None), "kl", False),  # a language model's next-token scores
    (Head((5,), sigmoid=True), Fake("targets", None, (5,), True), "bernoulli-kl", True),
    (Head((5,)), Fake("targets", None, (5,), True), "bernoulli-kl", False),
    (Head((3,)), Fake("targets", None, (3,)), "squared-error", False),
    (Head((8, 4, 4)), Fake(), "squared-error", False),
])
def test_divergence_follows_the_head(head, data, kind, probabilities):
    assert Divergence.of(head, data) == Divergence(kind, probabilities)


def divergence(kind: str, s: torch.Tensor, t: torch.Tensor, probabilities: bool = False, batch: int = 2) -> float:
    tally = Divergence(kind, probabilities).tally()
    for i in range(0, len(s), batch):
        tally.add(s[i:i + batch], t[i:i + batch], None)
    return tally.result()


def test_divergence_values():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    assert divergence("kl", s, t) == pytest.approx(float(kl))
    tokens_s, tokens_t = s.reshape(3, 2, 5), t.reshape(3, 2, 5)  # per position, averaged over positions
    assert divergence("kl", tokens_s, tokens_t, batch=1) == pytest.approx(float(kl))
    p, q = torch.sigmoid(t), torch.sigmoid(s)
    bernoulli = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(1).mean()
    assert divergence("bernoulli-kl", s, t) == pytest.approx(float(bernoulli))
    assert divergence("bernoulli-kl", q, p, probabilities=True) == pytest.approx(float(bernoulli), rel=1e-5)
    assert divergence("squared-error", s, t) == pytest.approx(float(((s - t) ** 2).sum() / (t * t).sum()))
    for kind in ("kl", "bernoulli-kl", "squared-error"):
        assert divergence(kind, t, t) == 0.0  # the teacher's own outputs
        assert divergence(kind, s, t) > 0
    with pytest.raises(NdcError, match="unknown divergence 'js'"):
        Divergence("js")


def test_divergence_is_computed_in_pieces_of_bounded_size(monkeypatch):
    from ndc.scoring import _DivergenceTally

    torch.manual_seed(1)
    s, t = torch.randn(4, 3, 7), torch.randn(4, 3, 7)
    whole = divergence("kl", s, t, batch=4)
    monkeypatch.setattr(_DivergenceTally, "CHUNK", 10)  # one position's 7 scores per piece
    assert divergence("kl", s, t, batch=4) == pytest.approx(whole, rel=1e-12)
    assert divergence("squared-error", s, t, batch=4) == pytest.approx(float(((s - t) ** 2).sum() / (t * t).sum()))


# ------------------------------------------------------------------ labels that do not fit the head's positions

LM = Head((16, 100))  # a language model: next-token scores (B, L, V)
PER_SEQUENCE = {"classes": 3}  # one class per sequence, (N,)
NEXT_TOKENS = {"classes": 100, "label_shape": (16,), "next_tokens": True}  # made up by ndc from unlabelled ids


def test_labels_one_per_sequence_do_not_fit_a_language_model():
    data = Fake(**PER_SEQUENCE)
    metric, why = choose_metric("auto", data, LM)
    assert metric.name == "agreement" and "have shape B (one class per example)" in why and "Bx16x100" in why
    with pytest.raises(NdcError, match="cannot measure accuracy: the labels of fake have shape B .*Bx16x100"):
        choose_metric("accuracy", data, LM)
    name, labels, why = choose_loss("auto", LM, data)
    assert (name, labels) == ("kd", False) and "so only the teacher is matched" in why and "Bx16x100" in why
    with pytest.raises(NdcError, match="--loss ce trains on class labels alone, but the labels of fake have shape B"):
        choose_loss("ce", LM, data)
    # next tokens do fit it
    assert choose_metric("auto", Fake(**NEXT_TOKENS), LM)[0].name == "accuracy"
    assert choose_loss("auto", LM, Fake(**NEXT_TOKENS))[:2] == ("kd", True)


def test_next_token_labels_are_no_labels_for_a_classifier():
    from ndc.scoring import pick_metric

    data, head = Fake(**NEXT_TOKENS), Head((3,))
    metric = pick_metric("auto", data, head, labels_must_fit=True)  # ids 0..99 are not refused as classes
    assert metric.name == "agreement"
    assert "fake has no labels" in choose_metric("auto", data, head)[1]
    name, labels, why = choose_loss("auto", head, data)
    assert (name, labels) == ("kd", False) and why.endswith("fake has no labels, so only the teacher is matched")
    with pytest.raises(NdcError, match="--loss ce trains on class labels alone, but fake has no labels"):
        choose_loss("ce", head, data)


def test_labels_of_the_wrong_shape_are_one_line_in_scores_and_losses():
    from ndc.losses import kd_loss

    out, y = torch.randn(4, 16, 100), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(NdcError, match="labels of shape 4 do not fit scores of shape 4x16x100"):
        score(lambda v: out, [(torch.zeros(4, 16), y)], Metric("accuracy"))
    assert score(lambda v: out, [(torch.zeros(4, 16), y)], Metric("agreement"), teacher=lambda v: out) == 1.0
    with pytest.raises(NdcError, match="class labels of shape 4 do not fit scores of shape 4x16x100"):
        kd_loss(out, out, y)
    with pytest.raises(NdcError, match="class labels of shape 4 do not fit"):
        Loss("ce")(out, None, y)
    assert float(kd_loss(out, out, y, lam=0)) > 0  # no label term: the labels are not looked at

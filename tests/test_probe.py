"""The thresholding-effect probe: noise at each neighbourhood's output, drop against ε, thresholds, files."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from ndc.cli import main
from ndc.errors import NdcError
from ndc.probe import ALL, parse_eps, probe, threshold
from ndc.search import HeldOut

FACTORY = '''
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return F.relu(x + self.fc2(F.relu(self.bn(self.fc1(x)))))


class Net(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.stem = nn.Linear(64, d)
        self.blocks = nn.Sequential(Block(d), Block(d), Block(d))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x.flatten(1)))))


def teacher():
    return Net()
'''

DATA = ["--data", "digits", "--limit", "300"]
EPS = "0,0.01,0.1,0.3,1,3,10"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A trained residual MLP with batch norms on digits, its factory file and weights, and a workspace partitioning it."""
    from ndc.load import load_model
    from tests.conftest import fit_on_digits

    root = tmp_path_factory.mktemp("probe")
    factory = root / "net.py"
    factory.write_text(FACTORY)
    torch.manual_seed(0)
    net = load_model(f"{factory}:teacher").model
    fit_on_digits(net, epochs=20)
    torch.save(net.state_dict(), root / "net.pt")
    ws = root / "ws"
    r = invoke("partition", f"{factory}:teacher", "--weights", root / "net.pt", "--input-shape", "1,1,8,8", "-w", ws)
    assert r.exit_code == 0, r.output
    return {"factory": f"{factory}:teacher", "weights": root / "net.pt", "ws": ws}


@pytest.fixture(scope="module")
def teacher(model):
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    return load_teacher(Workspace(model["ws"]))


@pytest.fixture(scope="module")
def heldout():
    from ndc.data import open_data

    return HeldOut.first(open_data("digits", (1, 8, 8), limit=300), 300, batch_size=128)


def run_probe(teacher, heldout, **options):
    names = teacher.plan.names
    targets = [nb.name for nb in teacher.plan.trainable]
    return probe(teacher.parts(), names, heldout, targets=targets, eps=parse_eps(EPS), **options)


# ------------------------------------------------------------------ library


def test_zero_noise_gives_exactly_zero_drop(teacher, heldout):
    for relative in (False, True):
        result = run_probe(teacher, heldout, relative=relative)
        assert result.eps[0] == 0.0
        for target in result.curves:
            assert result.curves[target][0] == result.baseline
            assert result.drops(target)[0] == 0.0
        assert result.baseline > 0.8  # a trained teacher


def test_noise_hurts_and_all_neighbourhoods_hurt_most(teacher, heldout):
    result = run_probe(teacher, heldout)
    targets = [nb.name for nb in teacher.plan.trainable]
    assert set(result.curves) == {*targets, ALL} and len(targets) == 3
    assert all(result.drops(t)[-1] > 20 for t in result.curves)  # ε = 10 wrecks any boundary
    assert result.drops(ALL)[-1] >= max(result.drops(t)[-1] for t in targets) - 2
    assert result.thresholds[ALL] <= min(result.thresholds[t] for t in targets)
    for t in result.curves:
        k = result.eps.index(result.thresholds[t])
        assert all(d < 0.5 for d in result.drops(t)[: k + 1])
        assert result.drops(t)[k + 1] >= 0.5


def test_probe_is_deterministic_and_seeded(teacher, heldout):
    a = run_probe(teacher, heldout, seed=3)
    b = run_probe(teacher, heldout, seed=3)
    c = run_probe(teacher, heldout, seed=4)
    assert a.curves == b.curves
    assert a.curves != c.curves


def test_relative_noise_is_scaled_by_each_boundary_std(teacher, heldout):
    result = run_probe(teacher, heldout, relative=True)
    assert set(result.scales) == {nb.name for nb in teacher.plan.trainable}
    assert all(s > 0 for s in result.scales.values())
    absolute = run_probe(teacher, heldout)
    assert absolute.scales == {}


def test_threshold_is_the_largest_eps_before_the_first_crossing():
    assert threshold([0, 0.1, 1, 10], [0, 0.2, 3, 0.1], 0.5) == (0.1, False)  # a later dip does not count
    assert threshold([0, 0.1, 1], [0, 0.1, 0.2], 0.5) == (1, True)  # never crossed: a lower bound
    assert threshold([0.1, 1], [2, 3], 0.5) == (0.0, False)


@pytest.mark.parametrize("text", ["", "a,b", "-1,0", "nan"])
def test_bad_eps_is_a_user_error(text):
    with pytest.raises(NdcError, match="--eps"):
        parse_eps(text)


def test_eps_are_sorted_and_unique():
    assert parse_eps("1, 0.1,0,1") == [0.0, 0.1, 1.0]
    assert parse_eps(None)[0] == 0.0


# ------------------------------------------------------------------ command line


def test_probe_a_workspace_writes_csv_png_and_json(model, tmp_path):
    out = tmp_path / "out"
    r = invoke("probe", *DATA, "--eps", EPS, "--eval-size", "300", "-w", model["ws"], "--out", out, "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc["thresholds"]) == {"blocks.0", "blocks.1", "blocks.2", ALL}  # the distilled ones; stem and head are kept
    assert doc["eps"] == [0.0, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0]
    for target, points in doc["curves"].items():
        assert [p["eps"] for p in points] == doc["eps"]
        assert points[0]["drop"] == 0.0
    assert (out / "thresholds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert len(rows) == 4 * 7 and set(rows[0]) == {"target", "eps", "noise_std", "accuracy", "drop"}
    assert json.loads((out / "probe.json").read_text())["thresholds"] == doc["thresholds"]


def test_probe_text_lists_a_threshold_per_neighbourhood(model, tmp_path):
    r = invoke("probe", *DATA, "--eps", EPS, "--relative", "-w", model["ws"], "--out", tmp_path, "--by", "layers",
               "--input-shape", "1,3,8,8")
    assert r.exit_code == 0, r.output
    assert ("warning: --input-shape, --by are ignored: they partition a MODEL in memory, and a workspace has its plan"
            in r.stderr)
    assert "threshold ε" in r.stdout and "activation std" in r.stdout and "all" in r.stdout
    assert (tmp_path / "thresholds.png").is_file()


def test_probe_a_model_spec_partitions_it_in_memory(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*DATA, "--eps", EPS, "--format", "json"]
    from_model = invoke("probe", model["factory"], "--weights", model["weights"], "--input-shape", "1,1,8,8", *args)
    assert from_model.exit_code == 0, from_model.output
    from_ws = invoke("probe", model["ws"], "--out", tmp_path / "ws-probe", *args)
    a, b = json.loads(from_model.stdout), json.loads(from_ws.stdout)
    assert a["curves"] == b["curves"] and a["thresholds"] == b["thresholds"]
    assert (tmp_path / "ndc-work" / "probe" / "thresholds.png").is_file()  # MODEL form: under -w
    assert not (tmp_path / "ndc-work" / "plan.json").exists()  # ... and nothing else is written there


@pytest.mark.parametrize("args, message", [
    ([], "give --data SPEC"),
    ([*DATA, "--eps", "x"], "bad --eps"),
    ([*DATA, "--tolerance", "0"], "--tolerance"),
])
def test_probe_user_errors_are_one_line(model, args, message):
    r = invoke("probe", "-w", model["ws"], *args)
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1 and message in r.output


def test_probe_without_a_plan_says_what_to_do(tmp_path):
    r = invoke("probe", *DATA, "-w", tmp_path / "empty")
    assert r.exit_code == 1 and "ndc partition" in r.output


def test_a_drop_that_prints_as_the_tolerance_reaches_it():
    from ndc.probe import threshold

    assert threshold([0, 1, 10], [0.0, 0.49999999999999906, 3.0], 0.5) == (0, False)  # shown as 0.50: not below 0.5
    assert threshold([0, 1, 10], [0.0, 0.4999, 3.0], 0.5) == (1, False)

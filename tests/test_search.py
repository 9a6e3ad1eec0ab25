"""Student Search: candidate quality, the greedy and budget rules, the exact solver, selection.json, the Pareto plot."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ndc.cli import main
from ndc.errors import NdcError
from ndc.ir import Spec
from ndc.scoring import Divergence
from ndc.search import (Budget, HeldOut, Option, QualityTable, greedy, mckp_frontier, measure_quality, objective_of,
                        parse_budget, solve_budget, solve_mckp)

# A residual MLP on 8x8 digits: stem and head are kept, block1 and block2 are distilled.
FACTORY = '''
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


class ResMLP(nn.Module):
    def __init__(self, d=32, h=32):
        super().__init__()
        self.stem = nn.Linear(64, d)
        self.block1 = Block(d, h)
        self.block2 = Block(d, h)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(F.relu(self.block2(self.block1(F.relu(self.stem(x.flatten(1)))))))


def teacher():
    return ResMLP()
'''

DATA = ["--data", "digits", "--limit", "300"]
LIVE = 8  # hidden units of block1 the teacher uses: block1 compresses to width 0.25 without loss


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def train_teacher(factory_file, path) -> None:
    """Train on digits; block1 keeps only LIVE hidden units (the rest are zero), so it compresses exactly."""
    from ndc.load import load_model
    from tests.conftest import fit_on_digits

    torch.manual_seed(0)
    model = load_model(f"{factory_file}:teacher").model
    block = model.block1

    @torch.no_grad()
    def keep_dead_units_dead() -> None:
        block.fc1.weight[LIVE:] = 0
        block.fc1.bias[LIVE:] = 0
        block.fc2.weight[:, LIVE:] = 0

    fit_on_digits(model, epochs=40, after_step=keep_dead_units_dead)
    torch.save(model.state_dict(), path)


def spoil_candidate(ws_dir, name: str, spec: str) -> None:
    """Overwrite a trained candidate's weights with useless ones (its residual branch flipped and amplified),
    keeping its artefacts valid: the job's metrics.json names the new weights' hash."""
    from ndc.distill.config import Candidate
    from ndc.workspace import Workspace, sha256_file

    ws = Workspace(ws_dir)
    folder = Candidate(name, Spec.parse(spec)).folder
    state = ws.load_tensors(f"{folder}/weights.safetensors")
    state = {k: (-8.0 * v if k.endswith("fc2.weight") else v) for k, v in state.items()}
    ws.save_tensors(f"{folder}/weights.safetensors", state)
    metrics = ws.read_json(f"{folder}/metrics.json")
    metrics["weights_sha256"] = sha256_file(ws.path(f"{folder}/weights.safetensors"))
    ws.write_json(f"{folder}/metrics.json", metrics)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A workspace where block1 compresses well and block2 does not: real partition and distill (widths 0.25, 0.5),
    then block2's candidates spoiled so that their drop is large whatever the training did."""
    root = tmp_path_factory.mktemp("search")
    factory = root / "resmlp.py"
    factory.write_text(FACTORY)
    train_teacher(factory, root / "teacher.pt")
    ws = root / "ws"
    r = invoke("partition", f"{factory}:teacher", "--weights", root / "teacher.pt", "--input-shape", "1,1,8,8", "-w", ws)
    assert r.exit_code == 0, r.output
    r = invoke("distill", "--width", "0.25,0.5", *DATA, "--steps", "30", "-w", ws, "--format", "json")
    assert r.exit_code == 0, r.output
    for spec in ("width=0.25", "width=0.5"):
        spoil_candidate(ws, "block2", spec)
    return ws


@pytest.fixture
def ws(distilled, tmp_path):
    """A private copy of the distilled workspace (search writes into it)."""
    copy = tmp_path / "ws"
    shutil.copytree(distilled, copy)
    return copy


def search(ws, *args: str):
    r = invoke("search", *DATA, "--eval-size", "300", "-w", ws, "--format", "json", *args)
    return r, (json.loads(r.stdout) if r.exit_code == 0 else None)


# ------------------------------------------------------------------ the rules, end to end


def test_greedy_takes_a_small_candidate_where_it_is_harmless_and_keeps_the_teacher_where_not(ws):
    r, out = search(ws, "--max-drop", "1")
    assert r.exit_code == 0, r.output
    assert out["selection"] == {"block1": "width=0.25", "block2": "width=1.0"}
    assert out["teacher"] == ["block2"]
    assert out["candidates"]["block1"]["drop"] < 1
    assert any("block2" in note and "teacher" in note for note in out["notes"])
    spoiled = [o for o in out["table"]["block2"] if not o["teacher"]]
    assert all(o["drop"] > 10 for o in spoiled)
    # predicted and measured are both reported, and agree for a student this close to the teacher
    chosen = out["candidates"]["block1"]
    assert out["prediction"] == "divergence" and out["drop_per_divergence"] > 0
    assert out["predicted_drop"] == pytest.approx(out["drop_per_divergence"] * chosen["divergence"])
    assert out["additive_drop"] == pytest.approx(chosen["drop"])
    assert out["measured_accuracy"] is not None
    assert abs(out["measured_accuracy"] - out["predicted_accuracy"]) < 0.02
    assert out["calibrated_norms"] == 0 and out["measured_uncalibrated_accuracy"] == out["measured_accuracy"]  # no batch norms
    assert out["unseen"] is None  # --eval-size 300 takes every test example of --limit 300: none left to confirm on
    assert "the test split has no examples beyond the 300 held out" in r.stderr
    assert out["params"] == out["teacher_params"] - 2112 + 552
    on_disk = json.loads((ws / "selection.json").read_text())
    assert on_disk["selection"] == out["selection"] and on_disk["rule"] == "max-drop"


def test_stitch_refuses_a_selection_search_made_for_another_teacher(ws, distilled):
    r, out = search(ws, "--max-drop", "1", "--no-verify")
    assert r.exit_code == 0 and set(out["made_for"]) == {"block1", "block2"}
    factory = distilled.parent / "resmlp.py"
    r = invoke("partition", f"{factory}:teacher", "--input-shape", "1,1,8,8", "-w", ws)  # untrained weights now
    assert r.exit_code == 0, r.output
    r = invoke("distill", "--width", "0.25,0.5", *DATA, "--steps", "3", "-w", ws, "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("stitch", "-o", ws / "s.onnx", "-w", ws)
    assert r.exit_code == 1 and "selection.json was chosen by ndc search for another teacher or partition" in r.stderr
    r = invoke("stitch", "-o", ws / "s.onnx", "-w", ws, "--width", "0.5")  # a selection given is used
    assert r.exit_code == 0, r.output


def test_stitch_refuses_a_selection_whose_students_were_trained_again(ws):
    r, out = search(ws, "--max-drop", "1", "--no-verify")
    assert r.exit_code == 0 and out["selection"]["block1"] == "width=0.25" and set(out["weights"]) == {"block1"}
    spoil_candidate(ws, "block1", "width=0.25")  # the chosen student trained again, to other weights
    r = invoke("stitch", "-o", ws / "s.onnx", "-w", ws)
    assert r.exit_code == 1 and "selection.json was chosen by ndc search before the students of block1 were trained " \
        "again; rerun ndc search" in r.stderr, r.output
    assert search(ws, "--max-drop", "1", "--no-verify")[0].exit_code == 0
    assert invoke("stitch", "-o", ws / "s.onnx", "-w", ws).exit_code == 0  # searched again: stitched


def test_a_budget_the_teacher_fits_is_said(ws):
    r, out = search(ws, "--budget", "params=200%", "--no-verify")
    assert r.exit_code == 0, r.output
    assert "--budget params=200% is at least the teacher's size (6,634 params): the teacher itself fits it" in r.stderr
    assert out["params"] <= out["teacher_params"]


def test_greedy_fallback_widest_keeps_the_widest_trained_candidate(ws):
    r, out = search(ws, "--max-drop", "1", "--fallback", "widest", "--no-verify", "--calibrate", "5")
    assert r.exit_code == 0, r.output
    assert "--calibrate recalibrates the students search measures, and --no-verify measures none; ignored" in r.stderr
    assert out["selection"] == {"block1": "width=0.25", "block2": "width=0.5"}
    assert out["teacher"] == [] and out["measured_accuracy"] is None
    assert any("widest" in note for note in out["notes"])


def test_search_output_stitches_and_exports(ws, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r, out = search(ws, "--max-drop", "1")
    assert r.exit_code == 0, r.output
    r = invoke("stitch", "-o", tmp_path / "student.pt2", "-w", ws, "--format", "json")
    assert r.exit_code == 0, r.output
    stitched = json.loads(r.stdout)
    assert stitched["selection"] == out["selection"] and stitched["selection_file"] == str(ws / "selection.json")
    assert stitched["params"] == out["params"]
    assert (tmp_path / "student.pt2").is_file()
    r = invoke("stitch", "-o", tmp_path / "again.pt2", "--selection", ws / "selection.json", "-w", ws, "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["selection"] == out["selection"]


def test_budget_finds_the_least_drop_that_fits(ws):
    teacher_params = json.loads((ws / "plan.json").read_text())["teacher"]["params"]
    # room to shrink block1 to width 0.25, not to shrink block2 as well: block2 keeps the teacher
    r, out = search(ws, "--budget", f"params={teacher_params - 2112 + 552}")
    assert r.exit_code == 0, r.output
    assert out["rule"] == "budget" and out["budget"] == {"kind": "params", "limit": teacher_params - 2112 + 552}
    assert out["selection"]["block1"] in ("width=0.25", "width=0.5") and out["teacher"] == ["block2"]
    assert out["params"] <= out["budget"]["limit"]
    assert out["predicted_drop"] < 1 and out["measured_accuracy"] is not None
    # a budget that forces block2 down takes its least bad candidate
    r, out = search(ws, "--budget", f"params={teacher_params - 2 * (2112 - 1072)}", "--no-verify")
    assert r.exit_code == 0, r.output
    assert out["teacher"] == [] and out["params"] <= teacher_params - 2 * (2112 - 1072)


def test_budget_objective_is_recorded_and_divergences_are_in_the_table(ws):
    teacher_params = json.loads((ws / "plan.json").read_text())["teacher"]["params"]
    r, out = search(ws, "--budget", f"params={teacher_params - 2112 + 552}")
    assert r.exit_code == 0, r.output
    assert out["objective"] == "divergence" and out["divergence"] == "kl"
    assert all(o["divergence"] is not None and o["divergence"] >= 0 for opts in out["table"].values() for o in opts)
    assert all(o["divergence"] == 0.0 for opts in out["table"].values() for o in opts if o["teacher"])
    chosen = out["candidates"]
    assert out["summed_divergence"] == pytest.approx(sum(c["divergence"] for c in chosen.values()))
    r, by_drop = search(ws, "--budget", f"params={teacher_params - 2112 + 552}", "--objective", "drop", "--no-verify")
    assert r.exit_code == 0 and by_drop["objective"] == "drop" and by_drop["quality_reused"] is True
    r = invoke("search", *DATA, "--eval-size", "300", "-w", ws, "--budget", f"params={teacher_params}")
    assert r.exit_code == 0 and "(least summed divergence)" in r.stdout and " KL " in r.stdout.splitlines()[0] + " "
    assert "(drop 0.00 points = " in r.stdout and "x summed KL 0; summed drops +0.00)" in r.stdout  # the whole teacher fits


def test_infeasible_budget_is_one_line_naming_the_smallest_student(ws):
    r, _ = search(ws, "--budget", "params=1K")
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no student fits params <= 1,000")
    assert "the smallest the trained candidates can make has 3,514 params" in lines[0]


def test_plot_writes_pareto_png_and_csv(ws):
    r, out = search(ws, "--max-drop", "1", "--plot")
    assert r.exit_code == 0, r.output
    png, csv = ws / "search" / "pareto.png", ws / "search" / "pareto.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = csv.read_text().splitlines()
    assert rows[0] == "kind,label,params,flops,predicted_accuracy,measured_accuracy,selection"
    kinds = {row.split(",")[0] for row in rows[1:]}
    assert {"teacher", "uniform", "max-drop", "budget", "selected"} <= kinds
    assert out["files"] == {"csv": str(csv), "png": str(png)}


def test_quality_is_measured_once_and_reused(ws):
    r, first = search(ws, "--max-drop", "1", "--no-verify")
    assert r.exit_code == 0 and first["quality_reused"] is False
    r, second = search(ws, "--max-drop", "5", "--no-verify")
    assert r.exit_code == 0 and second["quality_reused"] is True
    assert second["table"] == first["table"]
    r, third = search(ws, "--max-drop", "5", "--no-verify", "--eval-size", "100")  # another held-out set: remeasured
    assert third["quality_reused"] is False and third["eval_size"] == 100


def test_the_choice_is_confirmed_on_test_examples_that_did_not_choose_it(ws):
    r = invoke("search", *DATA, "--eval-size", "100", "-w", ws, "--max-drop", "1", "--format", "json")
    assert r.exit_code == 0, r.output
    unseen = json.loads(r.stdout)["unseen"]
    assert unseen["examples"] == 200  # the 300 test examples of --limit 300 after the 100 held out
    assert unseen["drop"] == pytest.approx(100 * (unseen["teacher_accuracy"] - unseen["accuracy"]), abs=1e-5)
    assert 0.5 < unseen["accuracy"] <= 1
    from ndc.data import open_data
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    data = open_data("digits", (1, 8, 8), limit=300)
    x, y = next(data.batches("test", 300))
    with torch.no_grad():
        right = (load_teacher(Workspace(ws)).gm(x[100:]).argmax(1) == y[100:]).float().mean().item()
    assert unseen["teacher_accuracy"] == pytest.approx(right)
    r = invoke("search", *DATA, "--eval-size", "100", "-w", ws, "--max-drop", "1")
    assert "on 200 test examples that chose nothing" in r.stdout


def test_unseen_examples_are_the_test_examples_after_the_held_out_set():
    from ndc.data import open_data

    data = open_data("digits", (1, 8, 8), limit=300)
    heldout = HeldOut.first(data, 100, batch_size=64)
    unseen = heldout.unseen(150)
    everything = torch.cat([x for x, _ in data.batches("test", 300)])
    labels = torch.cat([y for _, y in data.batches("test", 300)])
    xs, ys = zip(*unseen.batches())
    assert unseen.size == 150 and torch.equal(torch.cat(xs), everything[100:250]) and torch.equal(torch.cat(ys), labels[100:250])
    assert sum(len(x) for x, _ in heldout.batches()) == 100
    assert heldout.unseen(1000).size == 200 and HeldOut.first(data, 300).unseen(10) is None


def test_text_output_reports_predicted_and_measured(ws):
    r = invoke("search", *DATA, "--eval-size", "300", "-w", ws, "--max-drop", "1")
    assert r.exit_code == 0, r.output
    assert "predicted" in r.stdout and "measured" in r.stdout and "selection.json" in r.stdout
    assert "<-" in r.stdout  # the chosen candidates are marked in the table


def test_without_a_rule_search_prints_the_table_and_writes_no_selection(ws):
    r = invoke("search", *DATA, "--eval-size", "300", "-w", ws)
    assert r.exit_code == 0, r.output
    assert "block1" in r.output and "width=0.25" in r.output and "no rule given" in r.output
    assert not (ws / "selection.json").exists()
    from ndc.search.files import OUTCOME_KEYS

    none = json.loads(invoke("search", *DATA, "--eval-size", "300", "-w", ws, "--format", "json").stdout)
    ruled = search(ws, "--max-drop", "1", "--no-verify")[1]
    assert set(OUTCOME_KEYS) <= set(ruled)  # what a rule chose and measured ...
    assert all(none[k] is None for k in OUTCOME_KEYS)  # ... is null without one, rather than missing


@pytest.mark.parametrize("args, message", [
    (["--max-drop", "1"], "give --data SPEC"),
    (["--max-drop", "1", "--budget", "params=5K", *DATA], "give one of --max-drop and --budget"),
    (["--budget", "memory=5K", *DATA], "bad --budget"),
    (["--max-drop", "1", "--objective", "drop", *DATA], "--objective is what --budget minimises"),
])
def test_user_errors_are_one_line(ws, args, message):
    (ws / "data.json").unlink()  # no data remembered from distill: search needs --data
    r = invoke("search", "-w", ws, *args)
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1 and message in r.output


def test_a_workspace_without_candidates_says_what_to_run(distilled, tmp_path):
    ws = tmp_path / "fresh"
    r = invoke("partition", f"{distilled.parent / 'resmlp.py'}:teacher", "--input-shape", "1,1,8,8", "-w", ws)
    assert r.exit_code == 0
    r = invoke("search", "--max-drop", "1", *DATA, "-w", ws)
    assert r.exit_code == 1 and "run ndc distill first" in r.output


# ------------------------------------------------------------------ quality, measured


def test_a_candidate_equal_to_the_teacher_part_has_exactly_zero_drop(distilled):
    from ndc.data import open_data
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    teacher = load_teacher(Workspace(distilled))
    data = open_data("digits", (1, 8, 8), limit=300)
    heldout = HeldOut.first(data, 200, batch_size=64)
    broken = teacher.part("block2")
    with torch.no_grad():
        broken.get_submodule("block2.fc2").weight.mul_(-8)
    score, scores, n, divergences = measure_quality(
        teacher.parts(), teacher.plan.names, {"block1": [(Spec(), teacher.part("block1"))], "block2": [(Spec(0.5), broken)]},
        heldout, "accuracy", Divergence("kl"))
    assert n == 200
    assert scores["block1", Spec()] == score
    assert scores["block2", Spec(0.5)] < score - 0.1
    assert divergences["block1", Spec()] == 0.0 and divergences["block2", Spec(0.5)] > 0.1
    _, agree, _, none = measure_quality(teacher.parts(), teacher.plan.names, {"block1": [(Spec(), teacher.part("block1"))]},
                                        heldout, "agreement")
    assert agree["block1", Spec()] == 1.0 and none == {}


# ------------------------------------------------------------------ the rules on hand-made tables


def table_of(rows: dict[str, list[tuple]], base: int = 100) -> QualityTable:
    """rows: neighbourhood -> [(spec or 'teacher', params, flops, drop[, divergence])]."""
    options = {}
    total = base
    for name, opts in rows.items():
        built = []
        for spec, params, flops, drop, *divergence in opts:
            teacher = spec == "teacher"
            total += params if teacher else 0
            built.append(Option(name, Spec() if teacher else Spec.parse(spec), params, flops, 0.9 - drop / 100, drop, teacher,
                                divergence=divergence[0] if divergence else None))
        options[name] = sorted(built, key=lambda o: (o.params, o.flops, o.teacher, str(o.spec)))
    measured = all(o.divergence is not None for opts in options.values() for o in opts)
    return QualityTable("accuracy", 100, 0.9, options, {"params": base, "flops": 0}, {"params": total, "flops": 0},
                        divergence="kl" if measured else None)


def test_greedy_orders_by_params_then_flops_and_the_threshold_is_strict():
    table = table_of({
        "a": [("width=0.25", 10, 50, 0.5), ("width=0.5", 10, 40, 0.9), ("width=0.75", 30, 60, 0.1), ("teacher", 40, 80, 0.0)],
        "b": [("width=0.25", 10, 10, 1.0), ("width=0.5", 20, 20, 0.99), ("teacher", 40, 40, 0.0)],
    })
    result = greedy(table, 1.0)
    assert str(result.choice["a"].spec) == "width=0.5"  # same params as width=0.25, fewer FLOPs
    assert str(result.choice["b"].spec) == "width=0.5"  # drop 1.0 is not below 1.0
    assert result.predicted_drop == pytest.approx(1.89)
    assert result.size("params") == 100 + 10 + 20
    assert result.notes == []


def test_greedy_falls_back_and_says_so():
    table = table_of({"a": [("width=0.5", 10, 10, 3.0), ("width=0.75", 20, 20, 2.0), ("teacher", 40, 40, 0.0)],
                      "b": [("teacher", 40, 40, 0.0)]})
    result = greedy(table, 1.0)
    assert result.choice["a"].teacher and result.choice["b"].teacher
    assert "no candidate has a drop below --max-drop 1 (best width=0.75, 2.00 points)" in result.notes[0]
    assert "no trained candidates" in result.notes[1]
    widest = greedy(table, 1.0, fallback="widest")
    assert str(widest.choice["a"].spec) == "width=0.75"
    with pytest.raises(NdcError, match="--fallback"):
        greedy(table, 1.0, fallback="best")


def test_budget_counts_the_whole_student_and_is_exact():
    table = table_of({
        "a": [("width=0.25", 10, 0, 5.0), ("width=0.5", 20, 0, 1.0), ("teacher", 40, 0, 0.0)],
        "b": [("width=0.25", 10, 0, 0.5), ("width=0.5", 20, 0, 0.2), ("teacher", 40, 0, 0.0)],
    }, base=100)
    # 100 kept + 60 for a and b: teacher + width=0.5 (drop 0.2) beats width=0.5 + teacher (1.0) and 0.5 + 0.5 (1.2)
    result = solve_budget(table, Budget("params", 160))
    assert {n: o.label for n, o in result.choice.items()} == {"a": "teacher", "b": "width=0.5"}
    assert result.predicted_drop == pytest.approx(0.2) and result.size("params") == 160
    assert solve_budget(table, Budget("params", 180)).predicted_drop == 0.0
    result = solve_budget(table, Budget("params", 120))
    assert result.predicted_drop == pytest.approx(5.5) and result.size("params") == 120
    with pytest.raises(NdcError, match=r"smallest the trained candidates can make has 120 params"):
        solve_budget(table, Budget("params", 119))


def test_budget_minimises_the_divergence_where_drops_saturate():
    # On a small held-out set every candidate from width 0.5 up ties with the teacher (drop 0, or even better than
    # it): summed drops see no gain in more width. The divergence keeps falling, so a larger budget is used.
    table = table_of({
        name: [("width=0.25", 10, 0, 2.0, 0.09), ("width=0.5", 20, 0, -0.1, 0.03), ("width=0.75", 30, 0, 0.0, 0.01),
               ("teacher", 40, 0, 0.0, 0.0)]
        for name in ("a", "b")
    }, base=100)
    assert objective_of(table) == "divergence"
    by_drop = solve_budget(table, Budget("params", 170), objective="drop")
    assert {o.label for o in by_drop.choice.values()} == {"width=0.5"} and by_drop.size("params") == 140
    result = solve_budget(table, Budget("params", 170))
    assert result.rule["objective"] == "divergence" and result.size("params") == 170
    assert sorted(o.label for o in result.choice.values()) == ["teacher", "width=0.75"]
    assert result.summed_divergence == pytest.approx(0.01) and result.additive_drop == 0.0
    assert solve_budget(table, Budget("params", 180)).summed_divergence == 0.0


def test_the_prediction_calibrates_the_summed_divergence_by_the_candidates_own_drops():
    rows = {name: [("width=0.25", 10, 0, 2.0, 0.09), ("width=0.5", 20, 0, -0.1, 0.03), ("width=0.75", 30, 0, 0.0, 0.01),
                   ("teacher", 40, 0, 0.0, 0.0)] for name in ("a", "b")}
    table = table_of(rows, base=100)
    # least squares through the origin over the six candidates: Σ drop·div / Σ div²
    rate = (2 * (2.0 * 0.09 - 0.1 * 0.03)) / (2 * (0.09**2 + 0.03**2 + 0.01**2))
    assert table.drop_per_divergence == pytest.approx(rate)
    result = solve_budget(table, Budget("params", 150))
    assert sorted(o.label for o in result.choice.values()) == ["width=0.5", "width=0.75"] and result.size("params") == 150
    assert result.additive_drop == pytest.approx(-0.1)  # the summed drops would predict a student better than its teacher
    assert result.prediction == "divergence" and result.summed_divergence == pytest.approx(0.04)
    assert result.predicted_drop == pytest.approx(rate * result.summed_divergence) and result.predicted_drop > 0
    assert result.predicted_accuracy == pytest.approx(0.9 - result.predicted_drop / 100)
    assert solve_budget(table, Budget("params", 180)).predicted_drop == 0.0  # the teacher itself
    # drops that show no loss predict none (never a negative rate); no divergences: the summed drops
    flat = table_of({"a": [("width=0.5", 10, 0, -0.5, 0.02), ("teacher", 40, 0, 0.0, 0.0)]})
    assert flat.drop_per_divergence == 0.0 and greedy(flat, 1.0).predicted_drop == 0.0
    plain = table_of({"a": [("width=0.5", 10, 0, 1.5), ("teacher", 40, 0, 0.0)]})
    chosen = greedy(plain, 2.0)
    assert plain.drop_per_divergence is None and chosen.prediction == "additive" and chosen.predicted_drop == 1.5
    same = table_of({"a": [("width=1.0", 40, 0, 0.0, 0.0), ("teacher", 40, 0, 0.0, 0.0)]})
    assert same.drop_per_divergence is None  # nothing to fit: no candidate moved the output
    assert table.predicted(500.0) == 0.0 and table.predicted(-500.0) == 1.0  # an accuracy stays within [0, 1]


def test_tables_without_divergences_are_solved_by_drop():
    table = table_of({"a": [("width=0.5", 10, 0, 1.0), ("teacher", 40, 0, 0.0)]})
    assert objective_of(table) == "drop" and table.divergence is None
    assert solve_budget(table, Budget("params", 110)).rule["objective"] == "drop"
    with pytest.raises(NdcError, match="no divergences measured; use --objective drop"):
        solve_budget(table, Budget("params", 110), objective="divergence")
    with pytest.raises(NdcError, match="unknown --objective 'kl'"):
        solve_budget(table, Budget("params", 110), objective="kl")


def test_selection_names_the_teacher_part_unambiguously():
    table = table_of({"a": [("width=0.5", 10, 10, 3.0), ("teacher", 40, 40, 0.0)],
                      "b": [("width=0.5", 10, 10, 3.0), ("width=1.0", 40, 40, 0.1), ("teacher", 40, 40, 0.0)]})
    result = greedy(table, 0.05)
    assert result.teacher_parts == ["a", "b"]
    # a: width=1.0 was never trained there, so it means the teacher's part; b: it would mean the trained student
    assert result.selection() == {"a": Spec()}


@pytest.mark.parametrize("text, budget", [
    ("params=150K", Budget("params", 150_000)),
    ("flops=2.5M", Budget("flops", 2_500_000)),
    ("PARAMS = 1g", Budget("params", 1_000_000_000)),
    ("params=1234", Budget("params", 1234)),
    ("flops=1e6", Budget("flops", 1_000_000)),
    ("params=50%", Budget("params", 500)),
])
def test_parse_budget(text, budget):
    assert parse_budget(text, {"params": 1000, "flops": 10}) == budget


@pytest.mark.parametrize("text", ["params", "size=10", "params=-5", "params=0", "params=10Q", "params=1B", "flops=abc"])
def test_parse_budget_rejects(text):
    with pytest.raises(NdcError, match="bad --budget"):
        parse_budget(text)


# ------------------------------------------------------------------ the solver against brute force


groups_strategy = st.lists(
    st.lists(st.tuples(st.integers(0, 40), st.one_of(st.integers(-5, 30).map(float),
                                                     st.floats(-5, 30, allow_nan=False).map(lambda v: round(v, 3)))),
             min_size=1, max_size=4),
    min_size=1, max_size=4)


def brute_force(groups, capacity):
    best = None
    for picks in itertools.product(*(range(len(g)) for g in groups)):
        cost = sum(groups[k][i][0] for k, i in enumerate(picks))
        value = sum(groups[k][i][1] for k, i in enumerate(picks))
        if cost <= capacity and (best is None or value < best):
            best = value
    return best


@settings(max_examples=300, deadline=None)
@given(groups=groups_strategy, capacity=st.integers(0, 160))
def test_budget_solver_equals_brute_force(groups, capacity):
    solved = solve_mckp(groups, capacity)
    expected = brute_force(groups, capacity)
    if expected is None:
        assert solved is None
        return
    picks, cost, value = solved
    assert math.isclose(value, expected, abs_tol=1e-6)
    assert cost == sum(groups[k][i][0] for k, i in enumerate(picks)) <= capacity
    assert math.isclose(value, sum(groups[k][i][1] for k, i in enumerate(picks)), abs_tol=1e-6)


@settings(max_examples=100, deadline=None)
@given(groups=groups_strategy)
def test_frontier_answers_every_budget(groups):
    frontier = mckp_frontier(groups)
    assert all(a < b for a, b in zip(frontier.costs, frontier.costs[1:]))
    assert all(a > b for a, b in zip(frontier.values, frontier.values[1:]))
    for capacity in range(0, sum(max(c for c, _ in g) for g in groups) + 1):
        k = frontier.best(capacity)
        expected = brute_force(groups, capacity)
        assert (k is None) == (expected is None)
        if k is not None:
            assert math.isclose(float(frontier.values[k]), expected, abs_tol=1e-6)
            picks = frontier.choice(k)
            assert sum(groups[g][i][0] for g, i in enumerate(picks)) == frontier.costs[k]

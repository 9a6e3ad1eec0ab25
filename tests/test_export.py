"""export: every model family's traced teacher to .onnx and .pt2 (and .pt), verified; failures leave nothing behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from ndc.errors import NdcError
from ndc.passes.export import CHECK_BATCH_SIZES, check_output_path, export_model
from ndc.passes.trace import trace
from ndc.report import measure_latency
from ndc.zoo import FAMILIES
from tests.test_fold import trained_like

REPORT_KEYS = {"output", "format", "bytes", "max_abs_diff", "checked_batch_sizes", "params", "flops", "latency_ms",
               "folded_bn", "trusted_only"}


@pytest.fixture(scope="module")
def teachers():
    """Traced teachers of every family, with trained-looking batch-norm statistics (built once)."""
    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            factory, shape = FAMILIES[family]
            cache[family] = (trace(trained_like(factory(), input_shape=shape), shape).gm, shape)
        return cache[family]

    return get


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_every_family(family, teachers, tmp_path):
    import onnx
    import onnxruntime as ort

    gm, shape = teachers(family)
    out = tmp_path / f"{family}.onnx"
    report = export_model(gm, out, shape, latency_runs=2)
    assert REPORT_KEYS <= report.keys()
    assert report["format"] == "onnx" and report["output"] == str(out)
    assert report["bytes"] == out.stat().st_size > 0
    assert report["checked_batch_sizes"] == list(CHECK_BATCH_SIZES)
    assert 0 <= report["max_abs_diff"] < 1e-3
    assert report["trusted_only"] is False and report["folded_bn"] == 0
    assert set(report["latency_ms"]) == {"1", "32"} and all(v > 0 for v in report["latency_ms"].values())
    assert files_in(tmp_path) == [out.name]  # one self-contained file, no external data, no temporary left

    # Independently of export_model's own check: a user's onnxruntime session at another batch size.
    onnx.checker.check_model(str(out), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    x = torch.randn(5, *shape[1:])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = gm(x).numpy()
    assert expected.std(0).mean() > 1e-2  # the output depends on the input: parity means something
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pt2(family, teachers, tmp_path):
    gm, shape = teachers(family)
    out = tmp_path / f"{family}.pt2"
    report = export_model(gm, out, shape, latency_runs=2)
    assert report["format"] == "pt2" and report["trusted_only"] is False
    assert report["max_abs_diff"] < 1e-4
    loaded = torch.export.load(out).module()
    for b in (3, 64):
        x = torch.randn(b, *shape[1:])
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), gm(x), atol=1e-5, rtol=1e-4)
    assert files_in(tmp_path) == [out.name]


def test_pt_is_a_trusted_only_pickle(teachers, tmp_path):
    gm, shape = teachers("resnet20")
    out = tmp_path / "teacher.pt"
    report = export_model(gm, out, shape, latency_runs=2)
    assert report["format"] == "pt" and report["trusted_only"] is True
    assert "arbitrary code" in report["warning"]
    assert report["max_abs_diff"] == 0.0
    with pytest.raises(Exception):  # not loadable the safe way: it is a pickled module
        torch.load(out, weights_only=True)
    module = torch.load(out, weights_only=False)
    x = torch.randn(3, *shape[1:])
    torch.testing.assert_close(module(x), gm(x))


def test_fold_bn_on_export(teachers, tmp_path):
    gm, shape = teachers("resnet20")
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    report = export_model(gm, tmp_path / "folded.onnx", shape, fold_bn=True, latency_runs=0)
    assert report["folded_bn"] == 19  # every batch norm of resnet20
    assert report["latency_ms"] is None
    assert report["params"] < sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
    # The caller's module is untouched: same weights, still has its batch norms.
    assert gm.state_dict().keys() == state.keys()
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())


def test_callers_module_keeps_its_mode(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).train()
    report = export_model(model, tmp_path / "m.pt2", (1, 1, 6, 6), fold_bn=True, latency_runs=0)
    assert report["folded_bn"] == 1
    assert model.training and model[1].training
    assert isinstance(model[1], nn.BatchNorm2d)


# ------------------------------------------------------------------- failures


def perturbed_run(monkeypatch, delta=1.0):
    import onnxruntime as ort

    real = ort.InferenceSession.run

    def run(self, output_names, feed, *args, **kwargs):
        return [o + delta for o in real(self, output_names, feed, *args, **kwargs)]

    monkeypatch.setattr(ort.InferenceSession, "run", run)


def test_mismatch_writes_repro_and_no_file(teachers, tmp_path, monkeypatch):
    gm, shape = teachers("mlp")
    out = tmp_path / "student.onnx"
    out.write_bytes(b"previous export")  # an earlier good file must survive
    perturbed_run(monkeypatch)
    with pytest.raises(NdcError) as e:
        export_model(gm, out, shape, report_dir=tmp_path / "repro")
    message = str(e.value)
    assert "\n" not in message
    assert "max abs diff 1" in message and "batch size 1" in message and "atol=0.0001" in message
    assert str(tmp_path / "repro") in message
    assert out.read_bytes() == b"previous export"
    assert files_in(tmp_path) == ["repro", "student.onnx"]  # no temporary file left beside the target

    report = json.loads((tmp_path / "repro" / "report.json").read_text())
    assert report["failed_batch_sizes"] == [1, 7, 64]
    assert set(report["max_abs_diff"]) == {"1", "7", "64"}
    assert report["max_abs_diff"]["7"] == pytest.approx(1.0, abs=1e-4)
    assert report["seed"] == 0 and report["input_shapes"]["7"] == [7, 3, 8, 8]
    assert {"torch", "onnx", "onnxruntime"} <= report["versions"].keys()
    repro = tmp_path / "repro"
    x = np.load(repro / "input_b7.npy")
    assert x.shape == (7, 3, 8, 8)
    np.testing.assert_allclose(np.load(repro / "exported_b7.npy") - np.load(repro / "torch_b7.npy"), 1.0, atol=1e-4)
    assert (repro / "rejected.onnx").is_file() and report["rejected_model"] == "rejected.onnx"
    with torch.no_grad():  # the saved input reproduces the saved PyTorch output
        np.testing.assert_allclose(gm(torch.from_numpy(x)).numpy(), np.load(repro / "torch_b7.npy"), atol=1e-6)


def test_mismatch_default_report_dir_and_zero_tolerance(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    perturbed_run(monkeypatch, delta=1e-6)
    with pytest.raises(NdcError, match="atol=0, rtol=0"):
        export_model(model, tmp_path / "m.onnx", (1, 3, 4), atol=0, rtol=0, latency_runs=0)
    assert files_in(tmp_path) == ["m.onnx.repro"]
    assert (tmp_path / "m.onnx.repro" / "report.json").is_file()


def test_check_false_skips_comparison(tmp_path, monkeypatch):
    perturbed_run(monkeypatch)
    report = export_model(nn.Linear(4, 2), tmp_path / "m.onnx", (1, 4), check=False, latency_runs=0)
    assert report["max_abs_diff"] is None and report["checked_batch_sizes"] == []
    assert (tmp_path / "m.onnx").is_file()


class Untouchable(nn.Module):
    """Any work on it (copying, running) fails the test."""

    def forward(self, x):
        raise AssertionError("the model was run")

    def __deepcopy__(self, memo):
        raise AssertionError("the model was copied")


@pytest.mark.parametrize("name, expected", [
    ("model.tflite", "unknown suffix '.tflite'; use .onnx or .pt2"),
    ("model", "no suffix"),
    ("missing/model.onnx", "folder"),
])
def test_bad_target_fails_before_any_work(name, expected, tmp_path):
    with pytest.raises(NdcError) as e:
        export_model(Untouchable(), tmp_path / name, (1, 3))
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert files_in(tmp_path) == []


def test_check_output_path(tmp_path):
    assert [check_output_path(tmp_path / f"m{s}") for s in (".onnx", ".ONNX", ".pt2", ".pt")] == ["onnx", "onnx", "pt2", "pt"]
    with pytest.raises(NdcError, match="folder .*missing does not exist"):
        check_output_path(tmp_path / "missing" / "m.onnx")
    assert files_in(tmp_path) == []


def test_target_is_a_folder(tmp_path):
    (tmp_path / "x.onnx").mkdir()
    with pytest.raises(NdcError, match="it is a folder"):
        export_model(Untouchable(), tmp_path / "x.onnx", (1, 3))


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.reshape(2, 12))


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_model_that_fixes_its_batch_size(suffix, tmp_path):
    with pytest.raises(NdcError, match="dynamic batch dimension: its code fixes the batch size to 2"):
        export_model(FixedBatch(), tmp_path / f"m{suffix}", (2, 3, 4))
    assert files_in(tmp_path) == []


def test_model_that_does_not_run_on_the_shape(tmp_path):
    with pytest.raises(NdcError, match="does not run on an input of shape 2x5"):
        export_model(nn.Linear(4, 2), tmp_path / "m.onnx", (1, 5))
    assert files_in(tmp_path) == []


# -------------------------------------------------------------------- latency


def test_measure_latency_onnx_and_torch(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    export_model(model, tmp_path / "m.onnx", (1, 3, 4), latency_runs=0)
    threads = torch.get_num_threads()
    for target in (tmp_path / "m.onnx", model):
        latency = measure_latency(target, (1, 3, 4), batch_sizes=(1, 8), runs=3, warmup=1)
        assert set(latency) == {"1", "8"} and all(v > 0 for v in latency.values())
    assert torch.get_num_threads() == threads


def test_an_exporter_failure_names_its_root_cause_and_the_pt2_way_out():
    from ndc.passes.export import _export_failure

    try:
        try:
            raise ValueError("Cannot view a tensor with shape [4*s77, 49, 2, 8] as (4*s77, 49, 16)")
        except ValueError as inner:
            raise RuntimeError("Failed to decompose the FX graph for ONNX compatibility. Next steps:") from inner
    except RuntimeError as e:
        message = _export_failure("the ONNX exporter", e)
    assert message == ("the ONNX exporter failed: RuntimeError: Failed to decompose the FX graph for ONNX compatibility. "
                       "Next steps: (caused by ValueError: Cannot view a tensor with shape [4*s77, 49, 2, 8] as "
                       "(4*s77, 49, 16)); a .pt2 export (-o FILE.pt2) needs no ONNX conversion")


def test_onnx_files_carry_no_per_node_debugging_metadata(tmp_path):
    import onnx

    from ndc.passes.export import export_model
    from ndc.zoo import demo_teacher

    export_model(demo_teacher().eval(), tmp_path / "m.onnx", (1, 1, 28, 28), latency_runs=0)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.graph.node and not any(node.metadata_props for node in model.graph.node)
    assert not any(value.metadata_props for value in [*model.graph.value_info, *model.graph.input, *model.graph.output])


def test_the_exporters_chatter_is_kept_off_the_terminal(caplog):
    # onnxscript logs "Evaluation failed: ..." for every constant it cannot fold (a BERT student printed four)
    import logging

    from ndc.passes.export import _quiet_exporter

    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    with _quiet_exporter():
        folding.warning("Evaluation failed: cannot reshape array of size 1 into shape (1,16)")
    folding.warning("after the export: heard")
    assert [r.getMessage() for r in caplog.records] == ["after the export: heard"]

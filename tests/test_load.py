"""Loading a teacher: pickles only when trusted, factories with safe weights, one-line errors."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from ndc.errors import NdcError
from ndc.load import load_model
from ndc.zoo import resnet20, resnet20b

HERE = pathlib.Path(__file__).parent
FACTORY = f"{HERE / 'models_for_tests.py'}"


class Evil:
    """Unpickling this writes a file: the proof that ndc did (or did not) unpickle."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.target), "pwned"))


def test_pickled_module_is_refused_without_trust_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save(Evil(str(marker)), path)
    with pytest.raises(NdcError) as e:
        load_model(str(path))
    assert "--trust-pickle" in str(e.value) and "file.py:factory" in str(e.value)
    assert not marker.exists()


def test_pickled_module_loads_with_trust(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(resnet20(), path)
    loaded = load_model(str(path), trust_pickle=True)
    assert isinstance(loaded.model, torch.nn.Module)
    assert loaded.source["kind"] == "pickle" and len(loaded.source["sha256"]) == 64


def test_a_pickled_class_from_the_working_folder_loads_as_python_would(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "ndc_test_local_net.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.fc = nn.Linear(4, 2)\n"
        "    def forward(self, x):\n        return self.fc(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(importlib.import_module("ndc_test_local_net").Net(), tmp_path / "net.pt")
    sys.path.remove(str(tmp_path))
    del sys.modules["ndc_test_local_net"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the module is not importable from here: say which one, not "corrupt"
    with pytest.raises(NdcError, match="needs module 'ndc_test_local_net' to unpickle .* PYTHONPATH"):
        load_model(str(tmp_path / "net.pt"), trust_pickle=True)
    monkeypatch.chdir(tmp_path)  # `python -m ndc` here would import it; so does the ndc script
    loaded = load_model("net.pt", trust_pickle=True)
    assert type(loaded.model).__name__ == "Net" and sys.path[-1] == str(tmp_path)  # after every installed module
    sys.modules.pop("ndc_test_local_net", None)  # (monkeypatch restores sys.path)


def test_state_dict_given_as_model_says_what_to_do(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(resnet20().state_dict(), path)
    for trust in (False, True):
        with pytest.raises(NdcError, match="holds a state dict .* --weights"):
            load_model(str(path), trust_pickle=trust)


@pytest.mark.parametrize("trust", [False, True])
def test_truncated_pickle(tmp_path, trust):
    good = tmp_path / "good.pt"
    torch.save(resnet20(), good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(NdcError, match="truncated or corrupt"):
        load_model(str(bad), trust_pickle=trust)


def test_missing_file():
    with pytest.raises(NdcError, match="no such file"):
        load_model("nope.pt")
    with pytest.raises(NdcError, match="no such file"):
        load_model("nope.py:resnet20")


def test_factory_from_module_and_file():
    assert type(load_model("ndc.zoo:resnet20").model).__name__ == "CifarResNet"
    assert type(load_model(f"{FACTORY}:optional_arg").model).__name__ == "OptionalArg"


def test_factory_is_deterministic():
    a = load_model("ndc.zoo:resnet20").model.state_dict()
    b = load_model("ndc.zoo:resnet20").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_factory_errors():
    with pytest.raises(NdcError, match="has no callable 'nope'"):
        load_model("ndc.zoo:nope")
    with pytest.raises(NdcError, match="cannot import module"):
        load_model("no_such_package_xyz:f")
    with pytest.raises(NdcError, match="returned int, not an nn.Module"):
        load_model(f"{FACTORY}:not_a_module")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_are_loaded_safely(tmp_path, suffix):
    source = resnet20()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_model("ndc.zoo:resnet20", weights=str(path))
    assert torch.equal(loaded.model.fc.weight, source.fc.weight)
    assert loaded.source["weights_sha256"]


def test_weights_with_wrong_keys(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(resnet20b().state_dict(), path)
    with pytest.raises(NdcError, match="do not match the model: .*unexpected key"):
        load_model("ndc.zoo:resnet20", weights=str(path))


def test_weights_with_wrong_shapes(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(resnet20().state_dict(), path)
    with pytest.raises(NdcError, match=r"fc.weight has shape \[10, 64\] in the file, the model expects \[5, 64\]"):
        load_model(f"{FACTORY}:resnet20_5classes", weights=str(path))


def test_weights_file_that_is_a_pickled_module(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "w.pt"
    torch.save(Evil(str(marker)), path)
    with pytest.raises(NdcError, match="pickled module, not weights"):
        load_model("ndc.zoo:resnet20", weights=str(path))
    assert not marker.exists()


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(os.urandom(64))
    with pytest.raises(NdcError, match="not a readable safetensors file"):
        load_model("ndc.zoo:resnet20", weights=str(path))


class Tied(torch.nn.Module):
    """A language model's embedding and output layer sharing one Parameter (two names in its state dict)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


@pytest.mark.parametrize("kept", ["emb.weight", "head.weight"])
def test_tied_weights_saved_under_one_name_load(kept):
    from ndc.load import check_and_load_state_dict

    source, model = Tied(), Tied()
    state = {k: v for k, v in source.state_dict().items() if k == kept}  # what Hugging Face or safetensors keep
    check_and_load_state_dict(model, state, "w.safetensors")
    assert torch.equal(model.emb.weight, source.emb.weight) and model.head.weight is model.emb.weight


def test_a_key_missing_without_a_tied_twin_is_still_refused():
    from ndc.load import check_and_load_state_dict

    with pytest.raises(NdcError, match=r"missing 2 key\(s\) \(emb.weight, head.weight\)"):
        check_and_load_state_dict(Tied(), {}, "w.safetensors")
    state = {k: v for k, v in resnet20().state_dict().items() if k != "fc.weight"}
    with pytest.raises(NdcError, match=r"missing 1 key\(s\) \(fc.weight\)"):
        check_and_load_state_dict(resnet20(), state, "w.pt")


def _save_program(model, x, path):
    program = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))


class ReshapedIds(torch.nn.Module):
    """Token ids reshaped, copied and sliced before the embedding (GPT-2 reads ``input_ids.view(-1, L)``)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.emb(x.view(-1, x.shape[-1]).contiguous().to(torch.int32)[:, 1:]))


def test_pt2_token_range_is_read_through_reshapes(tmp_path):
    _save_program(ReshapedIds(), torch.randint(0, 7, (2, 5)), tmp_path / "m.pt2")
    loaded = load_model(str(tmp_path / "m.pt2"))
    assert loaded.input_shape == (1, 5) and loaded.inputs.dtype == "int64" and loaded.inputs.high == 7


class _Out:
    def __init__(self, logits):
        self.logits = logits


class ReturnsOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return _Out(self.fc(x))


def test_pt2_returning_an_unregistered_class_is_one_line(tmp_path, capfd):
    import torch.utils._pytree as pytree

    pytree.register_pytree_node(_Out, lambda o: ([o.logits], None), lambda xs, _: _Out(xs[0]),
                                serialized_type_name="mypackage.outputs.Out")
    try:
        _save_program(ReturnsOut(), torch.randn(2, 4), tmp_path / "m.pt2")
    finally:
        pytree._deregister_pytree_node(_Out)  # as in a fresh process that never defined it
    capfd.readouterr()
    with pytest.raises(NdcError) as e:
        load_model(str(tmp_path / "m.pt2"))
    assert "returns a mypackage.outputs.Out" in str(e.value) and "returns a tensor" in str(e.value)
    assert capfd.readouterr().err == ""  # torch's log lines and traceback are not dumped


def _with_pickle_inside(archive: pathlib.Path, out: pathlib.Path, marker: pathlib.Path) -> None:
    """A copy of ``archive`` whose example inputs are a pickle that writes ``marker`` when unpickled."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save(Evil(str(marker)), buf)
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = buf.getvalue() if item.filename.endswith("sample_inputs/model.pt") else zin.read(item.filename)
            zout.writestr(item.filename, data)


def test_a_pt2_with_code_in_its_pickles_is_refused_unless_trusted(tmp_path, capfd):
    from ndc.formats import load_exported

    _save_program(torch.nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "good.pt2")
    marker = tmp_path / "pwned"
    _with_pickle_inside(tmp_path / "good.pt2", tmp_path / "evil.pt2", marker)
    capfd.readouterr()
    with pytest.raises(NdcError, match="evil.pt2 holds pickled objects besides tensors .* pass --trust-pickle"):
        load_model(str(tmp_path / "evil.pt2"))
    with pytest.raises(NdcError, match="pass --trust-pickle"):
        load_exported(tmp_path / "evil.pt2")  # ndc eval's loader
    assert not marker.exists() and capfd.readouterr().err == ""
    assert load_model(str(tmp_path / "good.pt2")).input_shape == (1, 4)  # tensors alone need no trust
    with pytest.raises(NdcError):
        load_model(str(tmp_path / "evil.pt2"), trust_pickle=True)  # trusted: unpickled (and then not a program)
    assert marker.read_text() == "pwned"


def test_a_pt2_teacher_replaced_after_partition_is_refused(tmp_path):
    from ndc.load import reload_model

    path = tmp_path / "m.pt2"
    _save_program(torch.nn.Linear(4, 2), torch.randn(2, 4), path)
    source = load_model(str(path)).source
    _save_program(torch.nn.Linear(4, 2), torch.randn(2, 4), path)  # other weights, same file name
    with pytest.raises(NdcError, match="changed since ndc partition; rerun ndc partition"):
        reload_model(source)


def test_a_loaded_program_exports_without_torch_deprecation_noise(tmp_path):
    # deep-copying a torch.export graph warns of torch's own LeafSpec deprecation; ndc stitch printed it
    import warnings

    from ndc.passes.export import export_model

    _save_program(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), torch.randn(2, 4), tmp_path / "m.pt2")
    loaded = load_model(str(tmp_path / "m.pt2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_model(loaded.model, tmp_path / "out.onnx", loaded.input_shape, latency_runs=0)
    assert report["max_abs_diff"] < 1e-5
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []

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
    assert type(loaded.model).__name__ == "Net" and str(tmp_path) not in sys.path
    sys.modules.pop("ndc_test_local_net", None)


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

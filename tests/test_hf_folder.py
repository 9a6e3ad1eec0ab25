"""A Hugging Face ``save_pretrained`` folder as MODEL: ``ndc partition folder/``.

Tiny BERT, GPT-2 (tied embedding and head) and ViT models built from configs
in code are saved to a folder; the plan's teacher computes exactly what
``from_pretrained`` gives, later stages work after the folder is gone (the plan
keeps the config, the workspace the weights), a ``pytorch_model.bin`` pickle is
read only with ``--trust-pickle``, and custom code (``auto_map``) is refused.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from ndc.errors import NdcError  # noqa: E402
from ndc.load import load_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
HF = ROOT / "examples" / "transformers_models.py"

# name -> (architecture, default input shape)
MODELS = {
    "bert": ("BertForSequenceClassification", [1, 16]),
    "gpt2": ("GPT2LMHeadModel", [1, 16]),
    "vit": ("ViTForImageClassification", [1, 3, 16, 16]),
}


def _save(name: str, folder: pathlib.Path, **kwargs) -> torch.nn.Module:
    from transformers.utils import logging as hf_logging

    model = load_model(f"{HF}:{name}").model
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    return model


def _from_pretrained(folder: pathlib.Path, architecture: str) -> torch.nn.Module:
    import transformers

    return getattr(transformers, architecture).from_pretrained(folder, local_files_only=True).eval()


def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_folder_partitions_and_its_teacher_is_what_from_pretrained_gives(name, run_cli, tmp_path):
    from ndc.plan import load_teacher
    from ndc.workspace import Workspace

    architecture, shape = MODELS[name]
    _save(name, tmp_path / "hf")
    r = run_cli("partition", "hf", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["input_shape"] == shape and doc["frontend"] == "torch.export"
    assert doc["input_dtype"] == ("float32" if name == "vit" else "int64")
    assert "Loading weights" not in r.stderr  # transformers' progress bars stay quiet
    source = json.loads((tmp_path / "ndc-work" / "plan.json").read_text())["source"]
    assert source["kind"] == "huggingface" and source["architecture"] == architecture
    assert source["path"] == str((tmp_path / "hf").resolve()) and len(source["sha256"]) == 64
    assert source["config"]["architectures"] == [architecture]

    reference = _from_pretrained(tmp_path / "hf", architecture)
    shutil.rmtree(tmp_path / "hf")  # later stages rebuild the architecture from the plan alone
    teacher = load_teacher(Workspace(tmp_path / "ndc-work"))
    x = teacher.plan.inputs.sample((3, *shape[1:]), torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = teacher.gm(x)
        assert torch.equal(got if isinstance(got, torch.Tensor) else got[0], reference(x).logits)
    if name == "gpt2":  # tied weights, and the whole pipeline without the folder
        assert any("tied weights" in note for note in doc["notes"])
        r = run_cli("distill", "--data-free", "--width", "0.5", "--steps", "2", "--batch-size", "4", "--val-size", "8",
                    "--quiet")
        assert r.exit_code == 0, r.stderr
        r = run_cli("stitch", "-o", "s.onnx", "--width", "0.5")
        assert r.exit_code == 0, r.stderr
        assert (tmp_path / "s.onnx").stat().st_size > 0


def test_sharded_safetensors_load(tmp_path):
    model = _save("bert", tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    loaded = load_model(str(tmp_path / "hf"))
    assert len(loaded.source["files"]) > 2 and not loaded.model.training
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, model(x).logits)


def test_a_pickled_checkpoint_needs_trust_pickle(run_cli, tmp_path, monkeypatch):
    model = _save("bert", tmp_path / "hf")  # transformers 5 saves safetensors only: the pickle is torch.save's
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    r = run_cli("partition", "hf")
    _one_line_error(r, "pytorch_model.bin", "--trust-pickle")
    assert loads == [] and not (tmp_path / "ndc-work" / "plan.json").exists()  # nothing was unpickled

    r = run_cli("partition", "hf", "--trust-pickle", "--format", "json")
    assert r.exit_code == 0, r.stderr
    source = json.loads((tmp_path / "ndc-work" / "plan.json").read_text())["source"]
    assert source["kind"] == "huggingface" and source["files"] == ["config.json", "pytorch_model.bin"]


def test_what_a_folder_cannot_be_is_one_line(run_cli, tmp_path):
    _save("bert", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for folder, change in (("custom", {"auto_map": {"AutoModel": "modeling_mine.MyModel"}}),
                           ("unknown", {"architectures": ["NoSuchModelForAnything"]})):
        shutil.copytree(tmp_path / "hf", tmp_path / folder)
        (tmp_path / folder / "config.json").write_text(json.dumps({**config, **change}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "hf" / "config.json").replace(tmp_path / "empty" / "config.json")
    _one_line_error(run_cli("partition", "custom"), "needs custom code", "auto_map", "give a factory")
    _one_line_error(run_cli("partition", "unknown"), "has no model class NoSuchModelForAnything", "give a factory")
    _one_line_error(run_cli("partition", "empty"), "has a config.json but no weights")
    _one_line_error(run_cli("partition", "custom", "--weights", "custom/model.safetensors"),
                    "--weights goes with a factory MODEL; the Hugging Face folder custom holds its weights")
    with pytest.raises(NdcError, match="needs custom code"):
        load_model(str(tmp_path / "custom"), trust_pickle=True)  # trust never runs a folder's code

"""Neighbourhood names on a Hugging Face ViT: the module enclosing each one's main computation.

Glue a neighbourhood also holds (the class token and position embedding added
before the first layer, a final layernorm, the token select) does not drag its
name up to a parent (``vit``): names read ``vit.embeddings``,
``vit.layers.0``, ..., ``classifier``, unique and the same on every run.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from ndc.passes.partition import partition  # noqa: E402
from ndc.passes.trace import trace  # noqa: E402

SHAPE = (1, 3, 32, 32)
LAYERS = [f"vit.layers.{k}" for k in range(3)]


def vit(layers: int = 3):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=64, num_labels=5)
    return ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    return trace(vit(), SHAPE, frontend="export", output="logits")


def _names(traced, **kw) -> list[str]:
    return [seg.name + (" (kept)" if seg.kept else "") for seg in partition(traced, **kw).segments]


def test_module_depth_2_names_the_embeddings_layers_final_norm_and_classifier(traced):
    assert _names(traced, by="module", depth=2) == ["vit.embeddings", "vit.layers", "vit.layernorm", "classifier"]


def test_module_depth_3_names_layer_0_after_its_layer_not_vit(traced):
    # the class token and position embedding (vit.embeddings' own glue) join layer 0: they do not rename it `vit`
    names = _names(traced, by="module", depth=3)
    assert names == ["vit.embeddings.patch_embeddings", *LAYERS, "vit.layernorm", "classifier"]


def test_layers_names_every_attention_and_mlp_and_the_last_mlp_holds_the_final_norm(traced):
    names = _names(traced, by="layers")
    assert names == ["vit.embeddings", *(f"{layer}.{part}" for layer in LAYERS for part in ("attention", "mlp")),
                     "classifier"]


@pytest.mark.parametrize("cuts, expected", [
    (("vit.embeddings", *LAYERS), ["vit.embeddings", *LAYERS, "classifier"]),  # the classifier holds the final norm
    (("vit.embeddings", "vit.layers"), ["vit.embeddings", "vit.layers", "classifier"]),
    (("vit.embeddings", "vit.layers.1"), ["vit.embeddings", "vit.layers", "vit.layers.2"]),  # + norm, classifier
    (("vit.embeddings",), ["vit.embeddings", "vit.layers"]),
])
def test_cuts_names(traced, cuts, expected):
    assert _names(traced, by="cuts", cuts=cuts) == expected


def test_residual_names_are_unchanged(traced):
    blocks = [f"{layer}.{part}" for layer in LAYERS for part in ("attention", "mlp")]
    assert _names(traced, by="residual") == ["stem (kept)", *blocks, "head (kept)"]


def test_names_are_unique_and_deterministic(traced):
    # (every partition is also verified: its neighbourhoods, composed, compute exactly what the teacher computes)
    for kw in ({"by": "module", "depth": 1}, {"by": "module", "depth": 3}, {"by": "layers"}, {"by": "residual"},
               {"by": "cuts", "cuts": ("vit.layers.0", "vit.layers.2")}):
        names = _names(traced, **kw)
        assert len(set(names)) == len(names) and names == _names(traced, **kw), kw

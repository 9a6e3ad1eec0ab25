"""FLOPs of attention (:func:`ndc.metrics.count_flops`): every kernel counts 2·B·H·L·S·(E + Ev), fx and export agree."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ndc.metrics import count_flops
from tests.models_for_tests import LoopedViT

ROOT = pathlib.Path(__file__).resolve().parent.parent


def sdpa_flops(b, h, length, source, e, ev):
    return 2 * b * h * length * source * e + 2 * b * h * length * source * ev


class SDPA(nn.Module):
    """Queries from the input ``(B, H, L, E)``; keys ``(B, Hkv, S, E)`` and values ``(B, Hkv, S, Ev)`` made inside."""

    def __init__(self, source, ev, kv_heads=None, **kwargs):
        super().__init__()
        self.source, self.ev, self.kv_heads, self.kwargs = source, ev, kv_heads, kwargs

    def forward(self, q):
        b, h, _, e = q.shape
        hk = self.kv_heads or h
        k, v = q.new_ones(b, hk, self.source, e), q.new_ones(b, hk, self.source, self.ev)
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"mask": True}, {"kv_heads": 2, "enable_gqa": True}],
                         ids=["plain", "causal", "mask", "gqa"])
@pytest.mark.parametrize("source, ev", [(6, 8), (10, 5)], ids=["square", "cross"])
def test_sdpa_counts_its_two_products_on_cpu(kwargs, source, ev):
    # "square" runs the fused CPU kernel (_scaled_dot_product_flash_attention_for_cpu), "cross" partly torch's math
    # fallback (plain matmuls): both count alike.
    kwargs = dict(kwargs)
    b, h, length, e = 2, 4, 6, 8
    if kwargs.pop("mask", False):
        kwargs["attn_mask"] = torch.ones(length, source, dtype=torch.bool).tril()
    model = SDPA(source, ev, kv_heads=kwargs.pop("kv_heads", None), **kwargs)
    # Per example: count_flops divides by the batch; causal and masked attention count the full L x S product.
    assert count_flops(model, (b, h, length, e)) == sdpa_flops(1, h, length, source, e, ev)


def test_sdpa_matches_the_eager_matmuls():
    q = torch.zeros(1, 4, 16, 8)
    eager = nn.Module()
    eager.forward = lambda x: (x @ x.transpose(-2, -1)).softmax(-1) @ x
    assert count_flops(SDPA(16, 8), q.shape) == count_flops(eager, q.shape) == sdpa_flops(1, 4, 16, 16, 8, 8)


class MHA(nn.Module):
    """``nn.MultiheadAttention`` on a batch-first input ``(B, L, E)``: self-attention, or keys/values of ``S`` rows."""

    def __init__(self, e, heads, batch_first=True, need_weights=False, source=None, kdim=None, vdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first, kdim=kdim, vdim=vdim)
        self.need_weights, self.source, self.kdim, self.vdim = need_weights, source, kdim or e, vdim or e

    def forward(self, x):
        if self.source is None:
            k = v = x
        else:
            k, v = x.new_ones(x.shape[0], self.source, self.kdim), x.new_ones(x.shape[0], self.source, self.vdim)
        if not self.attn.batch_first:
            x, k, v = x.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        return self.attn(x, k, v, need_weights=self.need_weights)[0]


def mha_flops(length, e, source=None, kdim=None, vdim=None):
    source, kdim, vdim = source or length, kdim or e, vdim or e
    projections = 2 * length * e * e + 2 * source * kdim * e + 2 * source * vdim * e + 2 * length * e * e
    return projections + sdpa_flops(1, 1, length, source, e, e)  # heads x head_dim = e


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_multihead_attention_counts_projections_and_attention(batch_first, need_weights):
    b, length, e = 3, 7, 16
    model = MHA(e, 4, batch_first=batch_first, need_weights=need_weights)
    assert count_flops(model, (b, length, e)) == mha_flops(length, e)
    # The fused fast path (eval, no autograd) counts as the slow path's linears, sdpa and bmms do.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert count_flops(model, (b, length, e)) == mha_flops(length, e)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_multihead_attention_with_kdim_vdim(need_weights):
    b, length, e, source, kdim, vdim = 2, 5, 16, 9, 6, 10
    model = MHA(e, 4, need_weights=need_weights, source=source, kdim=kdim, vdim=vdim)
    assert count_flops(model, (b, length, e)) == mha_flops(length, e, source, kdim, vdim)


def test_transformer_encoder_layer_fast_path_counts_like_the_slow_path():
    b, length, e, ffn = 2, 5, 16, 32
    layer = nn.TransformerEncoderLayer(e, 4, ffn, batch_first=True)
    expected = mha_flops(length, e) + 2 * 2 * length * e * ffn
    assert count_flops(layer, (b, length, e)) == expected
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert count_flops(layer, (b, length, e)) == expected
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def gpt2_flops(length, vocab=100, d=32, layers=2, mlp=128):
    """The tiny GPT-2 of examples/transformers_models.py by hand: c_attn, c_proj, two MLP linears, attention, lm_head."""
    per_layer = 2 * length * d * (3 * d + d + 2 * mlp) + sdpa_flops(1, 1, length, length, d, d)
    return layers * per_layer + 2 * length * d * vocab


@pytest.mark.parametrize("length", [16, 64])
def test_tiny_gpt2_counts_its_attention(length):
    pytest.importorskip("transformers")
    import importlib.util

    from ndc.passes.inputs import InputSpec

    spec = importlib.util.spec_from_file_location("transformers_models", ROOT / "examples" / "transformers_models.py")
    factories = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(factories)
    ids = InputSpec("int64", 100)
    sdpa = factories.gpt2()
    eager = factories.gpt2()
    eager.config._attn_implementation = "eager"
    assert count_flops(sdpa, (1, length), ids) == count_flops(eager, (1, length), ids) == gpt2_flops(length)


class MHABlock(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MHAViT(LoopedViT):
    input_shape = (1, 1, 16, 16)

    def __init__(self):
        super().__init__(lambda: MHABlock(16, 4, 32), image=16, patch=4, dim=16, depth=2, heads=4, num_classes=5,
                         in_channels=1)


def mha_vit():
    return MHAViT()


def test_mha_vit_fx_and_export_count_the_same_teacher_flops(run_cli):
    docs = {}
    for frontend in ("fx", "export"):
        r = run_cli("partition", f"{__file__}:mha_vit", "--frontend", frontend, "--format", "json",
                    "--workspace", f"ws-{frontend}")
        assert r.exit_code == 0, r.stderr
        docs[frontend] = json.loads(r.stdout)
    tokens, dim, mlp = 17, 16, 32
    expected = (2 * 16 * dim * 16  # patch_embed: 16 patches of 4x4x1
                + 2 * (mha_flops(tokens, dim) + 2 * 2 * tokens * dim * mlp)  # 2 blocks
                + 2 * dim * 5)  # head
    assert docs["fx"]["teacher"]["flops"] == docs["export"]["teacher"]["flops"] == expected
    attn = {f: {n["name"]: n["flops"] for n in d["neighbourhoods"] if n["name"].endswith(".attn")} for f, d in docs.items()}
    assert attn["fx"] and attn["fx"] == attn["export"] == {f"blocks.{i}.attn": mha_flops(tokens, dim) for i in range(2)}

"""The attention seam (models/attention.py): SDPA default, and the transformer-engine backend's
CPU-testable parts: its error when TE is missing and the mask-convention conversion.

transformer-engine needs CUDA, so TE's kernels are not run here. The last tests drive
CoreAttention's TE path through a CPU stand-in that implements TE's documented contract
(DotProductAttention with qkv_format="bshd", output (B, S, H*D), boolean masks with
True = masked OUT, padding masks as a (q, kv) pair for attention_type="cross"; te.autocast;
the recipe classes): that checks our layout/mask/recipe plumbing, not TE itself.
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sora_dist.config import JobConfig
from sora_dist.models.attention import CoreAttention, is_right_padded, sdpa_attention, te_padding_masks
from sora_dist.models.dit import build_dit
from sora_dist.models.fp8 import apply_fp8


def naive_attention(q, k, v, keep_BHQK):
    """softmax(q k^T / sqrt(d)) v with a boolean keep-mask broadcast to (B, H, Sq, Skv)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.masked_fill(~keep_BHQK, float("-inf")).softmax(-1) @ v


def te_full_mask(q_mask, kv_mask):
    """How TE combines a cross-attention padding pair into the softmax mask
    (attention/dot_product_attention/utils.py:get_full_mask): True = masked out."""
    return torch.logical_or(q_mask.squeeze(1).unsqueeze(3), kv_mask)  # (B, 1, Sq, Skv)


def qkv(B=2, H=3, Sq=5, Skv=7, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Sq, D, generator=g), torch.randn(B, H, Skv, D, generator=g),
            torch.randn(B, H, Skv, D, generator=g))


def test_sdpa_is_the_default_and_honours_the_key_mask():
    core = CoreAttention()
    assert core.backend == "sdpa"
    q, k, v = qkv()
    mask = torch.arange(7)[None] < torch.tensor([[7], [4]])
    out = core(q, k, v, mask)
    assert torch.allclose(out, naive_attention(q, k, v, mask[:, None, None, :]), atol=1e-5)
    # Keys behind the mask do not matter.
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 4:], v2[1, :, 4:] = 50.0, -50.0
    assert torch.allclose(out, core(q, k2, v2, mask), atol=1e-6)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="'sdpa' or 'te'"):
        CoreAttention("flash3")


@pytest.fixture
def no_te(monkeypatch):
    """Make `import transformer_engine.pytorch` fail, whether or not TE is installed."""
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)


def test_te_backend_without_te_names_the_extra_and_the_alternative(no_te):
    with pytest.raises(ImportError) as e:
        CoreAttention("te")
    msg = str(e.value)
    assert "pip install 'sora_dist[gpu]'" in msg and "model.attention_backend=sdpa" in msg
    cfg = JobConfig()
    cfg.model.attention_backend = "te"
    with pytest.raises(ImportError, match="attention_backend=te"):
        build_dit(cfg.model)  # fails when the model is built, not at the first step


def test_te_padding_masks_invert_our_convention():
    ours = torch.tensor([[True, True, True, False], [True, False, False, False]])
    q_mask, kv_mask = te_padding_masks(ours, q_len=3)
    assert q_mask.shape == (2, 1, 1, 3) and kv_mask.shape == (2, 1, 1, 4)
    assert q_mask.dtype == torch.bool and not q_mask.any()  # every query is kept
    assert torch.equal(kv_mask[:, 0, 0], ~ours)  # TE: True = masked OUT
    # The per-row lengths TE derives from it (utils.get_cu_seqlens) are our valid-key counts.
    cu = torch.cat([torch.zeros(1, dtype=torch.int32),
                    kv_mask.squeeze(1).squeeze(1).logical_not().sum(1).cumsum(0).to(torch.int32)])
    assert cu.tolist() == [0, 3, 4]


def test_te_mask_pair_gives_the_sdpa_result():
    """Attention under TE's combined mask equals SDPA under ours, padded queries included."""
    q, k, v = qkv(Sq=6, Skv=6)
    ours = torch.arange(6)[None] < torch.tensor([[6], [2]])  # self-attention with token padding
    q_mask, kv_mask = te_padding_masks(ours, q_len=6)
    te_out = naive_attention(q, k, v, ~te_full_mask(q_mask, kv_mask))
    assert torch.allclose(te_out, sdpa_attention(q, k, v, ours), atol=1e-5)
    # Passing our mask without inverting would attend to exactly the padding instead.
    wrong = naive_attention(q, k, v, ~te_full_mask(q_mask, ours[:, None, None, :]))
    assert not torch.allclose(wrong, sdpa_attention(q, k, v, ours), atol=1e-3)


def test_is_right_padded():
    assert bool(is_right_padded(torch.tensor([[True, True, False], [True, False, False]])))
    assert bool(is_right_padded(torch.ones(2, 4, dtype=torch.bool)))
    assert not bool(is_right_padded(torch.tensor([[True, False, True]])))
    assert not bool(is_right_padded(torch.tensor([[False, True, True]])))


def test_fp8_attention_needs_the_te_backend():
    cfg = JobConfig()
    cfg.model.fp8_attention = True
    with pytest.raises(ValueError, match="attention_backend=te"):
        apply_fp8(build_dit(cfg.model), cfg)


# ---- CoreAttention's TE path against a CPU stand-in of TE's documented contract --------------

class _ContractDPA(nn.Module):
    """TE DotProductAttention's documented interface, computed naively on CPU."""

    built: list = []
    recipes: list = []  # the TE autocast recipe active at each call (None: outside one)

    def __init__(self, num_attention_heads, kv_channels, qkv_format="sbhd", attn_mask_type="causal",
                 attention_type="self", attention_dropout=0.0):
        super().__init__()
        assert qkv_format == "bshd" and attention_type == "cross" and attn_mask_type == "no_mask"
        self.heads, self.head_dim = num_attention_heads, kv_channels
        _ContractDPA.built.append((num_attention_heads, kv_channels))

    def forward(self, q, k, v, attention_mask=None, attn_mask_type=None):
        B, Sq, H, D = q.shape
        assert (H, D) == (self.heads, self.head_dim) and q.dtype == k.dtype == v.dtype
        _ContractDPA.recipes.append(_Autocast.active[-1] if _Autocast.active else None)
        keep = torch.ones(B, 1, Sq, k.shape[1], dtype=torch.bool)
        if attn_mask_type == "padding":
            keep = ~te_full_mask(*attention_mask)
        o = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keep)
        return o.transpose(1, 2).reshape(B, Sq, H * D)


class _Recipe:
    def __init__(self, fp8_format=None, fp8_dpa=False):
        self.fp8_format, self.fp8_dpa = fp8_format, fp8_dpa


class _Autocast:
    """te.autocast(enabled, recipe): records the active recipe for _ContractDPA."""
    active: list = []

    def __init__(self, enabled=True, recipe=None):
        self.recipe = recipe

    def __enter__(self):
        _Autocast.active.append(self.recipe)

    def __exit__(self, *exc):
        _Autocast.active.pop()


@pytest.fixture
def contract_te(monkeypatch):
    mod = types.ModuleType("transformer_engine.pytorch")
    mod.DotProductAttention = _ContractDPA
    mod.autocast = _Autocast
    rec = types.ModuleType("transformer_engine.common.recipe")
    rec.Format = types.SimpleNamespace(HYBRID="HYBRID")
    rec.DelayedScaling = type("DelayedScaling", (_Recipe,), {})
    rec.Float8CurrentScaling = type("Float8CurrentScaling", (_Recipe,), {})
    common = types.ModuleType("transformer_engine.common")
    common.recipe = rec
    pkg = types.ModuleType("transformer_engine")
    pkg.pytorch, pkg.common, pkg.__version__ = mod, common, "2.9.0"
    for name, m in [("transformer_engine", pkg), ("transformer_engine.pytorch", mod),
                    ("transformer_engine.common", common), ("transformer_engine.common.recipe", rec)]:
        monkeypatch.setitem(sys.modules, name, m)
    _ContractDPA.built, _ContractDPA.recipes, _Autocast.active = [], [], []
    return pkg


def test_te_path_layout_and_masks_match_sdpa(contract_te):
    core = CoreAttention("te")
    assert not list(core.children()) and not core.state_dict()  # TE cores stay out of checkpoints
    q, k, v = qkv(Sq=5, Skv=7)
    mask = torch.arange(7)[None] < torch.tensor([[7], [3]])
    assert torch.allclose(core(q, k, v, mask), sdpa_attention(q, k, v, mask), atol=1e-5)
    assert torch.allclose(core(q, k, v), sdpa_attention(q, k, v), atol=1e-5)
    q2, k2, v2 = qkv(H=6, D=4, Sq=5, Skv=5)  # other local head count (TP / Ulysses): new core
    assert torch.allclose(core(q2, k2, v2), sdpa_attention(q2, k2, v2), atol=1e-5)
    assert _ContractDPA.built == [(3, 8), (6, 4)]


def test_te_path_rejects_left_padded_masks(contract_te):
    q, k, v = qkv(Sq=3, Skv=3)
    with pytest.raises(RuntimeError, match="right-padded"):
        CoreAttention("te")(q, k, v, torch.tensor([[False, True, True], [True, True, True]]))


def test_te_path_casts_qkv_to_the_autocast_dtype(contract_te):
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = CoreAttention("te")(q, k, v.bfloat16())  # q/k fp32 (qk-norm weight), v bf16
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), sdpa_attention(q, k, v), atol=3e-2)


def test_fp8_attention_runs_every_te_core_inside_the_recipe(contract_te):
    cfg = JobConfig()
    cfg.model.attention_backend, cfg.model.fp8_attention = "te", True
    model = apply_fp8(build_dit(cfg.model), cfg)
    cores = [m for m in model.modules() if isinstance(m, CoreAttention)]
    assert len(cores) == 2 * cfg.model.resolved()["depth"]  # self + cross per block
    recipe = cores[0].fp8_recipe
    assert type(recipe).__name__ == "Float8CurrentScaling" and recipe.fp8_dpa
    assert all(c.fp8_recipe is recipe for c in cores)
    x = torch.randn(1, 4, 2, 4, 4)
    model(x, torch.tensor([5.0]), torch.randn(1, 3, 32), torch.tensor([[True, True, False]]))
    assert len(_ContractDPA.recipes) == len(cores) and all(r is recipe for r in _ContractDPA.recipes)


def test_current_scaling_fp8_attention_needs_te_2_8(contract_te):
    from sora_dist.models.fp8 import build_te_recipe

    contract_te.__version__ = "2.5.0+cu12"
    with pytest.raises(RuntimeError, match="fp8_recipe=delayed"):
        build_te_recipe("current", fp8_dpa=True)
    assert type(build_te_recipe("current")).__name__ == "Float8CurrentScaling"  # linears: >= 2.2
    assert type(build_te_recipe("delayed", fp8_dpa=True)).__name__ == "DelayedScaling"
    contract_te.__version__ = "2.1.0"
    with pytest.raises(RuntimeError, match=">= 2.2"):
        build_te_recipe("current")

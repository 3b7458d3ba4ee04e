"""The attention seam (models/attention.py): SDPA default, and the transformer-engine backend's
CPU-testable parts: its error when TE is missing and the mask-convention conversion.

transformer-engine needs CUDA and is not installed here, so TE's own call path is not run
by these tests (no stand-in replaces it): it is verified only on a GPU machine.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

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


def test_te_context_parallel_needs_the_te_backend():
    """TE's own CP path is taken only with a TE inner attention; SDPA keeps sora_dist's CP."""
    with pytest.raises(ValueError, match="attention_backend=te"):
        CoreAttention("sdpa").set_te_context_parallel(None, [0], None, "p2p")
    from sora_dist.parallel.context_parallel import TE_COMM_TYPES, ContextParallelAttention
    cpa = ContextParallelAttention("ring", None, inner=CoreAttention("sdpa"), te_context_parallel=True)
    assert not cpa.te_cp and "te_context_parallel" not in repr(cpa)
    assert TE_COMM_TYPES == {"ring": "p2p", "ulysses": "a2a", "hybrid": "a2a+p2p"}


@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient", "math"])
def test_sdpa_kernel_preference_keeps_fallbacks(kernel):
    """model.sdpa_kernel puts one SDPA kernel first; kernels that cannot take a call (on CPU:
    cuDNN and efficient) fall through to the next, so every choice computes the same."""
    from sora_dist.models.attention import sdpa_priority
    q, k, v = qkv()
    mask = torch.arange(7)[None] < torch.tensor([[7], [4]])
    ref = CoreAttention()(q, k, v, mask)
    core = CoreAttention("sdpa", kernel)
    assert f"sdpa_kernel={kernel}" in repr(core) and len(sdpa_priority(kernel)) == 4
    assert torch.allclose(core(q, k, v, mask), ref, atol=1e-5)
    assert torch.allclose(core(q, k, v, None), CoreAttention()(q, k, v, None), atol=1e-5)
    with pytest.raises(ValueError, match="model.sdpa_kernel"):
        CoreAttention("sdpa", "fa3")

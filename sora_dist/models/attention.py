"""Attention backends behind one seam.

Model code calls a `CoreAttention` module on (B, heads, S, head_dim) tensors. Context
parallelism (parallel/context.py) and transformer-engine replace that module, nothing else.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def sdpa_attention(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
    kv_mask_BS: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """torch SDPA; kv_mask marks valid keys (True = attend). Picks flash/cuDNN/efficient on GPU."""
    mask = None if kv_mask_BS is None else kv_mask_BS[:, None, None, :]
    return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask)


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v with an optional key-padding mask. Stateless."""

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        self.backend = backend
        if backend == "te":
            try:
                import transformer_engine  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "model.attention_backend=te needs transformer-engine: "
                    "pip install 'sora_dist[gpu]' on a CUDA machine, or use model.attention_backend=sdpa"
                ) from e
            raise NotImplementedError(
                "model.attention_backend=te is not wired up yet; use model.attention_backend=sdpa"
            )
        elif backend != "sdpa":
            raise ValueError(f"unknown attention backend {backend!r}; use 'sdpa' or 'te'")

    def forward(self, q_BHSD, k_BHSD, v_BHSD, kv_mask_BS=None):
        return sdpa_attention(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS)

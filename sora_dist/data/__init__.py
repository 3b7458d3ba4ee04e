"""Training data. Every source yields batches (dicts) forever with the same interface:

  latent    float32 (B, C, T, H, W)  VAE latents, one bucket per batch
  text      float32 (B, L, D)        text-encoder embeddings, zero past the mask
  text_mask bool    (B, L)           True = real caption token
  bucket    str                      bucket key, e.g. "3x8x8" (latent T x H x W)

and `state_dict()` / `load_state_dict()` so a resumed run continues at the next unseen batch.
Data is split over DP ranks only: every TP/CP/PP rank of one DP group gets the same batch.
"""
from __future__ import annotations

from sora_dist.data.loader import ShardLoader
from sora_dist.data.synthetic import SyntheticLatents


def build_loader(data_cfg, model_cfg, dp_rank: int = 0, dp_size: int = 1):
    if data_cfg.source == "synthetic":
        return SyntheticLatents(data_cfg, model_cfg.in_channels, model_cfg.text_dim, dp_rank, dp_size)
    if data_cfg.source == "shards":
        return ShardLoader(data_cfg, dp_rank=dp_rank, dp_size=dp_size, model_cfg=model_cfg)
    raise ValueError(f"data.source={data_cfg.source!r}: use 'synthetic' or 'shards'")

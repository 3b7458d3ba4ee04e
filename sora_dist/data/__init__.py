"""Training data. Every source yields batches (dicts) forever with the same interface:

  latent    float32 (B, C, T, H, W)  VAE latents, one bucket per batch
  text      float32 (B, L, D)        text-encoder embeddings, zero past the mask
  text_mask bool    (B, L)           True = real caption token
  bucket    str                      bucket key, e.g. "3x8x8" (latent T x H x W)

and `state_dict()` / `load_state_dict()` so a resumed run continues at the next unseen batch.

With data.packing (Patch n' Pack, data/packing.py) every batch is instead one pack of K samples
of mixed sizes that fills about data.tokens_per_rank tokens:

  packed        True
  latent        list of K float32 (C, T_i, H_i, W_i), in pack order
  text          float32 (K, L, D)  padded to the pack's longest caption (or the shards' fixed length)
  text_mask     bool    (K, L)
  tokens        int                sum of the samples' tokens (prod of ceil(dim / model.patch_size))
  sample_tokens list of K int      each sample's tokens
  keys          list of K          sample ids ("shard/key", or the synthetic global position)

(shards also give captions.)
Data is split over DP ranks only: every TP/CP/PP rank of one DP group gets the same batch.
"""
from __future__ import annotations

from sora_dist.data.loader import ShardLoader
from sora_dist.data.synthetic import SyntheticLatents


def build_loader(data_cfg, model_cfg, dp_rank: int = 0, dp_size: int = 1, exchange=None):
    """exchange: all-gather over the DP ranks (data/packing.py PackBalance), for packs balanced
    by modelled cost (data.pack_balance=flops); None: every rank packs on its own."""
    if data_cfg.source == "synthetic":
        return SyntheticLatents(data_cfg, model_cfg.in_channels, model_cfg.text_dim, dp_rank, dp_size,
                                patch_size=getattr(model_cfg, "patch_size", None), model_cfg=model_cfg,
                                exchange=exchange)
    if data_cfg.source == "shards":
        return ShardLoader(data_cfg, dp_rank=dp_rank, dp_size=dp_size, model_cfg=model_cfg, exchange=exchange)
    raise ValueError(f"data.source={data_cfg.source!r}: use 'synthetic' or 'shards'")

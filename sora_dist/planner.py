"""Moved: the layout planner is sora_dist/planning/, the model's dimensions, parameter and FLOP
counts are DiTArgs (sora_dist/config/model.py), the measurement helpers are
sora_dist/planning/measure.py.

Kept only for the two importers being restructured elsewhere, so the tree keeps working until
they follow; delete this module then:
  * train/trainer.py `_model_flops` -> DiTArgs.from_config(cfg.model) once, then
    `samples * args.flops_per_sample(seq_len, text_len)` per step;
  * tests/distributed/test_context.py -> `from sora_dist.planning.measure import live_bytes_of`.
"""
from __future__ import annotations

from sora_dist.config.model import DiTArgs, Flops
from sora_dist.planning import step_flops as _step_flops
from sora_dist.planning.measure import live_bytes_of

__all__ = ["ModelDims", "live_bytes_of", "step_flops"]


def ModelDims(hidden: int, depth: int, heads: int, mlp_ratio: float, text_dim: int, text_len: int,
              in_channels: int, patch: tuple, qk_norm: bool) -> tuple[DiTArgs, int]:
    """The trainer's old call: (DiTArgs, caption tokens)."""
    return DiTArgs(in_channels=in_channels, hidden_size=hidden, depth=depth, num_heads=heads,
                   mlp_ratio=mlp_ratio, patch_size=tuple(patch), text_dim=text_dim,
                   qk_norm=qk_norm), text_len


def step_flops(dims: tuple[DiTArgs, int], seq: int, samples: int) -> tuple[Flops, Flops]:
    args, text_len = dims
    return _step_flops(args, seq, text_len, samples)

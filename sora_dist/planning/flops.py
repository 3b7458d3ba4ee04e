"""FLOPs of one optimizer step: the model's (DiTArgs.forward_flops, x3 for fwd+bwd) and what
activation checkpointing runs on top of them."""
from __future__ import annotations

import math

from sora_dist.config.model import DiTArgs, Flops
from sora_dist.config.train import ACTIVATION_CHECKPOINTING

RECOMPUTES = ACTIVATION_CHECKPOINTING  # by rising recompute cost


def recomputed_fraction(depth: int, recompute: str) -> float:
    """Share of blocks whose matmuls run again in backward: "selective" wraps every other block
    (i % 2 == 0), as parallel/activation_checkpoint.py does; "op" keeps every matmul and attention
    output (it replays only the elementwise ops between them, not counted in FLOPs)."""
    if recompute in ("none", "op"):
        return 0.0
    if recompute == "full":
        return 1.0
    if recompute == "selective":
        return math.ceil(depth / 2) / depth
    raise ValueError(f"recompute={recompute!r}: use one of {RECOMPUTES}")


def step_flops(m: DiTArgs, seq: int, text_len: int, samples: int,
               recompute: str = "none") -> tuple[Flops, Flops]:
    """(model FLOPs, executed FLOPs) of one optimizer step over `samples` samples. Backward is
    2x forward (input and weight grads); recompute re-runs the forward of the recomputed blocks.
    Flash attention's backward also recomputes q k^T (+0.5x the attention forward); like the
    kernels' other overheads, that is left to the MFU figure rather than counted here."""
    f = m.forward_flops(seq, text_len, samples)
    model = Flops(3 * f.linear, 3 * f.attention)
    blk = m.block_forward_flops(seq, text_len, samples)
    extra = recomputed_fraction(m.depth, recompute) * m.depth
    return model, Flops(model.linear + extra * blk.linear, model.attention + extra * blk.attention)

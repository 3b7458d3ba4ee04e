"""Activation checkpointing of DiT blocks (train.activation_checkpointing).

"full" recomputes every block in backward, "selective" every other block, "op" every block but
keeps the outputs of its matmuls and attention kernels (only the elementwise ops between them
are recomputed: about half the activation memory of no recompute, no matmul recomputed).
Blocks whose dropout draws from tracked per-shard RNG streams (SP/CP) replay those streams in
the recompute (parallel/rng.py). Applied before FSDP, so FSDP wraps the wrapper.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from sora_dist.config.train import ACTIVATION_CHECKPOINTING
from sora_dist.parallel.context_parallel import ring  # noqa: F401  (registers sora_dist::ring_attention)
from sora_dist.parallel.rng import RNGStatesTracker, TrackedDropout, checkpoint_context_fn


def sac_save_ops() -> set:
    """Ops whose outputs op-level selective checkpointing keeps: the matmuls (nn.Linear lowers
    to mm/addmm; FP8 to _scaled_mm), the fused attention kernels (output and log-sum-exp) and
    ring attention as a whole (context_parallel/ring.py).
    Everything between them (norms, adaLN modulate, RoPE, GELU, gates, casts) is recomputed
    in backward: cheap elementwise work for most of the activation memory."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    # The ring is one op: its (out, lse) are kept whole, so recompute re-sends no K/V. Under
    # TP+SP the row-parallel outputs' reduce-scatters are kept too (small: token-sharded), so
    # recompute does not repeat them (the all-gathers before column-parallel linears it does).
    return {getattr(aten, n).default for n in names if hasattr(aten, n)} | {
        torch.ops.sora_dist.ring_attention.default,
        torch.ops._c10d_functional.reduce_scatter_tensor.default}


def sac_context_fn(tracker: Optional[RNGStatesTracker]):
    """checkpoint context_fn for op-level SAC, composed with the tracked-RNG replay when the
    block draws from tracked streams (tracker given)."""
    save = sac_save_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    if tracker is None:  # plain SAC contexts: what torch.compile can trace through
        return lambda: create_selective_checkpoint_contexts(policy)
    rng = checkpoint_context_fn(tracker)

    def context_fn():
        sac_fwd, sac_rec = create_selective_checkpoint_contexts(policy)
        rng_fwd, rng_rec = rng()
        # The RNG replay clones generator states: outside the SAC mode, which would log them.
        return _both(rng_fwd, sac_fwd), _both(rng_rec, sac_rec)

    return context_fn


@contextmanager
def _both(a, b):
    with a, b:
        yield


def apply_activation_checkpointing(model: nn.Module, mode: str, tracker: RNGStatesTracker) -> None:
    """"full": every block; "selective": every other block; "op": every block, keeping the
    outputs of matmuls and attention kernels (sac_save_ops) and recomputing the rest. Before
    FSDP, so FSDP wraps the wrapper."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing={mode!r}: use one of {ACTIVATION_CHECKPOINTING}")
    if mode == "none":
        return
    for i, name in enumerate(list(model.blocks.keys())):
        if mode in ("full", "op") or (mode == "selective" and i % 2 == 0):
            blk = model.blocks[name]
            # Only blocks with tracked-stream dropout (SP/CP) need the RNG replay; without it the
            # contexts are ones torch.compile can trace (the replay clones generator states).
            tracked = any(isinstance(m, TrackedDropout) for m in blk.modules())
            kw = {}
            if mode == "op":
                kw["context_fn"] = sac_context_fn(tracker if tracked else None)
            elif tracked:
                kw["context_fn"] = checkpoint_context_fn(tracker)
            model.blocks[name] = checkpoint_wrapper(
                blk, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True, **kw)

"""Ulysses (DeepSpeed-Ulysses) context parallelism: an all-to-all turns (sequence-sharded, all
heads) into (head-sharded, whole sequence), local attention runs on that, and the reverse
all-to-all brings the output back. Per-rank traffic stays ~4x the local activations whatever
the degree; the local head count must divide by it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sora_dist.parallel.context_parallel.comm import all_to_all


def _seq_to_heads(x_BHSD: torch.Tensor, group) -> torch.Tensor:
    """(B, H, S/U, D) sequence-sharded -> (B, H/U, S, D) head-sharded."""
    U = dist.get_world_size(group)
    B, H, S, D = x_BHSD.shape
    y = all_to_all(x_BHSD.reshape(B, U, H // U, S, D).transpose(0, 1), group)
    # y[i] = sequence shard i of my heads: put shards back in sequence order.
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // U, U * S, D)


def _heads_to_seq(x_BHSD: torch.Tensor, group) -> torch.Tensor:
    """(B, H/U, S, D) head-sharded -> (B, H, S/U, D) sequence-sharded."""
    U = dist.get_world_size(group)
    B, h, S, D = x_BHSD.shape
    y = all_to_all(x_BHSD.reshape(B, h, U, S // U, D).permute(2, 0, 1, 3, 4), group)
    # y[i] = head chunk i of my sequence shard.
    return y.transpose(0, 1).reshape(B, U * h, S // U, D)


class _Reshard(torch.autograd.Function):
    """One of the two all-to-alls; its backward is the other (the adjoint of an all-to-all is
    the reverse all-to-all)."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


def seq_to_heads(x_BHSD: torch.Tensor, group) -> torch.Tensor:
    """Differentiable (B, H, S/U, D) -> (B, H/U, S, D)."""
    return _Reshard.apply(x_BHSD, group, True)


def heads_to_seq(x_BHSD: torch.Tensor, group) -> torch.Tensor:
    """Differentiable (B, H/U, S, D) -> (B, H, S/U, D)."""
    return _Reshard.apply(x_BHSD, group, False)

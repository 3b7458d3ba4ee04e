"""FSDP2 (ZeRO-3) / HSDP over the data-parallel x context-parallel ranks, and the DDP-like
fallback (replicated parameters, gradient all-reduce) when FSDP is off.

CP ranks hold the same parameters and see different tokens of the same samples, so they
join the shard group (torchtitan's `dp_shard_cp`): gradients are averaged over DP x CP.
parallel/sequence.py scales the token gradients by cp so that this average is the mean over DP
of the full-sequence gradient.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial


def fsdp_mesh(meshes, dp_replicate: int):
    """1D (dp_shard_cp) mesh for FSDP, or 2D (dp_replicate, dp_shard_cp) for HSDP."""
    if dp_replicate > 1:
        return meshes.world["dp_replicate", "dp_shard_cp"]
    return meshes["dp_shard_cp"]


def mp_policy(device_type: str, mixed_precision: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPU; CPU stays fp32."""
    if device_type == "cuda" and mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, mesh, policy: MixedPrecisionPolicy, pipeline: bool = False) -> nn.Module:
    """One FSDP unit per block plus the root (embedders, final layer). Blocks free their
    gathered weights after forward except the last one, whose backward starts right away.
    Under pipeline parallelism nothing reshards after forward (torchtitan's default): every
    microbatch would all-gather the stage's weights again."""
    blocks = list(model.blocks.items())
    # Blocks do not cast their inputs: the root already cast the batch, block activations come
    # out of bf16 modules, and a cast would also turn the fp32 RoPE table inside Conditioning
    # (FSDP casts dataclass fields) into bf16, losing rotary precision at long positions.
    block_policy = dataclasses.replace(policy, cast_forward_inputs=False)
    for i, (name, blk) in enumerate(blocks):
        reshard = not pipeline and i < len(blocks) - 1
        fully_shard(blk, mesh=mesh, mp_policy=block_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=not pipeline)
    return model


@torch.no_grad()
def reduce_partial_grads(params) -> None:
    """DTensor grads of replicated TP weights come out Partial (each rank summed its own
    tokens/heads); make them Replicate like their parameter. FSDP2 does this itself."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(isinstance(pl, Partial) for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)


@torch.no_grad()
def allreduce_grads(params, group, bucket_mb: float = 64.0) -> None:
    """Average local gradients over `group` (DDP without the overlap), in flat buckets."""
    world = dist.get_world_size(group)
    grads = [p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad
             for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    limit = int(bucket_mb * 2**20)
    for same in by_dtype.values():
        bucket, size = [], 0
        for g in same + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= limit):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)  # SUM: gloo has no AVG
                flat.div_(world)
                off = 0
                for b in bucket:
                    b.copy_(flat[off:off + b.numel()].view_as(b))
                    off += b.numel()
                bucket, size = [], 0

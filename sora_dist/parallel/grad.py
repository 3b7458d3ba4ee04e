"""Gradient norm and clipping that is correct across every parallel group.

DTensor grads (TP, FSDP2) carry their sharding, so torch's norm reduces over the mesh
itself; pipeline stages hold disjoint parameters, so their squared norms are summed over PP.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.nn.Parameter], max_norm: float, pp_mesh=None,
) -> torch.Tensor:
    """Global L2 grad norm over all ranks' parameters; scales grads in place when max_norm > 0.
    Returns the (pre-clip) total norm as a plain tensor, identical on every rank."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    # Group by mesh: under TP+FSDP most grads are 2D DTensors but a few parameters (kept
    # replicated outside TP) are 1D, and torch.stack cannot mix meshes.
    groups: dict = {}
    for p in params:
        groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    sq = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0, foreach=None)
        if hasattr(n, "full_tensor"):  # DTensor: partial over the mesh -> reduced value
            n = n.full_tensor()
        sq.append(n.float().pow(2))
    norm = torch.stack(sq).sum().sqrt()
    if pp_mesh is not None and pp_mesh.size() > 1:
        sq = norm.pow(2)
        dist.all_reduce(sq, group=pp_mesh.get_group())
        norm = sq.sqrt()
    if max_norm > 0:
        for group in groups.values():  # foreach kernels cannot mix meshes either
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=None)
    return norm

"""The collectives context parallelism is made of, each counted by COMM_COUNTER (benchmarks
switch it on to report bytes sent per kind; tools/bench_cp.py, tests/distributed/test_context.py).

Everything takes an explicit process group (from a DeviceMesh); none is global.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist


class CommCounter:
    """Bytes this process sends in CP attention, by kind (benchmarks switch it on). The chunk an
    all-to-all keeps for itself is not counted: it never leaves the device."""

    def __init__(self):
        self.enabled = False
        self.bytes: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        if self.enabled:
            self.bytes[kind] += int(nbytes)

    @contextmanager
    def counting(self):
        self.bytes.clear()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    def total(self) -> int:
        return sum(self.bytes.values())


COMM_COUNTER = CommCounter()  # per-process statistics only; holds no group


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# all_gather_into_tensor is deprecated in favour of all_gather_single in recent torch.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's x along dim, in group-rank order (= sequence order)."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # backends concatenate along dim 0
    _all_gather(out, x.contiguous(), group=group)
    COMM_COUNTER.add("all_gather", _nbytes(x) * (n - 1))
    return out.view(n, *x.shape).movedim(0, dim).flatten(dim, dim + 1)


def local_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % n:
        raise ValueError(f"sequence dim {dim} of size {x.shape[dim]} does not split over {n} CP ranks; "
                         f"pad the token sequence to a multiple of cp*tp first")
    size = x.shape[dim] // n
    return x.narrow(dim, r * size, size)


def all_to_all(x_U: torch.Tensor, group) -> torch.Tensor:
    """x_U[i] goes to group rank i; out[i] came from group rank i."""
    x_U = x_U.contiguous()
    out = torch.empty_like(x_U)  # after .contiguous(): empty_like keeps a view's strides
    dist.all_to_all_single(out, x_U, group=group)
    n = x_U.shape[0]
    COMM_COUNTER.add("all_to_all", _nbytes(x_U) * (n - 1) // n)
    return out


def ring_shift(x: torch.Tensor, group):
    """Start sending x to the next ring rank and receiving the previous rank's; returns
    (recv buffer, works). x must stay untouched until the works complete."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if n == 1:
        return x, []
    recv = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, group=group, group_peer=(r + 1) % n),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=(r - 1) % n)]
    COMM_COUNTER.add("p2p", _nbytes(x))
    return recv, dist.batch_isend_irecv(ops)


def wait_all(works) -> None:
    for w in works:
        w.wait()

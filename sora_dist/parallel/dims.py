"""ParallelDims: the parallel degrees and the one named DeviceMesh built from them.

Rank grid (outermost first): dp_replicate, dp_shard, pp, cp_ring, cp_ulysses, tp — TP
innermost so its collectives stay inside a node, then CP (Ulysses inside ring, so the
all-to-alls are the intra-node ones), PP, DP. Model code never sees process groups: it is
handed sub-meshes of this mesh (picotron-style: the grid is written down once, here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from sora_dist.config.parallel import ulysses_degree
from sora_dist.config.validate import check_world, resolve_dp


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    pp: int
    cp_ring: int
    cp_ulysses: int
    tp: int
    world_size: int
    # Built once by build_mesh(); every parallel step reads its sub-meshes from here.
    _meshes: Optional["Meshes"] = field(default=None, init=False, repr=False, compare=False)
    _dp_host_group: Optional[object] = field(default=None, init=False, repr=False, compare=False)

    mesh_names = ("dp_replicate", "dp_shard", "pp", "cp_ring", "cp_ulysses", "tp")

    @classmethod
    def from_config(cls, p, world_size: int) -> "ParallelDims":
        check_world(p, world_size)  # clear error before any group is created
        dp = resolve_dp(p, world_size)
        ulysses = ulysses_degree(p.cp_mode, p.cp, p.ulysses_degree)
        return cls(p.dp_replicate, dp // p.dp_replicate, p.pp, p.cp // ulysses, ulysses, p.tp, world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def cp(self) -> int:
        return self.cp_ring * self.cp_ulysses

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.dp_replicate, self.dp_shard, self.pp, self.cp_ring, self.cp_ulysses, self.tp)

    def build_mesh(self, device_type: str) -> "Meshes":
        """Build (once) and keep the mesh. One process gets a mesh with no process group: every
        parallel step is then degree 1 and asks for no sub-mesh."""
        if self._meshes is not None:
            return self._meshes
        if self.world_size == 1:
            self._meshes = Meshes(None, {}, device_type)
            return self._meshes
        world = init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=self.mesh_names)
        flat = {
            # data split and loss average
            "dp": world["dp_replicate", "dp_shard"]._flatten("dp"),
            "cp": world["cp_ring", "cp_ulysses"]._flatten("cp"),
            # FSDP shards params over DP and CP (CP ranks hold the same params, like torchtitan)
            "dp_shard_cp": world["dp_shard", "cp_ring", "cp_ulysses"]._flatten("dp_shard_cp"),
            # grads/loss of one sample group are averaged over these
            "dp_cp": world["dp_replicate", "dp_shard", "cp_ring", "cp_ulysses"]._flatten("dp_cp"),
        }
        self._meshes = Meshes(world, flat, device_type)
        return self._meshes

    @property
    def meshes(self) -> "Meshes":
        if self._meshes is None:
            raise RuntimeError("ParallelDims.build_mesh(device_type) has not run yet")
        return self._meshes

    def local_rank(self, name: str) -> int:
        """This rank's coordinate on mesh dim `name` ("tp", "cp", "pp", "dp", ...): 0 where
        that degree is 1, so degree-1 steps never touch a process group."""
        size = {"dp": self.dp, "cp": self.cp}.get(name) or getattr(self, name)
        return self.meshes[name].get_local_rank() if size > 1 else 0

    def dp_host_group(self):
        """A gloo process group of this rank's DP peers (the ranks of its "dp" mesh slice, in DP
        order), for small host-side exchanges that must not wait on the GPU stream (the packer's
        balance, data/packing.py). On CPU meshes (gloo already) the DP mesh's own group."""
        if self.meshes.device_type == "cpu":
            return self.meshes["dp"].get_group()
        if self._dp_host_group is None:
            peers: dict[tuple, list] = {}
            for r in range(self.world_size):
                c = self.coords(r)
                rest = tuple(c[n] for n in self.mesh_names if n not in ("dp_replicate", "dp_shard"))
                peers.setdefault(rest, []).append((c["dp"], r))
            # every rank creates every DP group, in one order (new_group is collective)
            ranks = [[r for _, r in sorted(v)] for _, v in sorted(peers.items())]
            self._dp_host_group, _ = dist.new_subgroups_by_enumeration(ranks, backend="gloo")
        return self._dp_host_group

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on each mesh dim (same arithmetic as the mesh layout)."""
        out = {}
        for name, size in zip(reversed(self.mesh_names), reversed(self.mesh_shape)):
            out[name] = rank % size
            rank //= size
        out["dp"] = out["dp_replicate"] * self.dp_shard + out["dp_shard"]
        out["cp"] = out["cp_ring"] * self.cp_ulysses + out["cp_ulysses"]
        return out


class Meshes:
    """The world mesh plus its flattened views; `meshes["tp"]`, `meshes["dp_shard_cp"]`, ..."""

    def __init__(self, world, flat: dict, device_type: str):
        self.world = world
        self._flat = flat
        self.device_type = device_type

    def __getitem__(self, name: str):
        if self.world is None:
            raise RuntimeError(f"mesh dim {name!r} asked for in a one-process run (no process group); "
                               "a parallel step of degree 1 should not need it")
        return self._flat[name] if name in self._flat else self.world[name]


def row_exchange(group) -> Callable[[np.ndarray], np.ndarray]:
    """All-gather of a short float64 vector over a CPU (gloo) group's ranks, in group-rank order:
    (n,) -> (R, n) (the same n on every rank). The packer's balance exchange (data/packing.py
    PackBalance) on ParallelDims.dp_host_group(): a few numbers per call, on the host, so it
    never waits for the GPU's queued work (an NCCL gather would copy back through the stream)."""
    R = dist.get_world_size(group)

    def exchange(row: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(row, dtype=np.float64).reshape(-1))
        out = torch.empty(R * t.numel(), dtype=torch.float64)
        dist.all_gather_into_tensor(out, t, group=group)
        return out.view(R, -1).numpy()
    return exchange

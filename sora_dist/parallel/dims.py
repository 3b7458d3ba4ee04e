"""ParallelDims: the parallel degrees and the one named DeviceMesh built from them.

Rank grid (outermost first): dp_replicate, dp_shard, pp, cp_ring, cp_ulysses, tp — TP
innermost so its collectives stay inside a node, then CP (Ulysses inside ring, so the
all-to-alls are the intra-node ones), PP, DP. Model code never sees process groups: it is
handed sub-meshes of this mesh (picotron-style: the grid is written down once, here).
"""
from __future__ import annotations

from dataclasses import dataclass

from sora_dist.config.validate import check_world, resolve_dp


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    pp: int
    cp_ring: int
    cp_ulysses: int
    tp: int
    world_size: int

    mesh_names = ("dp_replicate", "dp_shard", "pp", "cp_ring", "cp_ulysses", "tp")

    @classmethod
    def from_config(cls, p, world_size: int) -> "ParallelDims":
        check_world(p, world_size)  # clear error before any group is created
        dp = resolve_dp(p, world_size)
        ulysses = {"ulysses": p.cp, "ring": 1, "hybrid": p.ulysses_degree}[p.cp_mode]
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
        from torch.distributed.device_mesh import init_device_mesh

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
        return Meshes(world, flat)

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

    def __init__(self, world, flat: dict):
        self.world = world
        self._flat = flat

    def __getitem__(self, name: str):
        return self._flat[name] if name in self._flat else self.world[name]

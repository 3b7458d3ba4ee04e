"""ParallelDims: the parallel degrees and the one named DeviceMesh built from them.

Rank grid (outermost first): dp_replicate, dp_shard, pp, cp, tp — TP innermost so its
all-gathers stay inside a node, then CP, PP, DP (rank = ((dp*PP + pp)*CP + cp)*TP + tp).
Model code never sees process groups: it is handed sub-meshes of this mesh.
"""
from __future__ import annotations

from dataclasses import dataclass

from sora_dist.config.validate import check_world, resolve_dp


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    pp: int
    cp: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, p, world_size: int) -> "ParallelDims":
        check_world(p, world_size)  # clear error before any group is created
        dp = resolve_dp(p, world_size)
        return cls(p.dp_replicate, dp // p.dp_replicate, p.pp, p.cp, p.tp, world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.dp_replicate, self.dp_shard, self.pp, self.cp, self.tp)

    mesh_names = ("dp_replicate", "dp_shard", "pp", "cp", "tp")

    def build_mesh(self, device_type: str):
        """The world DeviceMesh plus flattened views: 'dp' (data split / loss average),
        'dp_shard_cp' (FSDP shards params over DP and CP: CP ranks hold the same params)."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=self.mesh_names)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return mesh

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on each mesh dim (same arithmetic as the mesh layout)."""
        out = {}
        for name, size in zip(reversed(self.mesh_names), reversed(self.mesh_shape)):
            out[name] = rank % size
            rank //= size
        out["dp"] = out["dp_replicate"] * self.dp_shard + out["dp_shard"]
        return out

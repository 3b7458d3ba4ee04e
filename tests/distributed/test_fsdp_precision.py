"""FSDP2 bf16 mixed precision keeps the RoPE table in fp32 inside the blocks (FSDP casts
dataclass fields of forward inputs, so a per-block cast would round the rotary angles)."""
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from sora_dist.config import JobConfig
from sora_dist.models.dit import build_dit
from sora_dist.parallel.dims import ParallelDims
from sora_dist.parallel.fsdp import apply_fsdp
from sora_dist.testing import run_distributed


def _worker(rank, world):
    cfg = JobConfig()
    pd = ParallelDims.from_config(cfg.parallel, world)
    meshes = pd.build_mesh("cpu")
    torch.manual_seed(0)
    m = build_dit(cfg.model)
    m.init_weights(zero_init=False)
    seen = []
    for blk in m.blocks.values():
        blk.attn.register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, args[1].dtype)))
    apply_fsdp(m, meshes["dp_shard_cp"], MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    x = torch.randn(2, 4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, torch.tensor([3.0, 700.0]), torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool),
                torch.tensor([True, False]))
    out.float().pow(2).mean().backward()
    return {"seen": [[str(a), str(b)] for a, b in seen], "finite": bool(torch.isfinite(out).all()),
            "grads": all(p.grad is not None for p in m.parameters())}


def test_bf16_fsdp_blocks_keep_fp32_rope():
    for rank, out in enumerate(run_distributed(_worker, 2, all_ranks=True)):
        assert out["finite"] and out["grads"], rank
        assert out["seen"] and all(rope == "torch.float32" for _, rope in out["seen"]), (rank, out["seen"])
        assert all(x == "torch.bfloat16" for x, _ in out["seen"]), rank  # activations still bf16

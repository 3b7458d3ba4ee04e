"""How long model.init_from takes on N ranks (gloo, CPU) when each rank reads only the slices of
its shards (train.meta_init + FSDP2 over all ranks, or TP2 x FSDP) vs every rank reading each
whole tensor and keeping its shard, in one run on the same sharded diffusers-style folder.
Prints both times (slowest rank, best of --repeats), their ratio and the bytes each rank read.

    python tools/bench_load.py --world 4 --hidden 1024 --depth 8 --ffn 4096
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

from sora_dist.config import JobConfig
from sora_dist.config.model import DiTArgs
from sora_dist.diffusion import build_diffusion
from sora_dist.models import build_model
from sora_dist.models.wan import WanDiT
from sora_dist.models.wan_weights import load_diffusers_weights, to_diffusers_key, weight_index
from sora_dist.parallel.dims import ParallelDims
from sora_dist.parallel.parallelize import parallelize
from sora_dist.testing import run_distributed


def write_folder(folder: str, a: DiTArgs, shards: int) -> int:
    """A random WanDiT saved like a sharded diffusers transformer folder; returns its bytes."""
    from safetensors.torch import save_file

    from sora_dist.models.wan_weights import diffusers_config
    torch.manual_seed(0)
    sd = {to_diffusers_key(n): p.detach() for n, p in WanDiT(a).named_parameters()}
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i::shards]}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(diffusers_config(a), f)
    return sum(t.numel() * t.element_size() for t in sd.values())


def load_whole_tensors(model, folder: str) -> dict:
    """The baseline: every rank reads each whole tensor, then keeps its shard of it."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor
    index = weight_index(folder)
    read = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            entry = index[to_diffusers_key(name.replace("_checkpoint_wrapped_module.", ""))]
            with safe_open(entry.file, framework="pt", device="cpu") as f:
                full = f.get_tensor(to_diffusers_key(name.replace("_checkpoint_wrapped_module.", "")))
            read += full.numel() * full.element_size()
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.copy_(full)
    return {"bytes_read": read}


def _worker(rank, world, folder, a_dict, layout, repeats):
    torch.set_num_threads(1)
    a = DiTArgs(**a_dict)
    cfg = JobConfig()
    cfg.model.arch = "wan"
    for k in ("hidden_size", "num_heads", "depth", "ffn_dim", "in_channels", "text_dim"):
        setattr(cfg.model, k, getattr(a, k))
    cfg.train.meta_init = True
    cfg.parallel.fsdp = True
    if layout == "tp2_fsdp":
        cfg.parallel.tp, cfg.parallel.sequence_parallel = 2, True
    pdims = ParallelDims.from_config(cfg.parallel, world)
    pdims.build_mesh("cpu")
    with torch.device("meta"):
        model = build_model(cfg.model)
    pm = parallelize(model, pdims, cfg, torch.device("cpu"), build_diffusion(cfg.diffusion).loss)
    out = {}
    for how, fn in (("slices", load_diffusers_weights), ("whole", load_whole_tensors)):
        best = float("inf")
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            stats = fn(pm.model, folder)
            dist.barrier()
            best = min(best, time.perf_counter() - t0)
        out[how] = (best, stats["bytes_read"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--layout", choices=["fsdp", "tp2_fsdp"], default="fsdp")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--text-dim", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    a = DiTArgs(arch="wan", hidden_size=args.hidden, num_heads=args.heads, depth=args.depth, ffn_dim=args.ffn,
                in_channels=16, text_dim=args.text_dim)
    with tempfile.TemporaryDirectory() as folder:
        total = write_folder(folder, a, args.shards)
        print(f"wan hidden {args.hidden} depth {args.depth} ffn {args.ffn}: {a.num_params() / 1e6:.1f}M params, "
              f"{total / 2**20:.0f} MiB in {args.shards} safetensors shards; {args.world} ranks, {args.layout}, "
              f"meta init", flush=True)
        res = run_distributed(_worker, args.world, folder, vars(a), args.layout, args.repeats, all_ranks=True)
    for how in ("slices", "whole"):
        t = max(r[how][0] for r in res)
        per_rank = ", ".join(f"{r[how][1] / 2**20:.0f}" for r in res)
        print(f"{how:>6}: {t:6.2f} s (slowest rank, best of {args.repeats}); MiB read per rank: {per_rank}")
    ts, tw = (max(r[h][0] for r in res) for h in ("slices", "whole"))
    print(f"whole-tensor reads / slice reads: {tw / ts:.2f}x time, "
          f"{sum(r['whole'][1] for r in res) / sum(r['slices'][1] for r in res):.2f}x bytes")


if __name__ == "__main__":
    main()

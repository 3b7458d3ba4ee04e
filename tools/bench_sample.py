"""Sampling at CP = 1, 2, 4 on CPU/gloo: time per denoising step and peak memory per rank.

    python tools/bench_sample.py [--hidden 256 --depth 4 --heads 8 --frames 8 --size 32 --steps 3]

The denoiser is what sora-sample runs under torchrun (parallel/inference.py: the model built on
meta, parallelized with parallelize_dit, no autograd): one sampler step = one forward of the
guided batch (CFG: 2 samples) over T x H x W latent tokens. Per layout it prints the median
wall and process-CPU time per step (max over ranks; CP=4 on a 2-core machine is oversubscribed,
so its wall time does not scale — CPU time per rank is the fairer figure there) and the CPU
allocator's peak above the inputs during a step (torch profiler memory events, max over ranks),
each as a ratio to CP=1 in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sora_dist.config import JobConfig
from sora_dist.config.parallel import ParallelConfig
from sora_dist.parallel.inference import build_sampling_layout, parallel_denoiser
from sora_dist.planning.measure import cpu_peak_bytes
from sora_dist.testing import run_distributed

LAYOUTS = [("cp1", 1, "ulysses"), ("cp2 ulysses", 2, "ulysses"), ("cp2 ring", 2, "ring"),
           ("cp4 ulysses", 4, "ulysses"), ("cp4 ring", 4, "ring")]


def _job(a) -> JobConfig:
    job = JobConfig()
    job.model.hidden_size, job.model.depth, job.model.num_heads = a.hidden, a.depth, a.heads
    job.model.text_dim, job.model.zero_init = 64, False
    job.train.mixed_precision = "fp32"
    return job


def _worker(rank, world, a, cp, mode):
    torch.manual_seed(0)
    layout = build_sampling_layout(ParallelConfig(cp=cp, cp_mode=mode, fsdp=False), False, world, "cpu")
    model = parallel_denoiser(_job(a), ParallelConfig(cp=cp, cp_mode=mode, fsdp=False), layout,
                              lambda m: None, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, a.frames, a.size, a.size, generator=g)
    t = torch.full((2,), 500.0)
    text = torch.randn(2, 16, 64, generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    drop = torch.tensor([False, True])
    walls, cpus = [], []
    with torch.no_grad():
        model(x, t, text, mask, drop)  # warm-up
        for _ in range(a.steps):
            w0, c0 = time.perf_counter(), time.process_time()
            model(x, t, text, mask, drop)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        peak = cpu_peak_bytes(lambda: model(x, t, text, mask, drop))
    out = torch.tensor([statistics.median(walls), statistics.median(cpus), float(peak)])
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8, help="latent frames")
    ap.add_argument("--size", type=int, default=32, help="latent height = width")
    ap.add_argument("--steps", type=int, default=3, help="timed sampler steps per layout")
    a = ap.parse_args()
    tokens = a.frames * (a.size // 2) ** 2
    print(f"denoiser: hidden {a.hidden}, depth {a.depth}, heads {a.heads}; one step = CFG batch of 2 x "
          f"{tokens:,} tokens (latent {a.frames}x{a.size}x{a.size}, patch 1x2x2), fp32 CPU")
    print(f"{'layout':>12} {'wall s/step':>12} {'cpu s/step':>11} {'peak MiB/rank':>14} {'wall':>6} "
          f"{'cpu':>6} {'peak':>6}   (ratios to cp1)")
    base = None
    for label, cp, mode in LAYOUTS:
        wall, cpu, peak = (_worker(0, 1, a, 1, mode) if cp == 1
                           else run_distributed(_worker, cp, a, cp, mode))
        base = base or (wall, cpu, peak)
        print(f"{label:>12} {wall:12.3f} {cpu:11.3f} {peak / 2**20:14.1f} {wall / base[0]:6.2f} "
              f"{cpu / base[1]:6.2f} {peak / base[2]:6.2f}")


if __name__ == "__main__":
    main()

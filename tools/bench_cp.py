"""Context-parallel attention on CPU/gloo: per-rank activation memory, step time and traffic.

    python tools/bench_cp.py [--seq 2048 --heads 8 --head-dim 64 --iters 3]

For one sequence, runs fwd+bwd at CP = 1, 2, 4 (Ulysses, ring, hybrid 2x2) twice: the core
attention alone, and a whole DiTBlock whose self-attention is swapped for the CP module (tokens,
RoPE table and key mask sharded with shard_sequence). Per rank (max over ranks) it reports
  * peak: CPU allocator high-water mark of fwd+bwd above the inputs (torch profiler memory
    events), i.e. activations + transient score blocks + comm buffers;
  * saved: bytes kept for backward (saved_tensors_hooks, unique storages);
  * step time, wall and CPU (median; process CPU time is less disturbed by other load, and CP=4
    on a 2-core machine is oversubscribed, so its wall time is not scaling);
  * bytes sent (the CommCounter in parallel/context_parallel/comm.py), against Ulysses at the same CP.
Ring runs twice: fused CPU flash blocks with LSE (the default) and the fp32 math blocks.
A tenth of the tokens is padding (key mask), as in bucketed video batches.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from sora_dist.models.attention import CoreAttention
from sora_dist.models.dit import Conditioning, DiTArgs, DiTBlock
from sora_dist.models.embeddings import build_rope_3d
from sora_dist.parallel.context_parallel import COMM_COUNTER, build_cp_attention
from sora_dist.parallel.context_parallel.ring import DEFAULT_MAX_SCORE_ELEMS
from sora_dist.parallel.sequence import shard_sequence
from sora_dist.parallel.dims import ParallelDims
from sora_dist.testing import run_distributed
from sora_dist.planning.measure import cpu_peak_bytes, saved_bytes_of

LAYOUTS = [  # (label, mode, cp_ring, cp_ulysses, ring block kernel)
    ("cp1", None, 1, 1, "auto"),
    ("cp2 ulysses", "ulysses", 1, 2, "auto"), ("cp2 ring", "ring", 2, 1, "auto"),
    ("cp2 ring math", "ring", 2, 1, "math"),
    ("cp4 ulysses", "ulysses", 1, 4, "auto"), ("cp4 ring", "ring", 4, 1, "auto"),
    ("cp4 ring math", "ring", 4, 1, "math"), ("cp4 hybrid 2x2", "hybrid", 2, 2, "auto"),
]


def _worker(rank, world, mode, ring, ulysses, kernel, what, B, H, S, D, iters, max_score_elems):
    meshes = ParallelDims(1, 1, 1, ring, ulysses, 1, world).build_mesh("cpu")
    cp = meshes["cp"]
    attn = (CoreAttention() if mode is None
            else build_cp_attention(meshes, mode, max_score_elems=max_score_elems, ring_kernel=kernel))
    torch.manual_seed(0)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, S - S // 10:] = False
    mask = shard_sequence(mask, 1, cp)
    if what == "attn":
        q, k, v = (shard_sequence(torch.randn(B, H, S, D), 2, cp).clone().requires_grad_() for _ in range(3))
        step = lambda: attn(q, k, v, mask).square().mean()  # noqa: E731
    else:
        block = DiTBlock(DiTArgs(hidden_size=H * D, num_heads=H, text_dim=H * D))
        block.attn.core_attention = attn
        T = 4
        rope = build_rope_3d((T, S // T // 16, 16), D)
        cond = Conditioning(c_BD=torch.randn(B, H * D), text_BLD=torch.randn(B, 16, H * D),
                            text_mask_BL=torch.ones(B, 16, dtype=torch.bool),
                            rope_SP2=shard_sequence(rope, 0, cp), token_mask_BS=mask)
        x = shard_sequence(torch.randn(B, S, H * D), 1, cp).clone().requires_grad_()
        step = lambda: block(x, cond).square().mean()  # noqa: E731

    step().backward()  # warm-up
    with COMM_COUNTER.counting():
        step().backward()
    sent = COMM_COUNTER.total()
    times, cpu = [], []
    for _ in range(iters):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step().backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    stats = torch.tensor([statistics.median(times), statistics.median(cpu), cpu_peak_bytes(lambda: step().backward()),
                          saved_bytes_of(step), sent], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest / fullest rank bounds the step
    return stats.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=2048, help="tokens (multiple of 64*4)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--what", choices=["attn", "block", "both"], default="both")
    ap.add_argument("--max-score-elems", type=int, default=DEFAULT_MAX_SCORE_ELEMS,
                    help="math ring kernel's score-tile budget (smaller: less memory, more, "
                         "smaller matmuls)")
    a = ap.parse_args()
    MiB = 2**20
    for what in (["attn", "block"] if a.what == "both" else [a.what]):
        print(f"\n== {what}: B={a.batch} S={a.seq} heads={a.heads} head_dim={a.head_dim} fp32, fwd+bwd ==")
        print(f"{'layout':16} {'wall ms':>8} {'x cp1':>6} {'cpu ms':>8} {'x cp1':>6} {'peak MiB':>9} "
              f"{'x cp1':>6} {'saved MiB':>9} {'x cp1':>6} {'sent MiB':>9} {'x ulysses':>9}")
        res = {}
        for label, mode, ring, uly, kernel in LAYOUTS:
            res[label] = run_distributed(_worker, ring * uly, mode, ring, uly, kernel, what, a.batch,
                                         a.heads, a.seq, a.head_dim, a.iters, a.max_score_elems)
            t, c, peak, saved, sent = res[label]
            t1, c1, peak1, saved1, _ = res["cp1"]
            uly_sent = res.get(label.split()[0] + " ulysses", [0] * 5)[4]
            print(f"{label:16} {t * 1e3:8.1f} {t / t1:6.2f} {c * 1e3:8.1f} {c / c1:6.2f} "
                  f"{peak / MiB:9.1f} {peak / peak1:6.2f} {saved / MiB:9.1f} {saved / saved1:6.2f} "
                  f"{sent / MiB:9.2f} {(sent / uly_sent if uly_sent else float('nan')):9.2f}",
                  flush=True)


if __name__ == "__main__":
    main()

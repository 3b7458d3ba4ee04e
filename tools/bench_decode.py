"""Peak memory of streaming VAE decode: a long latent vs a short one, plus whole-decode.

Memory is peak process RSS (ru_maxrss) minus the RSS just before the decode, each case in a
fresh subprocess with glibc told to mmap large blocks and trim on free (RSS is per process and never goes down in ru_maxrss). The decoded frames of
streaming cases are dropped chunk by chunk, as a writer would. Tiny random-weight Wan VAE.

  python tools/bench_decode.py --long 64 --short 8 --size 64 --chunk 1
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _case(vae_dir: str, mode: str, t: int, size: int, chunk: int, tile: int, q) -> None:
    import torch

    from sora_dist.models.vae import VideoVAE

    torch.set_num_threads(max(1, torch.get_num_threads()))
    vae = VideoVAE.load(vae_dir)
    h = size // vae.spatial_compression
    z = torch.randn(1, vae.latent_channels, t, h, h, generator=torch.Generator().manual_seed(0))
    vae.decode(torch.zeros(1, vae.latent_channels, 2, 1, 1))  # kernel/allocator warm-up off the clock
    base = _rss_kb()
    t0 = time.perf_counter()
    if mode == "whole":
        n = vae.decode(z).shape[2]
    else:
        n = 0
        for frames in vae.decode_stream(z, frames_per_chunk=chunk, tile=tile or None):
            n += frames.shape[2]  # a writer would encode and drop the chunk here
            del frames
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    q.put((max(0, peak - base) / 1024, n, dt))


def run(vae_dir: str, mode: str, t: int, args) -> tuple[float, int, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(vae_dir, mode, t, args.size, args.chunk, args.tile, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long", type=int, default=64, help="latent frames of the long video")
    ap.add_argument("--short", type=int, default=8, help="latent frames of the reference video")
    ap.add_argument("--size", type=int, default=64, help="frame side in pixels")
    ap.add_argument("--chunk", type=int, default=1, help="latent frames per streamed chunk")
    ap.add_argument("--tile", type=int, default=0, help="spatial tile in pixels (0: untiled)")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-decode contrast case")
    args = ap.parse_args()

    from sora_dist.models.vae import build_tiny_vae

    # Large blocks straight from mmap and returned on free, one arena: RSS then tracks live
    # tensors instead of glibc's cached heap (read by the spawned children at start-up).
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", MALLOC_ARENA_MAX="1")

    with tempfile.TemporaryDirectory() as d:
        vae_dir = build_tiny_vae(f"{d}/wan", latent_channels=4)
        cases = [("stream", args.short), ("stream", args.long)] + ([] if args.no_whole else [("whole", args.long)])
        res = {}
        for mode, t in cases:
            mb, n, dt = res[(mode, t)] = run(vae_dir, mode, t, args)
            print(f"{mode:6s} {t:3d} latent -> {n:4d} frames {args.size}x{args.size}: peak +{mb:8.1f} MiB RSS, "
                  f"{1000 * dt / n:6.1f} ms/frame", flush=True)
    ratio = res[("stream", args.long)][0] / max(res[("stream", args.short)][0], 1e-6)
    print(f"stream peak ratio long/short = {ratio:.2f}x (target <= 1.2x)")
    if not args.no_whole:
        print(f"whole-decode peak / stream peak (long) = "
              f"{res[('whole', args.long)][0] / max(res[('stream', args.long)][0], 1e-6):.1f}x")


if __name__ == "__main__":
    main()

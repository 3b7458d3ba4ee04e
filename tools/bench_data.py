#!/usr/bin/env python
"""Data-path throughput in one run: sora-encode videos/s with 1 vs 2 DP ranks (spawned
processes, each with its share of the cores), ShardLoader samples/s and the samples/s the real
trainer consumes from the same shards, printed as ratios.

  python tools/bench_data.py [--clips 24] [--size 64] [--frames 17]

Encode rate counts only the encode loop (model loading excluded) and uses the slowest rank,
since a DP job finishes when its last rank does.
"""
import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time

from sora_dist.config import JobConfig
from sora_dist.config.data import DataConfig
from sora_dist.config.encode import EncodeConfig
from sora_dist.data.demo_clips import make_demo_clips
from sora_dist.data.loader import ShardLoader
from sora_dist.encode import run_encode
from sora_dist.models.text import build_tiny_text_encoder
from sora_dist.models.vae import build_tiny_vae
from sora_dist.training.trainer import Trainer


def _encode_worker(cfg_kwargs: dict, threads: int) -> None:
    run_encode(EncodeConfig(num_threads=threads, progress=False, **cfg_kwargs))


def bench_encode(base: dict, out: str, world: int, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_encode_worker, args=(dict(base, output=out, rank=r, world_size=world), threads))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    if any(p.exitcode for p in procs):
        raise SystemExit(f"encode with {world} ranks failed: exit codes {[p.exitcode for p in procs]}")
    stats = [json.load(open(os.path.join(out, f"rank-r{r:03d}.complete.json"))) for r in range(world)]
    videos = sum(s["assigned"] for s in stats)
    loop_s = max(s["seconds"] for s in stats)
    cpu_s = sum(s["cpu_seconds"] for s in stats)
    return {"ranks": world, "threads_per_rank": threads, "videos": videos, "loop_s": loop_s,
            "videos_per_s": videos / loop_s, "wall_s": wall, "cpu_s_per_video": cpu_s / videos}


def bench_loader(shards: str, batch_size: int, batches: int) -> dict:
    ld = ShardLoader(DataConfig(source="shards", shards=shards, batch_size=batch_size, shuffle_buffer=16), 0, 1)
    next(ld)  # first block load is part of steady state too, but not import time
    t0 = time.perf_counter()
    n = sum(next(ld)["latent"].shape[0] for _ in range(batches))
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt}


def bench_trainer(shards: str, batch_size: int, steps: int, flavor: str, work: str) -> dict:
    """Samples/s the real trainer consumes from the same shards (model.flavor, this device)."""
    cfg = JobConfig()
    cfg.model.flavor = flavor
    cfg.data.source, cfg.data.shards, cfg.data.batch_size = "shards", shards, batch_size
    cfg.train.run_dir, cfg.train.steps, cfg.train.ckpt_every = os.path.join(work, "train"), steps + 2, 0
    cfg.train.resume, cfg.logging.wandb_mode, cfg.logging.log_every = False, "disabled", 10**9
    tr = Trainer(cfg)
    tr.train(stop_at=2)  # warm-up steps
    t0 = time.perf_counter()
    tr.train(stop_at=steps + 1)
    dt = time.perf_counter() - t0
    tr.close()
    return {"samples": (steps - 1) * batch_size, "seconds": dt, "samples_per_s": (steps - 1) * batch_size / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--size", type=int, default=64, help="bucket side in pixels (multiple of 8)")
    ap.add_argument("--frames", type=int, default=17, help="bucket frames (1 + 4k)")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--decode-workers", type=int, default=0,
                    help="encode.decode_workers (0 = decode inline, so the rank comparison is pure DP)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternate 1/2-rank runs this many times, keep each one's best (shared machines are noisy)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--train-flavor", default="tiny", help="model the trainer consumption is measured with")
    ap.add_argument("--train-steps", type=int, default=20)
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    s = args.size
    man = make_demo_clips(os.path.join(work, "clips"), n=args.clips, sizes=[(s, s), (s + 8, s + 24)],
                          fps_choices=(12,), frame_choices=(args.frames + 4,))
    base = dict(input=man, vae_path=build_tiny_vae(os.path.join(work, "vae")),
                text_encoder_path=build_tiny_text_encoder(os.path.join(work, "t5")),
                resolutions=[[s, s]], frames=[args.frames], target_fps=12.0, samples_per_shard=4,
                decode_workers=args.decode_workers)
    cores = os.cpu_count() or 1
    # (ranks, threads per rank): DP scaling is 2x1 vs 1x1; 1 x cores shows what intra-op
    # threads alone give on the same cores.
    layouts = [(1, 1), (2, 1), (1, cores)]
    runs = {lay: [] for lay in layouts}
    for _ in range(max(1, args.repeats)):
        for world, threads in layouts:
            runs[(world, threads)].append(bench_encode(base, os.path.join(work, f"out{world}"), world, threads))
    one, two, one_mt = (max(runs[lay], key=lambda r: r["videos_per_s"]) for lay in layouts)
    load = bench_loader(os.path.join(work, "out2"), batch_size=4, batches=args.batches)
    train = bench_trainer(os.path.join(work, "out2"), 4, args.train_steps, args.train_flavor, work)
    print(json.dumps({f"encode_{w}rank_x{t}thread": r for (w, t), r in runs.items()}
                     | {"loader": load, "trainer": train, "cores": cores, "load_avg": os.getloadavg()}))
    print(f"encode: 1 rank x 1 thread {one['videos_per_s']:.2f} videos/s, 2 ranks x 1 thread "
          f"{two['videos_per_s']:.2f} videos/s -> DP speedup x{two['videos_per_s'] / one['videos_per_s']:.2f} "
          f"(ideal x2 with >= 2 free cores; {cores} cores here, load avg {os.getloadavg()[0]:.1f})")
    print(f"encode CPU-s per video: 1x1 {one['cpu_s_per_video']:.3f}, 2x1 {two['cpu_s_per_video']:.3f}, "
          f"1x{cores} {one_mt['cpu_s_per_video']:.3f} (equal per-video CPU cost means DP adds no overhead; "
          "wall-clock speedup then only needs free cores)")
    print(f"encode: 1 rank x {cores} threads {one_mt['videos_per_s']:.2f} videos/s -> 2 ranks are "
          f"x{two['videos_per_s'] / one_mt['videos_per_s']:.2f} of that")
    print(f"loader: {load['samples_per_s']:.0f} samples/s = x{load['samples_per_s'] / two['videos_per_s']:.0f} "
          f"the 2-rank encode rate")
    print(f"trainer ({args.train_flavor}, this device) consumes {train['samples_per_s']:.1f} samples/s -> the "
          f"loader is x{load['samples_per_s'] / train['samples_per_s']:.0f} faster than the trainer needs")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

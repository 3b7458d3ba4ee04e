"""The main job on the embedded default, end to end on CPU (GPU when present):
synthetic clips -> tiny VAE + text encoder -> sora-encode shards -> sora-train -> sora-sample mp4.

  sora-demo                                  # = python -m sora_dist.demo --workdir runs/demo
  sora-demo --ranks 2 --train-steps 200      # 2 encode ranks, longer training

Everything is built locally with random weights (no downloads): the models match the trainer's
tiny defaults (4 latent channels, text dim 32). Every stage is the real command a cluster user
runs (the printed lines), and each one resumes: rerunning the demo skips finished work.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from sora_dist.console import quiet_third_party
from sora_dist.data.demo_clips import make_demo_clips
from sora_dist.models.text import build_tiny_text_encoder
from sora_dist.models.vae import build_tiny_vae

# Bucket table sized for the tiny demo: latents 8x8, 6x10, 10x6 (even, so 2x2 patches fit).
DEMO_OVERRIDES = ["resolutions=[[64,64],[48,80],[80,48]]", "frames=[1,9,17]", "target_fps=12",
                  "samples_per_shard=8", "text_max_length=32"]


def run_demo(workdir: str, n_clips: int = 24, ranks: int = 1, images: int = 2, verbose: bool = False) -> str:
    workdir = os.path.abspath(workdir)
    clips = os.path.join(workdir, "clips")
    manifest = os.path.join(clips, "manifest.jsonl")
    if not os.path.exists(manifest):
        make_demo_clips(clips, n=n_clips, images=images)
    vae = os.path.join(workdir, "models", "vae")
    t5 = os.path.join(workdir, "models", "t5")
    if not os.path.exists(os.path.join(vae, "config.json")):
        build_tiny_vae(vae)
    if not os.path.exists(os.path.join(t5, "config.json")):
        build_tiny_text_encoder(t5)
    out = os.path.join(workdir, "shards")
    cmd = [sys.executable, "-m", "sora_dist.encode", f"input={manifest}", f"output={out}",
           f"vae_path={vae}", f"text_encoder_path={t5}", *DEMO_OVERRIDES, f"verbose={str(verbose).lower()}"]
    # Local data-parallel launch the way torchrun would: one process per rank, env-only.
    t0 = time.perf_counter()
    run_id = f"demo-{os.getpid()}-{time.time_ns()}"  # what torchrun/srun would provide
    procs = [subprocess.Popen(cmd, env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks),
                                            LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(ranks),
                                            SORA_ENCODE_RUN_ID=run_id))
             for r in range(ranks)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"sora-encode failed (exit codes {codes}); rerun to resume")
    print(f"demo: encoded in {time.perf_counter() - t0:.1f}s; shards in {out}")
    return out


def _run(cmd: list[str], what: str) -> None:
    print("demo: $ " + " ".join(cmd[2:] if cmd[1] == "-m" else cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc:
        raise SystemExit(f"demo: {what} failed with exit code {rc}; fix the error above and rerun "
                         "(finished stages are skipped)")


def train_and_sample(workdir: str, shards: str, steps: int = 60, sample_steps: int = 20,
                     verbose: bool = False) -> str:
    """sora-train on the shards, then sora-sample from the run. Returns the mp4 folder."""
    workdir = os.path.abspath(workdir)
    run = os.path.join(workdir, "run")
    _run([sys.executable, "-m", "sora_dist.train", "data.source=shards", f"data.shards={shards}",
          f"train.run_dir={run}", f"train.steps={steps}", "train.ckpt_every=20", "optim.lr=3e-4",
          "optim.warmup_steps=5", "logging.log_every=10", f"logging.verbose={str(verbose).lower()}"], "training")
    out = os.path.join(workdir, "samples")
    _run([sys.executable, "-m", "sora_dist.sample", f"run_dir={run}", f"output_dir={out}",
          f"steps={sample_steps}", "batch_size=2",
          'prompts=["a red square moving right","a blue circle bouncing"]', f"verbose={str(verbose).lower()}"],
         "sampling")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=1, help="local encode processes (data parallel)")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--encode-only", action="store_true", help="stop after writing the shards")
    ap.add_argument("--verbose", action="store_true", help="also print other libraries' import-time warnings")
    args = ap.parse_args()
    quiet_third_party(args.verbose)
    shards = run_demo(args.workdir, args.clips, args.ranks, args.images, args.verbose)
    if args.encode_only:
        print(f"next: sora-train data.source=shards data.shards={shards}")
        return
    out = train_and_sample(args.workdir, shards, args.train_steps, args.sample_steps, args.verbose)
    print(f"demo: done; videos in {out}")


if __name__ == "__main__":
    main()

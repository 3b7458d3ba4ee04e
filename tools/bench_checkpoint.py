"""How long a checkpoint save blocks the training loop: synchronous DCP save vs
train.async_checkpoint (DCP async_save: the loop waits only for the copy to CPU memory), at
the same model size, in one run. Prints each mode's mean stall per save and the ratio.

    python tools/bench_checkpoint.py --flavor S --saves 4
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from sora_dist.config import JobConfig
from sora_dist.training.trainer import Trainer


def stalls(flavor: str, async_checkpoint: bool, saves: int, root: str, between_s: float) -> tuple[list[float], float]:
    """Stall of each save (the loop blocked in CheckpointManager.save, including any wait for the
    previous background write), and the model's parameter count. `between_s` of sleep after each
    save stands for the training steps between two checkpoints."""
    cfg = JobConfig()
    cfg.model.flavor = flavor
    cfg.train.run_dir, cfg.train.steps, cfg.train.ckpt_every = root, saves + 1, 1
    cfg.train.async_checkpoint = async_checkpoint
    cfg.data.synthetic_buckets = [[1, 4, 4]]  # tiny batches: the save dominates
    cfg.logging.wandb_mode, cfg.logging.log_every = "disabled", 1000
    tr = Trainer(cfg)
    out = []
    try:
        for _ in range(saves):
            tr.train_step(next(tr.loader))
            tr.state.step += 1
            tr.checkpoint.save()
            out.append(tr.checkpoint.last_stall_s)
            time.sleep(between_s)
        tr.checkpoint.wait()
        return out, tr.n_params
    finally:
        tr.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="S")
    ap.add_argument("--saves", type=int, default=4)
    args = ap.parse_args()
    rows = {}
    between = 0.0
    for mode in (False, True):
        with tempfile.TemporaryDirectory() as root:
            s, n = stalls(args.flavor, mode, args.saves, root, between)
        rows["async" if mode else "sync"] = statistics.mean(s[1:] if len(s) > 1 else s)  # first: warm-up
        # Async gets training time between saves worth 1.5 synchronous saves, so a background
        # write can finish (what ckpt_every gives it in a real run).
        between = 1.5 * rows["sync"]
    print(f"model {args.flavor} ({n / 1e6:.1f}M params, fp32 + AdamW + EMA state), {args.saves} saves each, "
          f"{between:.1f} s of training between async saves")
    print(f"{'mode':>6} | stall per save (s) | vs sync")
    for name, v in rows.items():
        print(f"{name:>6} | {v:18.3f} | {v / rows['sync']:.2f}x")


if __name__ == "__main__":
    main()

"""Rank-0 metrics: one console line per log step, wandb (offline by default), TensorBoard, and
run_dir/metrics.jsonl (one line per step)."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

log = logging.getLogger("sora_dist")


class MetricLogger:
    def __init__(self, cfg, run_dir: str, rank: int, config_dict: Optional[dict] = None):
        self.rank = rank
        self.wandb = None
        self.tb = None
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        if rank != 0:
            return
        if cfg.wandb_mode != "disabled":
            mode = cfg.wandb_mode
            if mode == "online" and not os.environ.get("WANDB_API_KEY"):
                log.warning("logging.wandb_mode=online but WANDB_API_KEY is unset: logging offline")
                mode = "offline"
            wandb_dir = os.path.join(run_dir, "wandb")
            os.makedirs(wandb_dir, exist_ok=True)
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, dir=wandb_dir, mode=mode,
                                        config=config_dict, name=os.path.basename(os.path.abspath(run_dir)),
                                        settings=wandb.Settings(silent=True, console="off"))
            except Exception as e:  # logging must never kill a training run
                log.warning("wandb disabled: %s", e)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except Exception as e:
                log.warning("tensorboard disabled: %s", e)

    def record(self, step: int, m: dict) -> None:
        """metrics.jsonl: one line per step, appended across restarts (a resumed run rewrites the
        steps after its checkpoint; readers keep the last line of each step)."""
        if self.rank != 0:
            return
        row = {"step": step, **{k: v for k, v in m.items() if k not in ("tokens", "flops")}}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def log(self, step: int, total: int, m: dict) -> None:
        """The console line, wandb and TensorBoard of a log step."""
        if self.rank != 0:
            return
        parts = [f"step {step:>6d}/{total}", f"loss {m['loss']:.5f}", f"grad_norm {m['grad_norm']:.3f}",
                 f"lr {m['lr']:.2e}", f"tok/s {m['tokens_per_s']:,.0f}"]
        if "mfu" in m:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        elif "tflops_per_device" in m:
            parts.append(f"tflops/dev {m['tflops_per_device']:.3g}")
        if "mem_gib" in m:
            parts.append(f"mem {m['mem_gib']:.2f}GiB")
        if m.get("skipped"):
            parts.append(f"skipped {m['skipped']}")
        log.info(" | ".join(parts))
        if self.wandb is not None:
            self.wandb.log(m, step=step)
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def log_videos(self, step: int, records: list[dict]) -> None:
        """records: [{"prompt", "path"}] of mp4 files (from sora_dist.sample.run_sample)."""
        if self.rank != 0 or self.wandb is None or not records:
            return
        import wandb

        self.wandb.log({"samples": [wandb.Video(r["path"], caption=r["prompt"], format="mp4")
                                    for r in records]}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()

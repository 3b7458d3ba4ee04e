"""Sample videos during training (logging.sample_every): rank 0 starts `sora-sample` on the
checkpoint just saved, in its own process, and goes on training.

A separate process has no process group (any training layout loads into one process) and never
shares the trainer's memory or collectives, so training never waits on sampling; the videos are
logged when that process has finished (`poll`), and a failed sampler is reported, never fatal.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

log = logging.getLogger("sora_dist")

# The launcher's variables: a sampler that saw them would try to join the training job's group.
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS")


class SampleLogger:
    def __init__(self, logging_cfg, run_dir: str, device_type: str, metrics):
        self.cfg, self.run_dir, self.device_type, self.metrics = logging_cfg, run_dir, device_type, metrics
        self._running: list = []  # (process, step, output folder, log file)

    def due(self, step: int) -> bool:
        return bool(self.cfg.sample_every) and step % self.cfg.sample_every == 0

    def start(self, ckpt_path: str, step: int) -> None:
        lg = self.cfg
        out = os.path.join(self.run_dir, "samples", f"step_{step:08d}")
        os.makedirs(out, exist_ok=True)
        prompts = "[" + ",".join(json.dumps(p) for p in lg.sample_prompts) + "]"
        cmd = [sys.executable, "-m", "sora_dist.sample", f"run_dir={self.run_dir}", f"checkpoint={ckpt_path}",
               f"prompts={prompts}", f"output_dir={out}", f"steps={lg.sample_steps}",
               f"num_frames={lg.sample_num_frames}", f"height={lg.sample_height}", f"width={lg.sample_width}",
               f"batch_size={len(lg.sample_prompts)}", "progress=false", f"device={self.device_type}"]
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
        log_file = open(os.path.join(out, "sample.log"), "w")
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        self._running.append((proc, step, out, log_file))

    def poll(self, wait: bool = False) -> None:
        """Log the videos of finished sampler processes (all of them when `wait`)."""
        pending = []
        for proc, step, out, log_file in self._running:
            if wait:
                proc.wait()
            if proc.poll() is None:
                pending.append((proc, step, out, log_file))
                continue
            log_file.close()
            jsonl = os.path.join(out, "samples.jsonl")
            if proc.returncode == 0 and os.path.exists(jsonl):
                with open(jsonl) as f:
                    records = [json.loads(line) for line in f]
                self.metrics.log_videos(step, records)
                log.info("step %d: %d sample videos in %s", step, len(records), out)
            else:
                log.warning("step %d: sampling for the log failed (exit %s); see %s/sample.log",
                            step, proc.returncode, out)
        self._running = pending

"""Slurm-style preemption on CPU: SIGUSR1 mid-run -> checkpoint + exit 42 -> the restart
continues the same loss sequence as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sora_dist.training.trainer import REQUEUE_EXIT_CODE

STEPS = 120


def cmd(run_dir, async_checkpoint=False):
    return [sys.executable, "-m", "sora_dist.train", f"train.run_dir={run_dir}",
            f"train.steps={STEPS}", "train.ckpt_every=0", "logging.wandb_mode=disabled",
            "logging.log_every=1", "data.synthetic_buckets=[[1,4,4]]", "model.depth=1",
            f"train.async_checkpoint={str(async_checkpoint).lower()}"]


def losses(run_dir):
    by_step = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            by_step[row["step"]] = row["loss"]  # a restart rewrites steps after its checkpoint
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.parametrize("async_checkpoint", [False, True], ids=["sync", "async"])
def test_sigusr1_saves_exits_for_requeue_and_restart_continues(tmp_path, async_checkpoint):
    """With async checkpoints the exit waits for the background write: the checkpoint is
    complete when the job exits 42."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    run = tmp_path / "run"
    p = subprocess.Popen(cmd(run, async_checkpoint), stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    for line in p.stdout:  # wait until training is under way
        if "step     10/" in line or time.time() > deadline:
            break
    p.send_signal(signal.SIGUSR1)
    err, _ = p.communicate(timeout=240)
    assert p.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "checkpoint saved at step" in err
    saved = [d for d in os.listdir(run / "checkpoints") if not d.endswith(".tmp")]
    assert len(saved) == 1 and 10 <= int(saved[0][5:]) < STEPS
    # The requeued job: same command, resumes from the checkpoint and finishes.
    r = subprocess.run(cmd(run, async_checkpoint), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr + r.stdout
    ref = tmp_path / "ref"
    r = subprocess.run(cmd(ref), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run) == losses(ref)

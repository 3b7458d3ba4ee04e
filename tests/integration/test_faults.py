"""Fault behaviour of a 2-rank CPU job launched like `srun` (one process per rank)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from sora_dist.testing import free_port


def test_kill9_one_rank_makes_the_other_fail_fast_with_clear_message(tmp_path):
    port = free_port()
    procs, logs = [], []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        log = open(tmp_path / f"rank{r}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sora_dist.train", f"train.run_dir={tmp_path}/run", "parallel.cp=2",
             "parallel.timeout_s=60", "train.steps=100000", "train.ckpt_every=0",
             "logging.wandb_mode=disabled", "data.synthetic_buckets=[[1,4,4]]", "model.depth=1"],
            stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.time() + 300
    while "step      5/" not in (tmp_path / "rank0.log").read_text():
        assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "rank0.log").read_text()[-2000:]
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    rc = procs[0].wait(timeout=120)   # well inside parallel.timeout_s: the peer reset is seen
    elapsed = time.time() - t0
    text = (tmp_path / "rank0.log").read_text()
    assert rc != 0
    assert "a collective failed at step" in text and "another rank died" in text
    assert "rerun the same command to resume" in text
    print(f"survivor exited {elapsed:.1f}s after the kill")


def _losses(run_dir):
    import json

    by_step = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        by_step[row["step"]] = row["loss"]
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.parametrize("async_checkpoint", [False, True], ids=["sync", "async"])
def test_kill9_during_checkpointing_resumes_from_a_complete_one(tmp_path, async_checkpoint):
    # Saving every step, so a SIGKILL lands in or next to a save. Whatever it hits, the rerun
    # must find a complete checkpoint (half-written ones are .tmp or lack the marker) and
    # continue the uninterrupted loss sequence.
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")

    def cmd(run):
        return [sys.executable, "-m", "sora_dist.train", f"train.run_dir={run}", "train.steps=16",
                "train.ckpt_every=1", "train.ckpt_keep=2", "logging.wandb_mode=disabled",
                "data.synthetic_buckets=[[1,4,4]]", f"train.async_checkpoint={str(async_checkpoint).lower()}"]

    run = tmp_path / "run"
    log = open(tmp_path / "log.txt", "w+")
    p = subprocess.Popen(cmd(run), stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while "saved checkpoint" not in (tmp_path / "log.txt").read_text() or \
            (tmp_path / "log.txt").read_text().count("saved checkpoint") < 6:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run(cmd(run), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr
    ref = tmp_path / "ref"
    assert subprocess.run(cmd(ref), capture_output=True, env=env, timeout=600).returncode == 0
    assert _losses(run) == _losses(ref)

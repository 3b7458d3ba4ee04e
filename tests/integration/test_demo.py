"""The demo's real launch path: `python -m sora_dist.encode` (Hydra main, encode.yaml) as two
ranks that only share RANK/WORLD_SIZE env vars, then the shards feed the loader."""
import json
import os
import re

import pytest

from sora_dist.config.data import DataConfig
from sora_dist.data.loader import ShardLoader
from sora_dist.data.shards import list_shards, read_shard_meta
from sora_dist.demo import run_demo

pytestmark = pytest.mark.integration


def test_demo_two_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = run_demo(str(tmp_path / "demo"), n_clips=5, ranks=2, images=1)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["num_samples"] == 6 and manifest["world_size"] == 2
    ranks = {os.path.basename(p)[7:10] for p in list_shards(out)}
    assert ranks == {"000", "001"}
    sources = [m["source"] for p in list_shards(out) for m in read_shard_meta(p)]
    assert len(sources) == len(set(sources)) == 6
    assert any(b.startswith("1x") for b in manifest["buckets"])  # the still became a 1-frame sample
    b = next(ShardLoader(DataConfig(source="shards", shards=out, batch_size=1), 0, 1))
    assert b["latent"].shape[1] == 4 and b["text"].shape[2] == 32


def test_main_job_end_to_end(tmp_path):
    """The README's main job (sora-demo): clips -> encode -> train -> sample -> mp4."""
    import subprocess
    import sys

    import av

    r = subprocess.run([sys.executable, "-m", "sora_dist.demo", "--workdir", str(tmp_path), "--clips", "3",
                        "--images", "1", "--train-steps", "3", "--sample-steps", "2"],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, WANDB_MODE="disabled"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # Only sora_dist's lines and progress bars: other libraries' import noise is filtered.
    noise = [line for line in (r.stdout + r.stderr).splitlines()
             if re.search(r"warn|failed to load|accelerate", line, re.I)]
    assert not noise, noise
    mp4s = sorted(f for f in os.listdir(tmp_path / "samples") if f.endswith(".mp4"))
    assert len(mp4s) == 2
    with av.open(str(tmp_path / "samples" / mp4s[0])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) >= 1 and frames[0].shape[:2] == (64, 64)
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000003")


def _sampling_worker(rank, world, shards, run_dir):
    from sora_dist.config import JobConfig
    from sora_dist.training.trainer import Trainer

    cfg = JobConfig()
    cfg.data.source, cfg.data.shards, cfg.data.batch_size = "shards", shards, 1
    cfg.parallel.cp = world  # a process group exists: sampling must not join it
    cfg.train.run_dir, cfg.train.steps, cfg.train.ckpt_every = run_dir, 2, 0
    cfg.logging.wandb_mode, cfg.logging.sample_every, cfg.logging.sample_steps = "offline", 2, 2
    cfg.logging.sample_num_frames = 5
    tr = Trainer(cfg)
    tr.train()
    tr.close()
    return True


def test_training_logs_sample_videos_to_wandb(tmp_path):
    """logging.sample_every in a 2-rank run: rank 0 samples the fixed prompts in a separate
    process from the new checkpoint; the mp4s land in run_dir/samples and in the wandb run."""
    from sora_dist.testing import run_distributed

    shards = run_demo(str(tmp_path / "demo"), n_clips=3, ranks=1, images=0)
    assert run_distributed(_sampling_worker, 2, shards, str(tmp_path / "run"))
    out = tmp_path / "run" / "samples" / "step_00000002"
    assert {"sample_000.mp4", "samples.jsonl"} <= set(os.listdir(out))
    media = [f for _, _, fs in os.walk(tmp_path / "run" / "wandb") for f in fs if f.endswith(".mp4")]
    assert media, "no video in the wandb run"

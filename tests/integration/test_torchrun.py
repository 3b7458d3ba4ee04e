"""The README's multi-process command: torchrun launching the Hydra CLI (TP2) gives the same
loss sequence as the one-process run."""
import json
import os
import subprocess
import sys


def _run(cmd, tmp_path):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def test_torchrun_tp2_matches_one_process(tmp_path):
    args = ["-m", "sora_dist.train.cli", "train.steps=3", "logging.wandb_mode=disabled"]
    from sora_dist.parallel.spawn import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    _run(torchrun + args + ["parallel.tp=2", f"train.run_dir={tmp_path}/tp2"], tmp_path)
    _run([sys.executable] + args + [f"train.run_dir={tmp_path}/one"], tmp_path)
    tp2 = json.load(open(tmp_path / "tp2" / "losses.json"))
    one = json.load(open(tmp_path / "one" / "losses.json"))
    assert len(tp2) == 3 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(tp2, one))
    assert sorted(os.listdir(tmp_path / "tp2" / ".hydra")) == ["rank0", "rank1"]  # no shared writes

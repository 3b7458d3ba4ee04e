import json
import os
import subprocess
import sys

import pytest
import torch

from sora_dist.config import JobConfig
from sora_dist.training import checkpoint as ckpt
from sora_dist.training.trainer import NonFiniteLossError, Trainer

from trainer_runs import run_trainer


def make_cfg(run_dir, steps=6, **train):
    cfg = JobConfig()
    cfg.train.run_dir = str(run_dir)
    cfg.train.steps = steps
    cfg.train.ckpt_every = 3
    cfg.train.ckpt_keep = 2
    cfg.optim.warmup_steps = 2
    cfg.model.dropout = 0.1  # dropout masks must be a function of (seed, step, dp rank)
    cfg.logging.wandb_mode = "disabled"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


run = run_trainer


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_resume_continues_exact_loss_sequence(tmp_path, objective):
    cfg_a = make_cfg(tmp_path / "a")
    cfg_b = make_cfg(tmp_path / "b")
    for c in (cfg_a, cfg_b):
        c.diffusion.objective = objective
        c.diffusion.sampler = "ddpm" if objective == "ddpm" else "euler"
    full, tr_a = run(cfg_a)
    first, _ = run(cfg_b, stop_at=3)            # "killed" after the step-3 checkpoint
    second, tr_b = run(cfg_b)                    # new process state, resumes at step 3
    assert len(full) == 6 and len(first) == 3 and len(second) == 3
    assert first + second == full                # bit-for-bit, not approximately
    for (n, p), (_, q) in zip(tr_a.model.named_parameters(), tr_b.model.named_parameters()):
        assert torch.equal(p, q), n
    for k in tr_a.ema.shadow:
        assert torch.equal(tr_a.ema.shadow[k], tr_b.ema.shadow[k]), k


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    cfg = make_cfg(tmp_path, steps=9)
    run(cfg)
    root = tmp_path / "checkpoints"
    # keep=2 of steps 3, 6, 9
    assert sorted(os.listdir(root)) == ["step_00000006", "step_00000009"]
    assert json.loads((root / "step_00000009" / ckpt.MARKER).read_text())["step"] == 9
    # A half-written save (killed before the rename) is never picked up.
    (root / "step_00000012.tmp").mkdir()
    # A folder without the marker is not complete either.
    (root / "step_00000015").mkdir()
    assert ckpt.latest(str(root))[0] == 9
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load(str(root / "step_00000015"), torch.nn.Linear(1, 1))


def test_corrupt_checkpoint_names_the_file(tmp_path):
    cfg = make_cfg(tmp_path, steps=3)
    run(cfg)
    path = tmp_path / "checkpoints" / "step_00000003"
    for f in path.iterdir():
        if f.suffix == ".distcp":
            f.write_bytes(f.read_bytes()[:50])  # truncate every shard
    with pytest.raises(ckpt.CheckpointError, match="step_00000003"):
        Trainer(make_cfg(tmp_path, steps=6))


def test_damaged_rank_state_names_the_folder(tmp_path):
    cfg = make_cfg(tmp_path, steps=3)
    run(cfg)
    (tmp_path / "checkpoints" / "step_00000003" / "rank_state" / "rank00000.json").write_text("{trunc")
    with pytest.raises(ckpt.CheckpointError, match="rank_state is unreadable.*delete this step folder"):
        Trainer(make_cfg(tmp_path, steps=6))


def test_nonfinite_loss_is_skipped_then_stops(tmp_path):
    cfg = make_cfg(tmp_path, steps=6, max_nonfinite_streak=2)
    cfg.optim.lr = 1e30  # blows the weights up after the first update
    cfg.optim.grad_clip = 0.0
    tr = Trainer(cfg)
    with pytest.raises(NonFiniteLossError, match="consecutive non-finite"):
        tr.train()
    assert tr.skipped == 2


def test_run_dir_has_resolved_config_and_wandb(tmp_path):
    cfg = make_cfg(tmp_path, steps=2)
    cfg.logging.wandb_mode = "offline"
    run(cfg)
    text = (tmp_path / "config.yaml").read_text()
    assert "flavor: tiny" in text and "steps: 2" in text
    assert (tmp_path / "wandb").is_dir() and any((tmp_path / "wandb").iterdir())


def test_cli_runs_and_rejects_bad_config(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled")
    ok = subprocess.run([sys.executable, "-m", "sora_dist.train", f"train.run_dir={tmp_path}",
                         "train.steps=2", "logging.wandb_mode=disabled"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "step      2/2" in ok.stderr + ok.stdout
    bad = subprocess.run([sys.executable, "-m", "sora_dist.train", f"train.run_dir={tmp_path}/x",
                          "model.num_heads=5"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0
    assert "model.hidden_size=64 is not divisible by model.num_heads=5" in bad.stderr
    assert not os.path.exists(f"{tmp_path}/x/checkpoints")  # failed before any work


def test_cli_rejects_missing_shards_before_any_work(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled")
    bad = subprocess.run([sys.executable, "-m", "sora_dist.train", "data.source=shards",
                          "data.shards=/nonexistent", f"train.run_dir={tmp_path}/x",
                          "logging.wandb_mode=disabled"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert lines == ["config error: data.shards='/nonexistent': no such folder; point data.shards at "
                     "the folder sora-encode wrote (its encode.out_dir), or run sora-encode to write it "
                     "there"], bad.stderr
    assert not os.path.exists(f"{tmp_path}/x/checkpoints")  # failed before any work


def _params(tr) -> dict:
    from sora_dist.training.optim import named_params

    return {n: p.detach().clone() for n, p in named_params(tr.model).items()}


def test_resume_across_recompute_settings_keeps_ema(tmp_path):
    # Activation checkpointing wraps blocks; EMA and checkpoint keys must not depend on it, and
    # the EMA values saved under recompute must be the ones the resumed run continues from.
    # zero_init=False: every block weight gets a gradient from step 1; ema_decay=0.5 so the EMA
    # is far from both the init and the current weights (a lost EMA update or a reset EMA shows).
    def cfg(root, **train):
        c = make_cfg(root, ema_decay=0.5, **train)
        c.model.zero_init = False
        return c

    full, tr_a = run(cfg(tmp_path / "a"))
    first, _ = run(cfg(tmp_path / "b", activation_checkpointing="full"), stop_at=3)
    second, tr = run(cfg(tmp_path / "b"))  # resumed without recompute
    assert first + second == full
    assert set(tr.ema.shadow) == {n for n, _ in tr.model.named_parameters()}
    # Bit-exact, like the loss sequence: recompute replays the same ops (and dropout masks).
    pa, pb = _params(tr_a), _params(tr)
    assert set(pa) == set(pb) == set(tr_a.ema.shadow)
    assert not [n for n in pa if not torch.equal(pa[n], pb[n])], "final params differ"
    assert not [k for k in tr_a.ema.shadow if not torch.equal(tr_a.ema.shadow[k], tr.ema.shadow[k])], \
        "EMA differs from the uninterrupted run"
    # The EMA is not just a copy of the weights (so the comparison above is of the EMA itself).
    assert any(not torch.equal(tr.ema.shadow[n], pb[n].float()) for n in pb)


def test_compiled_blocks_with_checkpointing_train_like_eager(tmp_path):
    """train.compile with full and op-level recompute (the trainer's order: checkpoint, then
    compile each block) gives the eager run's losses and final weights. zero_init=False so the
    blocks shape the output from step 1 (with adaLN-Zero the first losses hardly depend on them);
    4 steps so later losses depend on earlier updates of every block weight."""
    def cfg(name, ac="none", comp=False):
        c = make_cfg(tmp_path / name, steps=4, activation_checkpointing=ac, compile=comp)
        c.model.dropout = 0.0
        c.model.zero_init = False
        # Bucket batches: in 4 steps of the default packs no caption happens to be dropped, so
        # null_text would not train (compiled packs: tests/unit/test_packing_model.py).
        c.data.packing = False
        return c

    tr = Trainer(cfg("init"))  # same seed: the weights before any step
    init = _params(tr)
    tr.close()
    losses, params = {}, {}
    for name, ac, comp in (("eager", "none", False), ("full", "full", True), ("op", "op", True)):
        losses[name], tr = run(cfg(name, ac, comp))
        params[name] = _params(tr)
    eager = params["eager"]
    moved = {n: (eager[n] - init[n]).norm().item() for n in eager}
    assert all(m > 0 for m in moved.values()), ("a weight never trained: the comparison is vacuous", [n for n, m in moved.items() if m == 0])
    for name in ("full", "op"):
        assert len(losses[name]) == 4
        assert losses[name] == pytest.approx(losses["eager"], rel=1e-5), (name, losses)
        assert set(params[name]) == set(eager)
        # Compiled kernels may reorder float sums: allow 1e-4 of how far each weight moved
        # (measured: at most 9.5e-6 of it; a compiled-only change of one k-norm fails the losses).
        bad = {n: ((params[name][n] - eager[n]).norm().item(), moved[n]) for n in eager
               if not (params[name][n] - eager[n]).norm().item() <= 1e-4 * moved[n]}
        assert not bad, (name, bad)

"""train.async_checkpoint: the background write saves exactly what a synchronous save does (the
state is staged before the next optimizer step changes it), and resumes continue bit for bit,
in one process and under a 2-rank FSDP layout. Kill and preemption cases are in
test_faults.py and test_preemption.py."""
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from sora_dist.config import JobConfig
from sora_dist.testing import run_distributed
from sora_dist.training import checkpoint as ckpt

from trainer_runs import run_trainer


def make_cfg(run_dir, async_checkpoint, steps=6, **parallel):
    cfg = JobConfig()
    cfg.train.run_dir, cfg.train.steps, cfg.train.ckpt_every = str(run_dir), steps, 2
    cfg.train.ckpt_keep = 5
    cfg.train.async_checkpoint = async_checkpoint
    cfg.model.zero_init = False  # every weight shapes the loss
    cfg.model.dropout = 0.1
    cfg.optim.lr = 1e-3
    cfg.logging.wandb_mode = "disabled"
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def run(cfg, stop_at=None):
    return run_trainer(cfg, stop_at)[0]


def saved_tensors(path) -> dict:
    """Every tensor of a checkpoint (model, optimizer, EMA), read back in one process."""
    out = str(path) + ".pt"
    dcp_to_torch_save(str(path), out)
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, torch.Tensor):
            flat[prefix] = x

    walk("", torch.load(out, weights_only=True))
    return flat


def test_async_saves_what_sync_saves_and_resumes_exactly(tmp_path):
    sync = run(make_cfg(tmp_path / "sync", False))
    full = run(make_cfg(tmp_path / "async", True))
    assert full == sync
    for step in (2, 4, 6):  # each checkpoint holds the state of its own step, bit for bit
        a = saved_tensors(ckpt.step_dir(str(tmp_path / "async" / "checkpoints"), step))
        s = saved_tensors(ckpt.step_dir(str(tmp_path / "sync" / "checkpoints"), step))
        assert a.keys() == s.keys() and len(a) > 20
        assert all(torch.equal(a[k], s[k]) for k in s), [k for k in s if not torch.equal(a[k], s[k])]
    # Stopped after step 3 (the step-2 save was in flight, then finished at the end), resumed.
    first = run(make_cfg(tmp_path / "resumed", True), stop_at=3)
    second = run(make_cfg(tmp_path / "resumed", True))
    assert len(first) == 3 and len(second) == 4  # resumed from step 2
    assert first[:2] + second == sync


def _worker(rank, world, run_dir, async_checkpoint, stop_at):
    return run(make_cfg(run_dir, async_checkpoint, dp=2), stop_at)


def test_async_checkpoint_under_fsdp_resumes_exactly(tmp_path):
    """2 ranks, FSDP-sharded state: the background writer's own process group and the marker
    written after both ranks finished; the resumed run continues the synchronous run's losses."""
    sync = run_distributed(_worker, 2, str(tmp_path / "sync"), False, None)
    first = run_distributed(_worker, 2, str(tmp_path / "async"), True, 5)  # last save: step 4
    second = run_distributed(_worker, 2, str(tmp_path / "async"), True, None)
    assert first[:4] + second == sync

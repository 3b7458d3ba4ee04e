"""The real trainer under parallel layouts vs one process: same loss sequence; a checkpoint
saved under one layout resumes under another and continues the same sequence."""
import pytest

from sora_dist.config import JobConfig
from sora_dist.parallel.spawn import run_distributed
from sora_dist.train.trainer import Trainer

STEPS = 4


def make_cfg(run_dir, **parallel):
    cfg = JobConfig()
    cfg.train.run_dir = str(run_dir)
    cfg.train.steps = STEPS
    cfg.train.ckpt_every = 2
    cfg.logging.wandb_mode = "disabled"
    cfg.data.synthetic_buckets = [[3, 7, 9], [2, 6, 10]]  # odd shapes: padding in every layout
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def train(cfg, stop_at=None):
    tr = Trainer(cfg)
    try:
        return tr.train(stop_at=stop_at)
    finally:
        tr.close()


def _worker(rank, world, run_dir, parallel, stop_at):
    return train(make_cfg(run_dir, **parallel), stop_at)


def close(a, b, rel=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


@pytest.mark.parametrize("world, parallel", [
    (2, {"tp": 2, "sequence_parallel": True}),
    (2, {"cp": 2, "cp_mode": "ring"}),
])
def test_trainer_layout_matches_single_process(tmp_path, world, parallel):
    ref = train(make_cfg(tmp_path / "ref"))
    got = run_distributed(_worker, world, str(tmp_path / "par"), parallel, None)
    close(got, ref)


def test_checkpoint_from_tp2_resumes_in_one_process(tmp_path):
    ref = train(make_cfg(tmp_path / "ref"))
    first = run_distributed(_worker, 2, str(tmp_path / "run"), {"tp": 2}, 2)   # saves step 2
    second = train(make_cfg(tmp_path / "run"))                                # resumes, tp=1
    close(first + second, ref)


def test_dp2_checkpoint_resumes_in_one_process_with_the_data_stream_carried_over(tmp_path):
    """A DP size change continues the data stream instead of restarting it: the synthetic
    stream exactly at the next global sample (the shard loader at shard granularity, see
    tests/unit/test_loader.py)."""
    run_distributed(_worker, 2, str(tmp_path / "run"), {"dp": 2}, 2)  # saves step 2
    cfg = make_cfg(tmp_path / "run")
    tr = Trainer(cfg)  # resumes with dp=1
    try:
        assert tr.step == 2
        ids = next(tr.loader)["ids"]
    finally:
        tr.close()
    B = cfg.data.batch_size
    assert ids == list(range(2 * B * 2, 2 * B * 2 + B))


@pytest.mark.parametrize("parallel", [
    {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2},
    {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 2, "pp_virtual_stages": 2},
])
def test_trainer_pipeline_matches_single_process(tmp_path, parallel):
    def cfg_depth(run_dir, **par):
        c = make_cfg(run_dir, **par)
        c.model.depth = 4
        return c
    ref_tr = Trainer(cfg_depth(tmp_path / "ref"))
    ref = ref_tr.train()
    ref_tr.close()
    got = run_distributed(_pp_worker, 2, str(tmp_path / "pp"), parallel)
    close(got, ref)


def _pp_worker(rank, world, run_dir, parallel):
    cfg = make_cfg(run_dir, **parallel)
    cfg.model.depth = 4
    return train(cfg)


def _pp_stop_worker(rank, world, run_dir, parallel, stop_at):
    cfg = make_cfg(run_dir, **parallel)
    cfg.model.depth = 4
    return train(cfg, stop_at)


def test_pp2_checkpoint_resumes_in_pp1(tmp_path):
    def cfg4(run_dir):
        c = make_cfg(run_dir)
        c.model.depth = 4
        return c
    ref = train(cfg4(tmp_path / "ref"))
    first = run_distributed(_pp_stop_worker, 2, str(tmp_path / "run"),
                            {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2}, 2)
    second = train(cfg4(tmp_path / "run"))  # one process holds every stage's FQNs
    close(first + second, ref)


def _meta_worker(rank, world, run_dir):
    import torch.distributed as dist

    cfg = make_cfg(run_dir, tp=2)
    cfg.train.meta_init = True
    tr = Trainer(cfg)
    on_meta = any(p.is_meta for p in tr.model.parameters())
    losses = tr.train()
    tr.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    return {"losses": losses, "same_on_all_ranks": all(g == losses for g in gathered), "on_meta": on_meta}


def test_meta_init_trains_without_a_full_model_copy(tmp_path):
    out = run_distributed(_meta_worker, 2, str(tmp_path / "meta"))
    assert not out["on_meta"] and out["same_on_all_ranks"]
    assert all(x == x and x < 10 for x in out["losses"])  # finite


def _meta_pp_worker(rank, world, run_dir, parallel, fp8):
    cfg = make_cfg(run_dir, **parallel)
    cfg.model.depth = 4
    cfg.model.fp8_linears = fp8
    cfg.train.meta_init = True
    tr = Trainer(cfg)
    on_meta = any(p.is_meta for p in tr.model.parameters())
    final_zero = all(float(p.abs().sum()) == 0 for n, p in tr.model.named_parameters()
                     if n.startswith("final_layer."))
    losses = tr.train()
    tr.close()
    return {"losses": losses, "on_meta": on_meta, "final_zero": final_zero}


@pytest.mark.parametrize("parallel, fp8", [
    ({"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2}, "none"),
    ({"pp": 2, "pp_schedule": "zbv", "pp_microbatches": 2, "tp": 2}, "torchao"),
])
def test_meta_init_with_pipeline_stages(tmp_path, parallel, fp8):
    """Each PP rank allocates and initialises only its stages (torchao FP8 linears converted
    on the meta device). adaLN-Zero makes the first output exactly zero whatever the other
    weights, so step 0's loss equals the eager run's."""
    def cfg4(run_dir):
        c = make_cfg(run_dir)
        c.model.depth = 4
        return c
    ref = train(cfg4(tmp_path / "ref"))
    world = 2 * parallel.get("tp", 1)
    out = run_distributed(_meta_pp_worker, world, str(tmp_path / "meta"), parallel, fp8)
    assert not out["on_meta"] and out["final_zero"]
    close(out["losses"][:1], ref[:1])
    assert all(x == x and x < 10 for x in out["losses"])  # finite

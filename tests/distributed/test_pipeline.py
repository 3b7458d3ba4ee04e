"""Pipeline parallel vs the single-process run: loss and every gradient within 1e-5 relative."""
import pytest
import torch
import torch.distributed as dist

from sora_dist.config import ModelConfig, ParallelConfig
from sora_dist.models import build_model
from sora_dist.diffusion.base import Objective
from sora_dist.parallel.dims import ParallelDims
from sora_dist.parallel.pipeline import PipelineRunner, split_blocks, stage_ids_for_rank
from sora_dist.testing import run_distributed

DEPTH = 4


SHAPES = [(3, 7, 9), (2, 6, 10)]  # bucketed batches: the schedule is rebuilt per shape


def make_model_and_batch(thw=SHAPES[-1], wan=False):
    """wan: a WanDiT with per-frame timesteps (TI2V: first frame t=0): the per-frame conditioning
    table crosses stages and each stage rebuilds its token rows."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(depth=DEPTH, arch="wan", ffn_dim=64) if wan else ModelConfig(depth=DEPTH))
    m.init_weights(zero_init=False)
    g = torch.Generator().manual_seed(1)
    B = 4
    x_t = torch.randn(B, 4, *thw, generator=g)           # odd shapes: patch padding
    t = torch.randint(0, 1000, (B,), generator=g).float()
    if wan:
        t = t[:, None].repeat(1, thw[0])
        t[:, 0] = 0
    text = torch.randn(B, 6, 32, generator=g)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[1, 3:] = False
    drop = torch.tensor([False, True, False, False])
    target = torch.randn(B, 4, *thw, generator=g)
    return m, (x_t, t, text, mask, drop, target)


def reference(wan=False):
    m, (x_t, t, text, mask, drop, target) = make_model_and_batch(wan=wan)
    loss = torch.nn.functional.mse_loss(m(x_t, t, text, mask, drop), target)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}


def _pp_worker(rank, world, schedule, virtual, microbatches):
    pdims = ParallelDims.from_config(ParallelConfig(pp=world, pp_schedule=schedule, pp_virtual_stages=virtual), world)
    meshes = pdims.build_mesh("cpu")
    m, _ = make_model_and_batch()
    runner = PipelineRunner(m, meshes["pp"], torch.device("cpu"), schedule, microbatches, virtual,
                            Objective.loss)
    runner.MAX_SCHEDULES = 1  # each shape change drops the other shape's schedule and rebuilds
    for thw in SHAPES + SHAPES:  # the last shape's grads (its second schedule) are compared
        m.zero_grad(set_to_none=True)
        loss = runner.step(*make_model_and_batch(thw)[1])
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    owned = sorted(n for n, _ in m.named_parameters())
    all_grads = [None] * world
    dist.all_gather_object(all_grads, grads)
    merged = {k: v for g in all_grads for k, v in g.items()}
    all_owned = [None] * world
    dist.all_gather_object(all_owned, owned)
    return {"loss": float(loss), "grads": merged, "owned": all_owned}


def check_against_reference(outs, wan=False):
    """outs: every rank's result (run_distributed(..., all_ranks=True)); each rank's loss and
    its copy of the gathered grads must match the single-process run."""
    ref_loss, ref_grads = reference(wan)
    for rank, out in enumerate(outs):
        assert abs(out["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (rank, out["loss"], ref_loss)
        owned = [n for o in out["owned"] for n in o]
        assert sorted(owned) == sorted(ref_grads), rank  # every param on exactly one PP rank
        for n, g in ref_grads.items():
            got = out["grads"][n]
            assert (got - g).norm() <= 1e-5 * g.norm() + 1e-12, (rank, n)


def test_split_and_stage_assignment():
    assert split_blocks(7, 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert stage_ids_for_rank(0, 2, 2, "interleaved_1f1b") == [0, 2]
    assert stage_ids_for_rank(0, 2, 2, "zbv") == [0, 3]


@pytest.mark.parametrize("schedule, virtual", [("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2), ("zbv", 2)])
def test_pp2_matches_single_process(schedule, virtual):
    check_against_reference(run_distributed(_pp_worker, 2, schedule, virtual, 2, all_ranks=True))


def _pp_composed_worker(rank, world, parallel, schedule, virtual, wan=False):
    from torch.distributed.tensor import DTensor

    from sora_dist.config import JobConfig
    from sora_dist.parallel.parallelize import parallelize_dit

    cfg = JobConfig()
    cfg.model.depth = DEPTH
    if wan:
        cfg.model.arch, cfg.model.ffn_dim = "wan", 64
    for k, v in dict(parallel, pp_schedule=schedule, pp_virtual_stages=virtual, pp_microbatches=2).items():
        setattr(cfg.train if k == "activation_checkpointing" else cfg.parallel, k, v)
    pdims = ParallelDims.from_config(cfg.parallel, world)
    meshes = pdims.build_mesh("cpu")
    dp_rank = pdims.coords(rank)["dp"]
    m, batch = make_model_and_batch(wan=wan)
    B = batch[0].shape[0] // pdims.dp
    local = [x[dp_rank * B:(dp_rank + 1) * B] for x in batch]  # this DP rank's share
    runner = PipelineRunner(m, meshes["pp"], torch.device("cpu"), schedule, 2, virtual, Objective.loss,
                            stage_wrapper=lambda st: parallelize_dit(st, pdims, cfg))
    loss = runner.step(*local)
    for part in runner.parts:
        part.finalize_grads()
    grads = {}
    for n, p in sorted(m.named_parameters()):
        g = p.grad
        grads[n] = (g.full_tensor() if isinstance(g, DTensor) else g).clone()
    loss_t = loss.detach().clone()
    dist.all_reduce(loss_t, group=meshes["dp"].get_group())
    all_grads = [None] * world
    dist.all_gather_object(all_grads, grads)
    return {"loss": float(loss_t) / pdims.dp, "grads": {k: v for g in all_grads for k, v in g.items()},
            "owned": [sorted(g) for g in all_grads]}


@pytest.mark.parametrize("world, parallel, schedule, virtual", [
    (4, {"pp": 2, "dp": 2}, "1f1b", 1),
    (4, {"pp": 2, "tp": 2}, "interleaved_1f1b", 2),
    (4, {"pp": 2, "cp": 2, "cp_mode": "ring"}, "zbv", 2),
    (4, {"pp": 2, "tp": 2, "activation_checkpointing": "op"}, "1f1b", 1),
    (8, {"pp": 2, "tp": 2, "dp": 2}, "1f1b", 1),
])
def test_pp_composed_with_tp_and_fsdp_matches_single_process(world, parallel, schedule, virtual):
    outs = run_distributed(_pp_composed_worker, world, parallel, schedule, virtual, all_ranks=True)
    for out in outs:
        out["owned"] = [sorted(set(n for o in out["owned"] for n in o))]
    check_against_reference(outs)


def test_bubble_benchmark_replays_textbook_figures():
    from sora_dist.parallel.bubble import schedule_bubbles

    for res in run_distributed(schedule_bubbles, 2, 4, all_ranks=True):  # each rank's replay
        assert abs(res["1f1b"][0] - 1 / 5) < 1e-9            # (p-1)/(m+p-1)
        assert abs(res["interleaved_1f1b"][0] - 1 / 9) < 1e-9  # (p-1)/(v*m+p-1)
        assert res["zbv"][0] < res["interleaved_1f1b"][0] < res["1f1b"][0]


@pytest.mark.parametrize("world, parallel, schedule, virtual", [
    (2, {"pp": 2}, "interleaved_1f1b", 2),
    (4, {"pp": 2, "tp": 2, "sequence_parallel": True}, "1f1b", 1),
])
def test_pp_wan_per_frame_timesteps_match_single_process(world, parallel, schedule, virtual):
    outs = run_distributed(_pp_composed_worker, world, parallel, schedule, virtual, True, all_ranks=True)
    for out in outs:
        out["owned"] = [sorted(set(n for o in out["owned"] for n in o))]
    check_against_reference(outs, wan=True)

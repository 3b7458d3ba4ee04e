"""A packed sequence (mixed image/clip sizes, one per DP rank) under every parallel layout
against the one-process packed result: loss and every gradient within 1e-5 relative.
The pack's length is odd, so CP/SP pad it (padding belongs to no sample); CP shard boundaries
cut samples, so ring blocks mix samples and some blocks are skipped. Under pipeline stages the
pack's samples are dealt to the microbatches, padded to one shape (tokens of no sample, and
samples of no tokens)."""
import pytest
import torch
import torch.distributed as dist

from sora_dist.config import JobConfig
from sora_dist.config.model import DiTArgs
from sora_dist.models import model_class
from sora_dist.models.packing import pack_latents, pack_targets, packed_loss
from sora_dist.parallel.dims import ParallelDims
from sora_dist.testing import run_distributed
from sora_dist.training.optim import clean_fqn

pytestmark = pytest.mark.distributed

ARGS = {
    "dit": dict(hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0, in_channels=4, text_dim=16),
    "wan": dict(arch="wan", hidden_size=32, depth=2, num_heads=4, ffn_dim=48, in_channels=4, text_dim=16),
}
# Per DP rank: an image, clips of several lengths and aspect ratios; 87 and 69 tokens (odd).
SHAPES = [[(1, 8, 8), (3, 4, 6), (2, 6, 4), (5, 2, 2), (1, 2, 10), (7, 2, 2)],
          [(2, 4, 4), (1, 6, 10), (4, 2, 6), (1, 4, 2), (3, 2, 2)]]


def make_pack(a: DiTArgs, dp_rank: int):
    g = torch.Generator().manual_seed(10 + dp_rank)
    shapes = SHAPES[dp_rank]
    K, L = len(shapes), 5
    xs = [torch.randn(a.in_channels, *s, generator=g) for s in shapes]
    ys = [torch.randn(a.in_channels, *s, generator=g) for s in shapes]
    x, grids = pack_latents(xs, a.patch_size)
    t = torch.rand(K, generator=g) * 1000
    text = torch.randn(K, L, a.text_dim, generator=g)
    mask = torch.arange(L)[None] < torch.randint(1, L + 1, (K, 1), generator=g)
    drop = torch.zeros(K, dtype=torch.bool)
    drop[1] = True
    return (x, t, text, mask, drop, grids), pack_targets(ys, a.patch_size)


def build(a: DiTArgs):
    torch.manual_seed(0)
    m = model_class(a)(a)
    m.init_weights(zero_init=False)
    return m


def no_device_reads():
    """Packed attention must take the runs its Conditioning carries: make reading them back from
    the sample ids (doc_runs, a host sync per call on GPU) fail. Returns the real doc_runs."""
    import sora_dist.models.attention as attention

    def no_device_read(doc_S):
        raise AssertionError("doc_runs(doc_S) called in a packed forward/backward")

    real, attention.doc_runs = attention.doc_runs, no_device_read
    return real


def spy_conds(model) -> list:
    """The Conditioning each forward's embed() hands the blocks (after sequence sharding)."""
    seen, embed = [], model.embed

    def spy(*args, **kwargs):
        tokens, cond = embed(*args, **kwargs)
        seen.append(cond)
        return tokens, cond

    model.embed = spy
    return seen


def check_runs(cond, pdims, meshes, doc_runs):
    """A rank's sharded Conditioning: doc_runs are its chunk's ids' runs, cp_doc_runs those of
    the ids gathered over the CP group (what self-attention spans)."""
    from sora_dist.parallel.context_parallel.comm import gather_along

    whole = gather_along(cond.doc_S, 0, meshes["cp"].get_group()) if pdims.cp > 1 else cond.doc_S
    assert cond.doc_runs == doc_runs(cond.doc_S), (cond.doc_runs, doc_runs(cond.doc_S))
    assert cond.cp_doc_runs == doc_runs(whole), (cond.cp_doc_runs, doc_runs(whole))


def worker(rank, world, arch, layout):
    from sora_dist.parallel.parallelize import parallelize_dit

    doc_runs = no_device_reads()
    a = DiTArgs(**ARGS[arch])
    cfg = JobConfig()
    cfg.train.mixed_precision = "fp32"
    for k, v in layout.items():
        setattr(cfg.train if k == "activation_checkpointing" else cfg.parallel, k, v)
    pdims = ParallelDims.from_config(cfg.parallel, world)
    ref = build(a)
    losses = []
    for d in range(pdims.dp):
        inputs, target = make_pack(a, d)
        losses.append(packed_loss(ref(*inputs), target))
    ref_loss = torch.stack(losses).mean()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    meshes = pdims.build_mesh("cpu")
    part = parallelize_dit(build(a), pdims, cfg)
    dp_rank = pdims.coords(rank)["dp"]
    inputs, target = make_pack(a, dp_rank)
    conds = spy_conds(part.module)
    loss = packed_loss(part.module(*inputs), target)
    check_runs(conds[0], pdims, meshes, doc_runs)
    loss.backward()
    part.finalize_grads()
    g_loss = loss.detach().clone()
    if pdims.dp > 1:
        dist.all_reduce(g_loss, group=meshes["dp"].get_group())
        g_loss /= pdims.dp
    errs = {}
    for n, p in part.module.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        r = ref_grads[clean_fqn(n)]
        errs[clean_fqn(n)] = ((g - r).norm() / r.norm()).item()
    return {"loss": g_loss.item(), "ref": ref_loss.item(), "errs": errs, "n": len(ref_grads)}


LAYOUTS = {
    "cp2_ring": (2, dict(cp=2, cp_mode="ring")),
    "cp2_ulysses": (2, dict(cp=2, cp_mode="ulysses")),
    "cp4_hybrid": (4, dict(cp=4, cp_mode="hybrid", ulysses_degree=2)),
    "tp2_sp": (2, dict(tp=2, sequence_parallel=True)),
    "dp2_fsdp": (2, dict(fsdp=True)),
    "tp2_sp_cp2_ring_op_ac": (4, dict(tp=2, sequence_parallel=True, cp=2, cp_mode="ring",
                                      activation_checkpointing="op")),
}


# WanDiT's packed path differs from VideoDiT's only in the block; two of its layouts run by
# default, the others under `pytest -m slow`.
CASES = [("dit", n) for n in LAYOUTS] + [
    ("wan", n) if n in ("cp2_ring", "tp2_sp") else pytest.param("wan", n, marks=pytest.mark.slow) for n in LAYOUTS]


@pytest.mark.parametrize("arch, name", CASES)
def test_packed_layout_matches_one_process(arch, name):
    world, layout = LAYOUTS[name]
    for rank, r in enumerate(run_distributed(worker, world, arch, layout, all_ranks=True)):
        assert abs(r["loss"] - r["ref"]) <= 1e-5 * r["ref"], (rank, r["loss"], r["ref"])
        assert len(r["errs"]) == r["n"]
        bad = {n: e for n, e in r["errs"].items() if not e <= 1e-5}
        assert not bad, f"{arch} {name} rank {rank}: {bad}"


# ---- pipeline stages: the pack's samples dealt to the microbatches (models/packing.py:split_pack)

def pp_worker(rank, world, arch, layout, schedule, virtual, microbatches):
    """The layout with pp=2 (4 blocks) against one process: each DP rank's pack through the
    schedule, every stage's gradient gathered from the PP ranks."""
    from torch.distributed.tensor import DTensor

    from sora_dist.diffusion.base import Objective
    from sora_dist.parallel.parallelize import parallelize_dit
    from sora_dist.parallel.pipeline import PipelineRunner

    no_device_reads()
    a = DiTArgs(**dict(ARGS[arch], depth=4))
    cfg = JobConfig()
    cfg.train.mixed_precision = "fp32"
    for k, v in dict(layout, pp=2, pp_schedule=schedule, pp_virtual_stages=virtual,
                     pp_microbatches=microbatches).items():
        setattr(cfg.parallel, k, v)
    pdims = ParallelDims.from_config(cfg.parallel, world)
    ref = build(a)
    ref_loss = torch.stack([packed_loss(ref(*inputs), target)
                            for inputs, target in (make_pack(a, d) for d in range(pdims.dp))]).mean()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    meshes = pdims.build_mesh("cpu")
    model = build(a)
    runner = PipelineRunner(model, meshes["pp"], torch.device("cpu"), schedule, microbatches, virtual,
                            Objective.loss, stage_wrapper=lambda st: parallelize_dit(st, pdims, cfg))
    (x, t, text, mask, drop, grids), target = make_pack(a, pdims.coords(rank)["dp"])
    loss = runner.step(x, t, text, mask, drop, target, grids)
    for part in runner.parts:
        part.finalize_grads()
    if pdims.dp > 1:
        dist.all_reduce(loss, group=meshes["dp"].get_group())
        loss /= pdims.dp
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[clean_fqn(n)] = g.clone()
    every = [None] * world
    dist.all_gather_object(every, grads)
    merged = {n: g for d in every for n, g in d.items()}
    errs = {n: ((merged[n] - r).norm() / r.norm()).item() for n, r in ref_grads.items() if n in merged}
    return {"loss": loss.item(), "ref": ref_loss.item(), "errs": errs, "n": len(ref_grads)}


PP_LAYOUTS = {
    "pp2_1f1b": (2, {}, "1f1b", 1, 2),
    "pp2_gpipe_3mb": (2, {}, "gpipe", 1, 3),  # 3 microbatches: the loss scale is not a power of 2
    "pp2_interleaved": (2, {}, "interleaved_1f1b", 2, 2),
    "pp2_zbv": (2, {}, "zbv", 2, 2),  # zero bubble: stage outputs are detached in place
    "pp2_tp2_sp": (4, dict(tp=2, sequence_parallel=True), "1f1b", 1, 2),
    "pp2_cp2_ring": (4, dict(cp=2, cp_mode="ring"), "1f1b", 1, 2),
    "pp2_dp2_fsdp": (4, dict(fsdp=True), "1f1b", 1, 2),
}
PP_CASES = [("dit", n) if n in ("pp2_1f1b", "pp2_gpipe_3mb", "pp2_zbv", "pp2_tp2_sp")
            else pytest.param("dit", n, marks=pytest.mark.slow) for n in PP_LAYOUTS] + [
    ("wan", n) if n == "pp2_1f1b" else pytest.param("wan", n, marks=pytest.mark.slow) for n in PP_LAYOUTS]


@pytest.mark.parametrize("arch, name", PP_CASES)
def test_packed_pipeline_matches_one_process(arch, name):
    world, layout, schedule, virtual, microbatches = PP_LAYOUTS[name]
    for rank, r in enumerate(run_distributed(pp_worker, world, arch, layout, schedule, virtual, microbatches,
                                             all_ranks=True)):
        assert abs(r["loss"] - r["ref"]) <= 1e-5 * r["ref"], (rank, r["loss"], r["ref"])
        assert len(r["errs"]) == r["n"]  # every parameter's gradient came from some stage
        bad = {n: e for n, e in r["errs"].items() if not e <= 1e-5}
        assert not bad, f"{arch} {name} rank {rank}: {bad}"


# ---- the packer's balance exchange (data/packing.py PackBalance) -------------------------------
def exchange_worker(rank, world, host_groups):
    import numpy as np

    from sora_dist.parallel.dims import row_exchange
    cfg = JobConfig()
    cfg.parallel.tp, cfg.parallel.dp_shard = 2, 2
    pdims = ParallelDims.from_config(cfg.parallel, world)
    meshes = pdims.build_mesh("cpu")
    if host_groups:  # the path a CUDA mesh takes: gloo groups of DP peers built from coords
        meshes.device_type = "cuda"
    exchange = row_exchange(pdims.dp_host_group())
    got = exchange(np.array([rank, 10.0 * rank, 0.5]))
    return got.tolist(), pdims.local_rank("dp"), pdims.local_rank("tp")


@pytest.mark.parametrize("host_groups", [False, True], ids=["dp_mesh_group", "gloo_groups_from_coords"])
def test_row_exchange_gathers_the_dp_peers_rows_in_dp_order(host_groups):
    """dp2 x tp2: each rank gets the rows of the ranks sharing its TP coordinate, in DP order."""
    res = run_distributed(exchange_worker, 4, host_groups, all_ranks=True)
    for rank, (got, dp, tp) in enumerate(res):
        peers = sorted((d, r) for r, (_, d, t) in enumerate(res) if t == tp)
        assert [d for d, _ in peers] == [0, 1] and dp in (0, 1)
        assert got == [[r, 10.0 * r, 0.5] for _, r in peers]

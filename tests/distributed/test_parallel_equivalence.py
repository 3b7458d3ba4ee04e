"""Every parallel layout gives the single-process loss, gradients and grad norm.

Each rank builds the same tiny VideoDiT (all weights random, so every gradient is non-zero),
computes the single-process reference on the global batch itself, then the parallel run on
its DP slice. Odd latent sizes exercise patch padding and token padding for CP/SP; the text
mask has padding and one caption is dropped.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sora_dist.config import JobConfig
from sora_dist.models import DiTArgs, VideoDiT, model_class
from sora_dist.parallel.dims import ParallelDims
from sora_dist.parallel.grad import clip_grad_norm_
from sora_dist.testing import run_distributed
from sora_dist.training.optim import clean_fqn

from init_rule import init_violations

pytestmark = pytest.mark.distributed

B_LOCAL, SHAPE_THW, TEXT_LEN = 2, (3, 5, 9), 6  # 3x3x5 = 45 tokens: odd, so CP/SP pad


def tiny_args(**kw) -> DiTArgs:
    base = dict(in_channels=4, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0,
                patch_size=(1, 2, 2), text_dim=16, qk_norm=True)
    base.update(kw)
    return DiTArgs(**base)


def make_cfg(**parallel) -> JobConfig:
    cfg = JobConfig()
    cfg.train.mixed_precision = "fp32"
    for k, v in parallel.items():
        if k in ("activation_checkpointing", "compile"):
            setattr(cfg.train, k, v)
        else:
            setattr(cfg.parallel, k, v)
    return cfg


def global_batch(dp: int, args: DiTArgs, seed: int = 7, per_frame_t: bool = False):
    g = torch.Generator().manual_seed(seed)
    n = B_LOCAL * dp
    x = torch.randn(n, args.in_channels, *SHAPE_THW, generator=g)
    target = torch.randn(n, args.in_channels, *SHAPE_THW, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g).float()
    if per_frame_t:  # Wan2.2 TI2V: a clean first frame (t=0), the others at the sample's t
        t = t[:, None].repeat(1, SHAPE_THW[0])
        t[:, 0] = 0
    text = torch.randn(n, TEXT_LEN, args.text_dim, generator=g)
    lens = torch.randint(1, TEXT_LEN + 1, (n,), generator=g)
    text_mask = torch.arange(TEXT_LEN)[None] < lens[:, None]
    drop = torch.zeros(n, dtype=torch.bool)
    drop[1] = True
    return x, t, text, text_mask, drop, target


def build_model(args: DiTArgs) -> VideoDiT:
    torch.manual_seed(0)
    model = model_class(args)(args)
    model.init_weights(zero_init=False)
    return model


def full_grad(p) -> torch.Tensor:
    return p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return ((g - ref).norm() / (ref.norm() + 1e-30)).item()


def equivalence_worker(rank: int, world: int, layout: dict, args_kw: dict) -> dict:
    from sora_dist.parallel.parallelize import parallelize_dit

    args_kw = dict(args_kw)
    per_frame_t = args_kw.pop("per_frame_t", False)
    args = tiny_args(**args_kw)
    cfg = make_cfg(**layout)
    pdims = ParallelDims.from_config(cfg.parallel, world)
    batch = global_batch(pdims.dp, args, per_frame_t=per_frame_t)

    ref = build_model(args)
    x, t, text, mask, drop, target = batch
    ref_loss = F.mse_loss(ref(x, t, text, mask, drop), target)
    ref_loss.backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    ref_norm = torch.nn.utils.get_total_norm(list(ref_grads.values()))
    zero = [n for n, g in ref_grads.items() if not g.abs().sum() > 0]
    assert not zero, f"reference grads are zero (comparison would be vacuous): {zero}"

    meshes = pdims.build_mesh("cpu")
    part = parallelize_dit(build_model(args), pdims, cfg)
    model = part.module
    dp_rank = pdims.coords(rank)["dp"]
    mine = [v[dp_rank * B_LOCAL:(dp_rank + 1) * B_LOCAL] for v in batch]
    out = model(*mine[:5])
    assert out.shape == mine[5].shape, (out.shape, mine[5].shape)
    loss = F.mse_loss(out, mine[5])
    loss.backward()
    part.finalize_grads()

    global_loss = loss.detach().clone()
    if pdims.dp > 1:
        dist.all_reduce(global_loss, group=meshes["dp"].get_group())
        global_loss /= pdims.dp
    errs = {}
    for name, p in model.named_parameters():
        name = clean_fqn(name)
        errs[name] = rel_err(full_grad(p), ref_grads[name])
    assert set(errs) == set(ref_grads), set(ref_grads) ^ set(errs)
    # Clip to half the norm: checks the norm and the in-place scaling across meshes.
    norm = clip_grad_norm_(model.parameters(), max_norm=0.5 * ref_norm.item())
    coef = 0.5 * ref_norm / (ref_norm + 1e-6)
    clip_errs = {}
    for name, p in model.named_parameters():
        name = clean_fqn(name)
        clip_errs[name] = rel_err(full_grad(p), ref_grads[name] * coef)
    return {"loss": global_loss.item(), "ref_loss": ref_loss.item(), "norm": norm.item(),
            "ref_norm": ref_norm.item(), "grad_errs": errs, "clip_errs": clip_errs}


LAYOUTS = {
    "tp2": (2, dict(tp=2, sequence_parallel=False)),
    "tp2_sp": (2, dict(tp=2, sequence_parallel=True)),
    "dp2_fsdp": (2, dict(fsdp=True)),
    "dp2_nofsdp": (2, dict(fsdp=False)),
    "tp2_sp_ac": (2, dict(tp=2, sequence_parallel=True, activation_checkpointing="full")),
    "tp2_sp_op_ac_fsdp": (4, dict(tp=2, sequence_parallel=True, activation_checkpointing="op")),
    "cp2_ring_op_ac": (2, dict(cp=2, cp_mode="ring", activation_checkpointing="op")),
    "cp2_ulysses": (2, dict(cp=2, cp_mode="ulysses")),
    "cp2_ring": (2, dict(cp=2, cp_mode="ring")),
    "cp2_ulysses_nofsdp": (2, dict(cp=2, cp_mode="ulysses", fsdp=False)),
    "cp4_hybrid": (4, dict(cp=4, cp_mode="hybrid", ulysses_degree=2)),
    "hsdp_2x2": (4, dict(dp_replicate=2, activation_checkpointing="selective")),
    "tp2_dp2_nofsdp": (4, dict(tp=2, sequence_parallel=True, fsdp=False)),
    "hsdp2_cp2_tp2": (8, dict(dp_replicate=2, tp=2, cp=2, cp_mode="ring", sequence_parallel=True)),
    "tp2_cp2_dp2": (8, dict(tp=2, cp=2, cp_mode="ulysses", sequence_parallel=True)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name):
    world, layout = LAYOUTS[name]
    results = run_distributed(equivalence_worker, world, layout, {}, all_ranks=True)
    assert len(results) == world
    for rank, r in enumerate(results):  # every rank's loss, full grads and norm, not just rank 0's
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (rank, r["loss"], r["ref_loss"])
        bad = {n: e for n, e in r["grad_errs"].items() if not e <= 1e-5}
        assert not bad, f"{name}: rank {rank}: grads differ from single process: {bad}"
        assert abs(r["norm"] - r["ref_norm"]) <= 1e-5 * r["ref_norm"], (rank, r["norm"], r["ref_norm"])
        bad = {n: e for n, e in r["clip_errs"].items() if not e <= 1e-5}
        assert not bad, f"{name}: rank {rank}: clipped grads differ from single process: {bad}"


# WanDiT (Wan2.x architecture) through the same engine: its q/k norms span the TP-sharded
# heads, its modulation is a shared projection plus per-block tables, captions are zeroed.
WAN = dict(arch="wan", ffn_dim=48)
WAN_LAYOUTS = ["tp2_sp", "cp2_ring", "cp2_ulysses", "dp2_fsdp", "tp2_sp_op_ac_fsdp", "cp4_hybrid"]
# TI2V-style per-frame timesteps: token rows of the per-frame table follow the CP/SP shards.
WAN_PER_FRAME = ["tp2_cp2_dp2", "tp2_sp_op_ac_fsdp"]


@pytest.mark.parametrize("name, per_frame", [(n, False) for n in WAN_LAYOUTS] + [(n, True) for n in WAN_PER_FRAME])
def test_wan_layout_matches_single_process(name, per_frame):
    world, layout = LAYOUTS[name]
    results = run_distributed(equivalence_worker, world, layout, {**WAN, "per_frame_t": per_frame},
                              all_ranks=True)
    for rank, r in enumerate(results):
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (rank, r["loss"], r["ref_loss"])
        bad = {n: e for n, e in r["grad_errs"].items() if not e <= 1e-5}
        assert not bad, f"wan {name}: rank {rank}: grads differ from single process: {bad}"
        assert "blocks.0.modulation.scale_shift_table" in r["grad_errs"]
        assert abs(r["norm"] - r["ref_norm"]) <= 1e-5 * r["ref_norm"], (rank, r["norm"], r["ref_norm"])


def dropout_worker(rank: int, world: int, layout: dict) -> dict:
    """Dropout on token shards draws from the tracked per-shard stream: recompute under
    activation checkpointing must replay it (same grads as without AC), and TP ranks' masks
    differ (different tokens)."""
    from sora_dist.parallel.parallelize import parallelize_dit

    args = tiny_args(dropout=0.3)
    pdims = ParallelDims.from_config(make_cfg(**layout).parallel, world)
    pdims.build_mesh("cpu")
    x, t, text, mask, drop, target = global_batch(1, args)
    grads, masks = [], []
    for ac in ("none", "full"):
        cfg = make_cfg(activation_checkpointing=ac, **layout)
        model = parallelize_dit(build_model(args), pdims, cfg).module
        seen = []
        hook = model.blocks["0"].mlp.register_forward_hook(lambda m, i, o: seen.append(o.detach() == 0))
        torch.manual_seed(1)
        F.mse_loss(model(x, t, text, mask, drop), target).backward()
        hook.remove()
        grads.append({clean_fqn(n): full_grad(p)
                      for n, p in model.named_parameters()})
        masks.append(seen[0])
    others = [torch.empty_like(masks[0]) for _ in range(world)]
    dist.all_gather(others, masks[0].contiguous())
    return {"same_grads": all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0]),
            "masks_differ_across_ranks": not torch.equal(others[0], others[1]),
            "drop_fraction": masks[0].float().mean().item()}


def test_dropout_streams_tp_sp_with_recompute():
    for rank, r in enumerate(run_distributed(dropout_worker, 2, dict(tp=2, sequence_parallel=True),
                                             all_ranks=True)):
        assert r["same_grads"], (rank, "activation recompute changed dropout masks")
        assert r["masks_differ_across_ranks"], (rank, "TP ranks drew the same dropout mask for different tokens")
        assert 0.15 < r["drop_fraction"] < 0.45, (rank, r["drop_fraction"])


def meta_init_worker(rank: int, world: int, layout: dict) -> dict:
    from sora_dist.parallel.parallelize import parallelize_dit

    args = tiny_args()
    cfg = make_cfg(**layout)
    pdims = ParallelDims.from_config(cfg.parallel, world)
    with torch.device("meta"):
        model = VideoDiT(args)
    pdims.build_mesh("cpu")
    part = parallelize_dit(model, pdims, cfg)
    model = part.module
    same, nonzero, full = True, 0, {}
    for name, p in model.named_parameters():
        full_p = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
        copies = [torch.empty_like(full_p) for _ in range(world)]
        dist.all_gather(copies, full_p.contiguous())
        same &= all(torch.equal(copies[0], c) for c in copies)
        nonzero += int(full_p.abs().sum() > 0)
        full[clean_fqn(name)] = full_p.clone()
    x, t, text, mask, drop, target = global_batch(1, args)
    loss = F.mse_loss(model(x, t, text, mask, drop), target)
    loss.backward()
    part.finalize_grads()
    return {"same": same, "nonzero": nonzero, "loss": loss.item(),
            "on_meta": any(p.is_meta for p in model.parameters()),
            "init_violations": init_violations(full, args)}


def test_meta_device_init_is_rank_consistent():
    """Built on meta (no full copy of the weights anywhere), sharded, then initialised: every
    rank sees the same full weights, and each follows the init rule for its global shape."""
    results = run_distributed(meta_init_worker, 4, dict(tp=2, sequence_parallel=True), all_ranks=True)
    for rank, r in enumerate(results):
        assert r["same"], (rank, "ranks disagree on the full weights after meta init")
        assert not r["on_meta"] and r["nonzero"] > 20 and math.isfinite(r["loss"]), (rank, r)
        assert not r["init_violations"], (rank, r["init_violations"])

"""Context-parallel attention equals single-process SDPA: outputs and dq/dk/dv, with and without
a key padding mask (the last CP rank holding only padding), for Ulysses, ring and hybrid."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sora_dist.parallel.context_parallel import build_cp_attention
from sora_dist.parallel.sequence import gather_sequence, shard_sequence
from sora_dist.parallel.dims import ParallelDims
from sora_dist.testing import run_distributed

pytestmark = pytest.mark.distributed


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _padding_mask(B: int, S: int, cp: int) -> torch.Tensor:
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, S - S // cp:] = False  # the last CP rank holds only padding
    mask[1, 1:3] = False           # and a hole in the middle of one sample
    return mask


def _compare(rank, world, mode, ring, ulysses, heads, masked, dp=1, tp=1, **build_kw):
    dims = ParallelDims(1, dp, 1, ring, ulysses, tp, world)
    meshes = dims.build_mesh("cpu")
    cp = meshes["cp"]
    # Same full tensors on the ranks of one CP group, different ones across DP/TP groups, so
    # a wrong group choice would mix data.
    c = dims.coords(rank)
    torch.manual_seed(100 * c["dp"] + c["tp"])
    dtype, cp_size = torch.float32, ring * ulysses
    B, S, D = 2, 4 * cp_size, 8
    q, k, v, dout = (torch.randn(B, heads, S, D, dtype=dtype) for _ in range(4))
    mask = _padding_mask(B, S, cp_size) if masked else None

    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = F.scaled_dot_product_attention(*ref, attn_mask=None if mask is None else mask[:, None, None])
    (out_ref * dout).sum().backward()

    loc = [shard_sequence(t, 2, cp).clone().requires_grad_() for t in (q, k, v)]
    attn = build_cp_attention(meshes, mode, **build_kw)
    out = attn(*loc, None if mask is None else shard_sequence(mask, 1, cp))
    (out * shard_sequence(dout, 2, cp)).sum().backward()

    nonfinite = sum(int((~torch.isfinite(t)).sum()) for t in (out, *[x.grad for x in loc]))
    errs = [_rel(gather_sequence(out.detach(), 2, cp), out_ref.detach())]
    errs += [_rel(gather_sequence(l.grad, 2, cp), r.grad) for l, r in zip(loc, ref)]
    worst = torch.tensor([nonfinite, *errs], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # over every rank, not just rank 0's group
    return dict(zip(("nonfinite", "out", "dq", "dk", "dv"), worst.tolist()))


def _compare_both(rank, world, mode, ring, ulysses, heads, build_kw):
    return {masked: _compare(rank, world, mode, ring, ulysses, heads, masked, **build_kw)
            for masked in (False, True)}


@pytest.mark.parametrize("mode,ring,ulysses,heads,build_kw", [
    ("ulysses", 1, 2, 4, {}),
    # ring needs no head divisibility; default = fused CPU flash blocks. The math kernel with a
    # tiny score budget (3 rows x B x H x 4 local keys) walks 3 of the 4 local query rows at a
    # time: uneven chunks
    ("ring", 2, 1, 3, {}),
    ("ring", 2, 1, 3, {"max_score_elems": 3 * 2 * 3 * 4, "ring_kernel": "math"}),
    ("ring", 4, 1, 2, {}),
    ("ring", 4, 1, 2, {"ring_kernel": "math"}),
    ("hybrid", 2, 2, 2, {}),
    # CP inside a larger world: the CP groups must be the right sub-groups of the mesh
    ("ulysses", 1, 2, 2, {"dp": 2}),
    ("ring", 2, 1, 2, {"tp": 2}),
])
def test_cp_matches_single_process(mode, ring, ulysses, heads, build_kw):
    world = ring * ulysses * build_kw.get("dp", 1) * build_kw.get("tp", 1)
    results = run_distributed(_compare_both, world, mode, ring, ulysses, heads, build_kw)
    for masked, res in results.items():
        assert res.pop("nonfinite") == 0, (masked, "NaN/inf in outputs or grads")
        for name, err in res.items():
            assert err < 1e-5, (mode, masked, name, err)


def _helpers_and_errors(rank, world):
    meshes = ParallelDims(1, 1, 1, 1, world, 1, world).build_mesh("cpu")
    cp = meshes["cp"]
    out = {}
    # gather_sequence backward hands each rank its slice of the (replicated) upstream grad.
    x = torch.arange(12.0).view(1, 6, 2)
    xl = shard_sequence(x, 1, cp).clone().requires_grad_()
    y = gather_sequence(xl, 1, cp)
    w = torch.linspace(-1, 1, 12).view(1, 6, 2)
    (y * w).sum().backward()
    out["gather_ok"] = (torch.equal(y, x) and torch.equal(xl.grad, shard_sequence(w, 1, cp))
                        and shard_sequence(None, 1, cp) is None)
    q = torch.randn(1, 3, 2, 4)  # 3 heads do not split over 2 Ulysses ranks
    try:
        build_cp_attention(meshes, "ulysses")(q, q, q, None)
        out["heads_error"] = ""
    except ValueError as e:
        out["heads_error"] = str(e)
    try:
        shard_sequence(torch.zeros(1, 5), 1, cp)
        out["shard_error"] = ""
    except ValueError as e:
        out["shard_error"] = str(e)
    # bf16 through the ring (fused bf16 blocks, fp32 merge) against fp32 SDPA on the same bf16
    # values, with the byte counter switched on.
    from sora_dist.parallel.context_parallel import COMM_COUNTER
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 8).bfloat16() for _ in range(3))
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref).sum().backward()
    loc = [shard_sequence(t, 2, cp).clone().requires_grad_() for t in (q, k, v)]
    with COMM_COUNTER.counting():
        o = build_cp_attention(meshes, "ring")(*loc, None)
        o.float().sum().backward()
    out["bf16_dtype"] = o.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in loc)
    out["bf16_err"] = max(_rel(gather_sequence(t.grad, 2, cp).float(), r.grad) for t, r in zip(loc, ref))
    out["bytes"] = dict(COMM_COUNTER.bytes)
    dist.barrier()
    return out


def test_helpers_and_errors():
    for rank, res in enumerate(run_distributed(_helpers_and_errors, 2, all_ranks=True)):
        assert res["gather_ok"], rank
        assert "divide" in res["heads_error"], rank
        assert "pad" in res["shard_error"], rank
        assert res["bf16_dtype"] and res["bf16_err"] < 1e-2, (rank, res["bf16_err"])  # bf16 rounding only
        # ring of 2, bf16 (1, 2, 4, 8): each rank's forward sends K/V once (2 x 128 B); backward
        # K/V once and fp32 dK/dV twice (2 x 2 x 256 B).
        assert res["bytes"] == {"p2p": 256 + 256 + 2 * 512}, (rank, res["bytes"])


def _dit_block(rank, world, mode, ring, ulysses):
    """A whole DiTBlock with its self-attention swapped, tokens/RoPE/mask sharded as
    parallelize_dit will: output, input grad and CP-summed parameter grads match one process."""
    import copy

    from sora_dist.models.dit import Conditioning, DiTArgs, DiTBlock
    from sora_dist.models.embeddings import build_rope_3d

    meshes = ParallelDims(1, 1, 1, ring, ulysses, 1, world).build_mesh("cpu")
    cp = meshes["cp"]
    torch.manual_seed(0)
    block = DiTBlock(DiTArgs(hidden_size=32, num_heads=4))
    for p in block.parameters():  # adaLN-Zero would make the block the identity
        torch.nn.init.normal_(p, std=0.2)
    B, grid = 2, (2, 2, 4)
    S = grid[0] * grid[1] * grid[2]
    x = torch.randn(B, S, 32)
    w = torch.randn(B, S, 32)
    cond = Conditioning(c_BD=torch.randn(B, 32), text_BLD=torch.randn(B, 5, 32),
                        text_mask_BL=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool(),
                        rope_SP2=build_rope_3d(grid, 8), token_mask_BS=_padding_mask(B, S, world))

    xr = x.clone().requires_grad_()
    (block(xr, cond) * w).sum().backward()
    ref_grads = {n: p.grad for n, p in block.named_parameters()}

    cp_block = copy.deepcopy(block)
    cp_block.zero_grad()
    cp_block.attn.core_attention = build_cp_attention(meshes, mode)
    xl = shard_sequence(x, 1, cp).clone().requires_grad_()
    cond_l = cond.with_(rope_SP2=shard_sequence(cond.rope_SP2, 0, cp),
                        token_mask_BS=shard_sequence(cond.token_mask_BS, 1, cp))
    out = cp_block(xl, cond_l)
    (out * shard_sequence(w, 1, cp)).sum().backward()
    res = {"out": _rel(gather_sequence(out.detach(), 1, cp), block(x, cond).detach()),
           "dx": _rel(gather_sequence(xl.grad, 1, cp), xr.grad)}
    grads = {n: p.grad for n, p in cp_block.named_parameters()}
    for g in grads.values():  # each CP rank holds its tokens' share of every weight grad
        dist.all_reduce(g, group=cp.get_group())
    res["params"] = max(_rel(grads[n], ref_grads[n]) for n in ref_grads)
    return res


def test_dit_block_hybrid_matches_single_process():
    for rank, res in enumerate(run_distributed(_dit_block, 4, "hybrid", 2, 2, all_ranks=True)):
        for name, err in res.items():
            assert err < 1e-5, (rank, name, err)


def _recompute_and_compile(rank, world, mode):
    """The CP module under activation recompute and torch.compile (as parallelize_dit applies
    them) gives the eager result: recompute re-runs the communication in backward, in the same
    order on every rank; dynamo handles the autograd.Functions (Ulysses) and custom ops (ring)
    with collectives / P2P inside."""
    from torch.utils.checkpoint import checkpoint

    from sora_dist.models.dit import Conditioning, DiTArgs, DiTBlock
    from sora_dist.models.embeddings import build_rope_3d

    meshes = ParallelDims(1, 1, 1, 2, 1, 1, world).build_mesh("cpu")
    cp = meshes["cp"]
    torch.manual_seed(0)
    block = DiTBlock(DiTArgs(hidden_size=32, num_heads=4))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    block.attn.core_attention = build_cp_attention(meshes, mode)
    B, grid = 2, (2, 2, 4)
    cond = Conditioning(c_BD=torch.randn(B, 32), text_BLD=torch.randn(B, 5, 32),
                        text_mask_BL=torch.ones(B, 5, dtype=torch.bool),
                        rope_SP2=shard_sequence(build_rope_3d(grid, 8), 0, cp),
                        token_mask_BS=shard_sequence(_padding_mask(B, 16, world), 1, cp))
    xl = shard_sequence(torch.randn(B, 16, 32), 1, cp).clone().requires_grad_()
    runs = {"eager": block,
            "recompute": lambda x, c: checkpoint(block, x, c, use_reentrant=False),
            "compile": torch.compile(block, backend="aot_eager")}  # inductor needs a C++ toolchain
    res = {}
    for name, f in runs.items():
        xl.grad = None
        out = f(xl, cond)
        out.sum().backward()
        res[name] = (out.detach(), xl.grad.clone())
    return {name: max(_rel(a, b) for a, b in zip(res[name], res["eager"])) for name in ("recompute", "compile")}


def test_recompute_and_compile_ring():
    for rank, res in enumerate(run_distributed(_recompute_and_compile, 2, "ring", all_ranks=True)):
        for name, err in res.items():
            assert err < 1e-6, (rank, name, err)


def _ring_under_checkpointing(rank, world):
    """Bytes the ring sends in backward, and bytes a block keeps after forward, with no / op /
    full recompute (parallelize's apply_activation_checkpointing on a one-block stack)."""
    import torch.nn as nn

    from sora_dist.models.dit import Conditioning, DiTArgs, DiTBlock
    from sora_dist.models.embeddings import build_rope_3d
    from sora_dist.parallel.context_parallel import COMM_COUNTER
    from sora_dist.parallel.activation_checkpoint import apply_activation_checkpointing
    from sora_dist.parallel.rng import build_rng_tracker
    from sora_dist.planning.measure import live_bytes_of

    meshes = ParallelDims(1, 1, 1, world, 1, 1, world).build_mesh("cpu")
    cp = meshes["cp"]
    B, grid, D = 2, (2, 4, 8), 64
    rope = shard_sequence(build_rope_3d(grid, 16), 0, cp)
    x = shard_sequence(torch.randn(B, 64, D, generator=torch.Generator().manual_seed(1)), 1, cp)
    out = {}
    for mode in ("none", "op", "full"):
        torch.manual_seed(0)
        holder = nn.Module()
        holder.blocks = nn.ModuleDict({"0": DiTBlock(DiTArgs(hidden_size=D, num_heads=4))})
        holder.blocks["0"].attn.core_attention = build_cp_attention(meshes, "ring")
        apply_activation_checkpointing(holder, mode, build_rng_tracker(0, 0, 0, "cpu"))
        cond = Conditioning(c_BD=torch.ones(B, D), text_BLD=torch.ones(B, 5, D),
                            text_mask_BL=torch.ones(B, 5, dtype=torch.bool), rope_SP2=rope)
        xl = x.clone().requires_grad_()
        y = None

        def fwd():
            nonlocal y
            y = holder.blocks["0"](xl, cond)
            return y

        kept = live_bytes_of(fwd)
        with COMM_COUNTER.counting():
            y.square().sum().backward()
        out[mode] = (COMM_COUNTER.total(), kept, xl.grad.clone())
    same = all(torch.allclose(out[m][2], out["none"][2], rtol=1e-5, atol=1e-7) for m in ("op", "full"))
    return {m: out[m][:2] for m in out} | {"same_grads": same}


def test_op_checkpointing_keeps_the_ring_whole():
    """With op-level SAC the ring is one cached op: backward sends exactly what it sends without
    recompute (no K/V re-sent), while full recompute re-runs the forward ring."""
    for rank, res in enumerate(run_distributed(_ring_under_checkpointing, 2, all_ranks=True)):
        assert res["same_grads"], rank
        (none_sent, none_kept), (op_sent, op_kept), (full_sent, full_kept) = res["none"], res["op"], res["full"]
        assert op_sent == none_sent < full_sent, (rank, res)
        assert full_kept < op_kept < none_kept, (rank, res)

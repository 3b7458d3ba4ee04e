"""Ring context parallelism: K/V blocks travel around the ring over P2P while every rank attends
its queries to the block it holds; blocks merge by log-sum-exp. Backward sends dK/dV around
with K/V (the FlashAttention-2 backward, blockwise). Any head count, traffic grows with the
ring size. Each block runs a fused SDPA kernel that returns the LSE (kernels.py picks it per
device), or plain fp32 math where none applies (parallel.ring_kernel=math).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from sora_dist.parallel.context_parallel.comm import ring_shift, wait_all
from sora_dist.parallel.context_parallel.kernels import (block_attention, block_attention_backward,
                                                          finite_lse, math_block_backward,
                                                          math_block_forward, resolve_block_kernel)

# The math kernel materialises fp32 score tiles of at most this many elements (128 MiB): a
# few live at once in backward. Fused kernels (the default where one exists) need no tile.
DEFAULT_MAX_SCORE_ELEMS = 2**25

# Non-causal ring attention. Blocks run a fused aten kernel that returns the LSE (kernel =
# "cpu_flash" / "cuda_flash" / "cuda_efficient", block output in the input dtype) or fp32 torch
# math (kernel = "math"); merging and the dq/dK/dV accumulators are fp32 either way. Memory: the
# saved q, k, v, out and lse of this rank, one K/V (and dK/dV) block in flight, and (math only)
# bounded score tiles.
#
# It is one torch.library custom op (forward + registered autograd), not a Python
# autograd.Function: op-level selective checkpointing (activation_checkpoint.sac_save_ops) then sees the
# whole ring as a single op whose (out, lse) it keeps, so the backward recompute neither re-runs
# the ring's attention nor re-sends its K/V; the per-step kernels inside are not cached one by one.

def block_visibility(runs, R: int, r: int, S: int) -> list[bool]:
    """Whether each ring block (tokens [j*S, (j+1)*S) of the whole CP sequence) shares a sample
    (or padding, id -1) with block r's queries, from the sequence's runs (models/attention.py
    Runs, host ints): no device read."""
    ids = [{i for a, b, i in runs if a < (j + 1) * S and b > j * S} for j in range(R)]
    return [bool(ids[r] & ids[j]) for j in range(R)]


def _doc_blocks(doc_S, R: int, r: int, S: int, visible=None):
    """Packed sequences: (this rank's query sample ids, every block's key sample ids, whether
    block src shares a sample with our queries) — blocks sharing none are skipped (their K/V
    still pass through). `visible` from block_visibility (the Conditioning's runs) avoids the
    device read; without it the ids are read back (one host sync per ring call)."""
    if doc_S is None:
        return None, [None] * R, [True] * R
    blocks = doc_S.split(S)
    mine = blocks[r]
    if visible is not None:
        return mine, blocks, list(visible)
    lo, hi = int(mine.min()), int(mine.max())
    # Samples are contiguous runs, so id ranges overlap exactly when samples are shared.
    overlap = [bool(((b >= lo) & (b <= hi) & torch.isin(b, mine)).any()) for b in blocks]
    return mine, blocks, overlap


def _ring_forward(q, k, v, mask_BS, group, scale, rows, kernel, doc_S=None, visible=None):
    R, r = dist.get_world_size(group), dist.get_rank(group)
    S = k.shape[2]
    math = kernel == "math"
    doc_q, doc_k, visible = _doc_blocks(doc_S, R, r, S, visible)
    qs = q.float() * scale if math else None
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = out.new_full((*q.shape[:3], 1), float("-inf"))
    kv = torch.stack([k, v])  # one message per step instead of two
    for step in range(R):
        if step + 1 < R:  # next block is in flight while this one is computed
            kv_next, works = ring_shift(kv, group)
        src = (r - step) % R  # which rank's tokens this block holds
        m = None if mask_BS is None else mask_BS[:, src * S:(src + 1) * S]
        if not visible[src]:  # no query here shares a sample with this block
            if step + 1 < R:
                wait_all(works)
                kv = kv_next
            continue
        if math:
            o_b, lse_b = math_block_forward(qs, kv[0].float(), kv[1].float(), m, rows, doc_q, doc_k[src])
        else:
            o_b, lse_b = block_attention(q, kv[0], kv[1], m, scale, kernel)
            o_b = o_b.float()
        # out = (e^lse out + e^lse_b o_b) / e^new, safe when both are -inf (all masked).
        new = torch.logaddexp(lse, lse_b)
        new_safe = finite_lse(new)
        out = out * torch.exp(lse - new_safe) + o_b * torch.exp(lse_b - new_safe)
        lse = new
        if step + 1 < R:
            wait_all(works)
            kv = kv_next
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, mask_BS, group, scale, rows, kernel, doc_S=None,
                   visible=None):
    R, r = dist.get_world_size(group), dist.get_rank(group)
    S = k.shape[2]
    math = kernel == "math"
    doc_q, doc_k, visible = _doc_blocks(doc_S, R, r, S, visible)
    if math:
        qs, do32 = q.float() * scale, dout.float()
        delta = (do32 * out.float()).sum(-1, keepdim=True)
    else:
        dout = dout.contiguous()
    lse = finite_lse(lse)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])
    dkv_in, dkv_works = None, []  # what the previous rank sent (from step 1 on)
    for step in range(R):
        if step + 1 < R:
            kv_next, kv_works = ring_shift(kv, group)
        src = (r - step) % R
        m = None if mask_BS is None else mask_BS[:, src * S:(src + 1) * S]
        if not visible[src]:
            dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device)
        elif math:
            dq_b, dkv = math_block_backward(qs, kv[0].float(), kv[1].float(), do32, delta, lse, m, rows,
                                            doc_q, doc_k[src])
            dq += dq_b
        else:
            dq_b, dk_b, dv_b = block_attention_backward(dout, q, kv[0], kv[1], out, lse, m,
                                                        scale, kernel)
            dq += dq_b
            dkv = torch.stack([dk_b, dv_b]).float()
        # dK/dV of block src travel with it: add what the previous ranks computed for it
        # (sent during our compute), then pass the sum on. Sums are fp32 on the wire (the
        # math kernel's are fp32 throughout; a fused kernel's per-block grads come in the
        # input dtype, as in ring-flash-attention).
        if step > 0:
            wait_all(dkv_works)
            dkv += dkv_in
        # Keep the sent buffer referenced until its send completes (on CUDA the caching
        # allocator could otherwise hand its memory out while NCCL still reads it).
        dkv_sent = dkv
        dkv_in, dkv_works = ring_shift(dkv_sent, group)
        if step + 1 < R:
            wait_all(kv_works)
            kv = kv_next
    # R shifts of the accumulators bring every block's full dK/dV home.
    wait_all(dkv_works)
    del dkv_sent
    dq = dq * scale if math else dq  # math works on pre-scaled queries
    # Copies: dK and dV share one buffer, and a custom op may not return aliases.
    return dq.to(q.dtype), dkv_in[0].to(k.dtype, copy=True), dkv_in[1].to(v.dtype, copy=True)


def _group(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("sora_dist::ring_attention", mutates_args=())
def _ring_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_BS: Optional[torch.Tensor],
             group_name: str, scale: float, rows: int, kernel: str,
             doc_S: Optional[torch.Tensor] = None, visible: Optional[list[bool]] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return _ring_forward(q, k, v, mask_BS, _group(group_name), scale, rows, kernel, doc_S, visible)


@_ring_op.register_fake
def _(q, k, v, mask_BS, group_name, scale, rows, kernel, doc_S=None, visible=None):
    return torch.empty_like(q), q.new_empty((*q.shape[:3], 1), dtype=torch.float32)


def _ring_setup_context(ctx, inputs, output):
    q, k, v, mask_BS, group_name, scale, rows, kernel, doc_S, visible = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask_BS, doc_S)
    ctx.args = (group_name, scale, rows, kernel)
    ctx.visible = visible


# The backward is an op of its own too, so torch.compile keeps it opaque instead of tracing
# its point-to-point communication.
@torch.library.custom_op("sora_dist::ring_attention_backward", mutates_args=())
def _ring_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, mask_BS: Optional[torch.Tensor],
                 group_name: str, scale: float, rows: int, kernel: str,
                 doc_S: Optional[torch.Tensor] = None, visible: Optional[list[bool]] = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ring_backward(dout, q, k, v, out, lse, mask_BS, _group(group_name), scale, rows, kernel, doc_S,
                          visible)


@_ring_bwd_op.register_fake
def _(dout, q, k, v, out, lse, mask_BS, group_name, scale, rows, kernel, doc_S=None, visible=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ring_op_backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask_BS, doc_S = ctx.saved_tensors
    dq, dk, dv = _ring_bwd_op(dout, q, k, v, out, lse, mask_BS, *ctx.args, doc_S, ctx.visible)
    return dq, dk, dv, None, None, None, None, None, None, None


_ring_op.register_autograd(_ring_op_backward, setup_context=_ring_setup_context)


def ring_attention(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS, ring_group,
                   max_score_elems: int = DEFAULT_MAX_SCORE_ELEMS, kernel: str = "auto",
                   doc_S: Optional[torch.Tensor] = None, doc_runs=None) -> torch.Tensor:
    """Attention of local queries to the whole ring's keys. kv_mask_BS is the mask of all the
    ring's keys (B, R * S_local), in ring-rank order, or None. kernel: auto | fused | math (see
    resolve_block_kernel). max_score_elems bounds the math kernel's fp32 score tile (query rows
    are processed in chunks). doc_S: a packed sequence's sample ids of the whole ring's keys, in
    ring order; doc_runs: the same as host runs (then no device read picks the blocks to skip)."""
    B, H, _, D = q_BHSD.shape
    rows = max(1, max_score_elems // (B * H * k_BHSD.shape[2]))
    # One dtype for the block kernels: under autocast q/k can come out fp32 (qk-norm) while v is
    # bf16; use the autocast dtype, as SDPA does. The math kernel upcasts to fp32 anyway.
    dev = q_BHSD.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q_BHSD.dtype
    q_BHSD, k_BHSD, v_BHSD = (t.to(dt).contiguous() for t in (q_BHSD, k_BHSD, v_BHSD))
    if doc_S is not None:
        # Packed samples: the block mask depends on query and key (same sample), which the math
        # kernel applies per score tile; blocks sharing no sample with our queries are skipped.
        kernel = "math"
    kernel = resolve_block_kernel(kernel, q_BHSD, kv_mask_BS is not None)
    visible = None
    if doc_S is not None and doc_runs is not None:
        visible = block_visibility(doc_runs, dist.get_world_size(ring_group), dist.get_rank(ring_group),
                                   k_BHSD.shape[2])
    return _ring_op(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS, ring_group.group_name, D ** -0.5, rows,
                    kernel, doc_S, visible)[0]

"""Blockwise attention with log-sum-exp: what a ring rank runs on each K/V block.

A ring rank attends its queries to one K/V block at a time and merges the blocks by their
log-sum-exp, so it needs kernels that return the LSE, and in backward ones that take the
*final* output and LSE (FlashAttention-2: dS = P * (dP - rowsum(dO * O)), P = exp(S - lse)).
torch exposes those as aten ops under SDPA; which op exists depends on the device, so the choice
is made here, once (`fused_block_kernel`, `resolve_block_kernel`). Call conventions are checked
on meta tensors (tests/unit/test_attention_backends.py); numerics on CPU against the plain
fp32 math kernels at the end of this file, which are also the fallback where no fused kernel
applies (parallel.ring_kernel=math).
"""
from __future__ import annotations

from typing import Optional

import torch

from sora_dist.config.parallel import RING_KERNELS
from sora_dist.parallel.device import device_capability


def fused_block_kernel(device_type: str, dtype: torch.dtype, head_dim: int,
                       has_mask: bool, capability: tuple[int, int] = (9, 0)) -> Optional[str]:
    """The fused aten kernel for a block on this device/dtype/mask, or None (use math).
    CPU: flash (any float dtype, additive mask). CUDA sm80+: flash for bf16/fp16 without a mask
    (head_dim <= 256, multiple of 8), memory-efficient otherwise (takes a bias, fp32 too);
    before sm80 (no flash, no bf16 kernels): memory-efficient for fp16/fp32, else math."""
    if device_type == "cpu":
        return "cpu_flash"
    if device_type == "cuda":
        if capability < (8, 0):
            return None if dtype == torch.bfloat16 else "cuda_efficient"
        if (not has_mask and dtype in (torch.bfloat16, torch.float16)
                and head_dim <= 256 and head_dim % 8 == 0):
            return "cuda_flash"
        return "cuda_efficient"
    return None


def _additive_bias(kv_mask_BS: torch.Tensor, dtype, H: int, Sq: int, align: int) -> torch.Tensor:
    """Key mask (B, S; True = valid) -> additive bias broadcast to (B, H, Sq, S) without
    materialising it. The memory-efficient kernel needs the bias row stride aligned to 16
    elements, so the storage is padded and sliced (what SDPA itself does)."""
    B, S = kv_mask_BS.shape
    Sp = -(-S // align) * align
    bias = torch.zeros(B, 1, 1, Sp, dtype=dtype, device=kv_mask_BS.device)
    bias[..., :S].masked_fill_(~kv_mask_BS.bool()[:, None, None, :], float("-inf"))
    return bias[..., :S].expand(B, H, Sq, S)


def _empty_rows(kv_mask_BS: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, 1, 1, 1) bool: batch rows whose keys in this block are all masked, or None."""
    return None if kv_mask_BS is None else ~kv_mask_BS.bool().any(1)[:, None, None, None]


def block_attention(q, k, v, kv_mask_BS, scale: float, kernel: str):
    """Attention of q (B, H, Sq, D) to one K/V block with a fused kernel: (out in q's dtype,
    lse fp32 (B, H, Sq, 1)). Rows with every key of the block masked get out = 0, lse = -inf
    (kernels disagree on those rows: CPU flash returns lse = 0), so the merge ignores them."""
    B, H, Sq, _ = q.shape
    if kernel == "cpu_flash":
        bias = None if kv_mask_BS is None else _additive_bias(kv_mask_BS, q.dtype, H, Sq, 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    elif kernel == "cuda_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale)[:2]
    elif kernel == "cuda_efficient":
        bias = None if kv_mask_BS is None else _additive_bias(kv_mask_BS, q.dtype, H, Sq, 16)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=scale)[:2]
        lse = lse[..., :Sq]  # the kernel pads the LSE rows to a multiple of 32
    else:
        raise ValueError(f"unknown fused block kernel {kernel!r}")
    lse = lse.float().unsqueeze(-1)
    empty = _empty_rows(kv_mask_BS)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def block_attention_backward(dout, q, k, v, out, lse, kv_mask_BS, scale: float, kernel: str):
    """Gradients of one block given the final (merged) out and lse (B, H, Sq, 1; finite): this
    block's share of dq and its dk, dv, all in q's dtype."""
    B, H, Sq, _ = q.shape
    lse = lse.squeeze(-1).contiguous()
    if kernel == "cpu_flash":
        bias = None if kv_mask_BS is None else _additive_bias(kv_mask_BS, q.dtype, H, Sq, 1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)
    if kernel == "cuda_flash":
        # No dropout: the philox seed/offset are never read, but must be tensors.
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, Sq, k.shape[2], 0.0, False, seed, offset,
            scale=scale)
    if kernel == "cuda_efficient":
        bias = None if kv_mask_BS is None else _additive_bias(kv_mask_BS, q.dtype, H, Sq, 16)
        Sp = -(-Sq // 32) * 32
        lse_p = lse.new_zeros(B, H, Sp)
        lse_p[..., :Sq] = lse
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse_p, seed, seed, 0.0, [True, True, True, False],
            False, scale=scale)
        return dq, dk, dv
    raise ValueError(f"unknown fused block kernel {kernel!r}")


def resolve_block_kernel(kernel: str, q: torch.Tensor, has_mask: bool) -> str:
    """"auto" -> the fused kernel for q's device/dtype/mask, else "math"; "fused" -> that
    kernel or an error; "math" -> "math"."""
    if kernel not in RING_KERNELS:
        raise ValueError(f"parallel.ring_kernel={kernel!r}: use one of {RING_KERNELS}")
    if kernel == "math":
        return "math"
    fused = fused_block_kernel(q.device.type, q.dtype, q.shape[-1], has_mask,
                               device_capability(q.device))
    if fused is None and kernel == "fused":
        raise ValueError(f"parallel.ring_kernel=fused: no fused attention kernel with LSE on "
                         f"{q.device.type}/{q.dtype}; use parallel.ring_kernel=auto or math")
    return fused or "math"


# ---- plain fp32 math --------------------------------------------------------------------------
def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    # A row whose keys are all masked has lse = -inf; subtracting it would give -inf - -inf =
    # NaN. Its scores are all -inf too, so any finite stand-in yields probabilities of 0.
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _scores(qs, k32, mask_BS, doc_q=None, doc_k=None):
    """Scaled scores of a query chunk to a key block; masked keys, and (packed sequences) keys
    of another sample than the query's (doc_q (Sq,) vs doc_k (Sk,) ids), get -inf."""
    s = torch.matmul(qs, k32.transpose(-1, -2))
    if mask_BS is not None:
        s.masked_fill_(~mask_BS[:, None, None, :], float("-inf"))
    if doc_q is not None:
        s.masked_fill_(doc_q[:, None] != doc_k[None, :], float("-inf"))
    return s


def _split_doc(doc_q, rows, n):
    return doc_q.split(rows) if doc_q is not None else [None] * n


# Blockwise math is plain torch: the fallback where no fused kernel applies (and the reference the
# fused kernels are tested against). It walks `rows` query rows at a
# time so the fp32 score tile stays at most B*H*rows*S_local elements whatever the sequence,
# works in place on that tile (one live tile in forward, two in backward), and takes queries
# pre-multiplied by the softmax scale (qs) so no tile-sized op is spent on scaling.

def math_block_forward(qs, k32, v32, mask_BS, rows, doc_q=None, doc_k=None):
    """Attention of q to one K/V block: (out normalised within the block, its lse). Rows whose
    keys are all masked in this block get lse = -inf and out = 0. doc_q/doc_k: sample ids of
    a packed sequence's queries and keys (attention within a sample only)."""
    outs, lses = [], []
    chunks = qs.split(rows, dim=2)
    for qc, dq in zip(chunks, _split_doc(doc_q, rows, len(chunks))):
        s = _scores(qc, k32, mask_BS, dq, doc_k)
        m = finite_lse(s.amax(dim=-1, keepdim=True))
        p = s.sub_(m).exp_()  # unnormalised; all zeros on fully masked rows
        denom = p.sum(dim=-1, keepdim=True)
        outs.append(torch.matmul(p, v32).div_(denom.masked_fill(denom == 0, 1.0)))
        lses.append(m + denom.log())  # log(0) = -inf where everything was masked
    return torch.cat(outs, 2), torch.cat(lses, 2)


def math_block_backward(qs, k32, v32, do32, delta, lse, mask_BS, rows, doc_q=None, doc_k=None):
    """FA2 backward for one K/V block given the final lse: (dq / scale, stacked [dk, dv]).
    dS = P * (dP - delta), delta_i = sum_d dO_id O_id (the softmax Jacobian term)."""
    dqs, dkv = [], k32.new_zeros((2, *k32.shape))
    chunks = [t.split(rows, dim=2) for t in (qs, do32, delta, lse)]
    for qc, doc, dc, lc, dq in zip(*chunks, _split_doc(doc_q, rows, len(chunks[0]))):
        p = _scores(qc, k32, mask_BS, dq, doc_k).sub_(lc).exp_()  # final softmax probabilities
        ds = torch.matmul(doc, v32.transpose(-1, -2)).sub_(dc).mul_(p)
        dqs.append(torch.matmul(ds, k32))
        dkv[0] += torch.matmul(ds.transpose(-1, -2), qc)  # qc carries the scale already
        dkv[1] += torch.matmul(p.transpose(-1, -2), doc)
    return torch.cat(dqs, 2), dkv

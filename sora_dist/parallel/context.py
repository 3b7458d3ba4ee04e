"""Context-parallel self-attention: Ulysses (all-to-all), ring (K/V rotation), or both.

The token sequence is sharded contiguously over the CP group for the whole DiT block (cp rank
r holds tokens [r*S/cp, (r+1)*S/cp)); only self-attention needs the other shards. The module
built here has CoreAttention's signature, takes this rank's q/k/v (B, H, S/cp, D) and key mask
(B, S/cp), and returns this rank's slice of full attention over the whole sequence.

* Ulysses (DeepSpeed-Ulysses): all-to-all (sequence-sharded, all heads) -> (head-sharded, whole
  sequence), plain local attention with the inner CoreAttention (SDPA / TE), all-to-all back.
  Per-rank traffic stays ~4x the local activations whatever the degree; heads must divide by it.
* Ring: K/V blocks travel around the ring over P2P while every rank attends its queries to the
  block it holds; blocks merge by log-sum-exp. Backward sends dK/dV around with K/V (the
  FlashAttention-2 backward, blockwise). Any head count, but traffic grows with the ring size.
  Each block runs a fused SDPA kernel that returns the log-sum-exp (models/attention.py picks
  it per device; plain fp32 math where none applies, or with parallel.ring_kernel=math).
* Hybrid: Ulysses inside (mesh dim cp_ulysses, intra-node all-to-all), ring outside (cp_ring).
  The flattened cp rank is ring_rank * ulysses + ulysses_rank, so after the Ulysses all-to-all
  ring rank r holds the contiguous tokens [r*S/ring, (r+1)*S/ring), as the ring expects.

No process group is global: everything is handed DeviceMeshes (see ParallelDims.build_mesh).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from sora_dist.parallel.state import device_capability, side_stream
from sora_dist.models.attention import (BLOCK_KERNELS, CoreAttention, block_attention,
                                         block_attention_backward, fused_block_kernel)

log = logging.getLogger(__name__)

MODES = ("ulysses", "ring", "hybrid")
# transformer-engine's name for each of our CP modes (DotProductAttention.set_context_parallel_group)
TE_COMM_TYPES = {"ring": "p2p", "ulysses": "a2a", "hybrid": "a2a+p2p"}
# The math ring kernel materialises fp32 score tiles of at most this many elements (128 MiB): a
# few live at once in backward. Fused kernels (the default where one exists) need no tile.
DEFAULT_MAX_SCORE_ELEMS = 2**25


class CommCounter:
    """Bytes this process sends in CP attention, by kind (benchmarks switch it on). The chunk an
    all-to-all keeps for itself is not counted: it never leaves the device."""

    def __init__(self):
        self.enabled = False
        self.bytes: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        if self.enabled:
            self.bytes[kind] += int(nbytes)

    @contextmanager
    def counting(self):
        self.bytes.clear()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    def total(self) -> int:
        return sum(self.bytes.values())


COMM_COUNTER = CommCounter()  # per-process statistics only; holds no group


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# all_gather_into_tensor is deprecated in favour of all_gather_single in recent torch.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's x along dim, in group-rank order (= sequence order)."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # backends concatenate along dim 0
    _all_gather(out, x.contiguous(), group=group)
    COMM_COUNTER.add("all_gather", _nbytes(x) * (n - 1))
    return out.view(n, *x.shape).movedim(0, dim).flatten(dim, dim + 1)


def _local_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % n:
        raise ValueError(f"sequence dim {dim} of size {x.shape[dim]} does not split over {n} CP ranks; "
                         f"pad the token sequence to a multiple of cp*tp first")
    size = x.shape[dim] // n
    return x.narrow(dim, r * size, size)


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence; backward keeps this rank's slice of the grad (times
    `grad_scale`), which is right when whatever consumes the gathered tensor is computed
    identically on every CP rank."""

    @staticmethod
    def forward(ctx, x, dim, group, grad_scale):
        ctx.dim, ctx.group, ctx.scale = dim, group, grad_scale
        return _gather_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        g = _local_slice(grad, ctx.dim, ctx.group).contiguous()
        return (g * ctx.scale if ctx.scale != 1.0 else g), None, None, None


def shard_sequence(x: Optional[torch.Tensor], dim: int, cp_mesh) -> Optional[torch.Tensor]:
    """This CP rank's contiguous chunk of x along dim (tokens, RoPE table, token mask; None
    passes through). Differentiable (a view); the length must divide by the CP size."""
    return None if x is None else _local_slice(x, dim, cp_mesh.get_group())


def gather_sequence(x: torch.Tensor, dim: int, cp_mesh, grad_scale: float = 1.0) -> torch.Tensor:
    """Inverse of shard_sequence: the whole sequence on every CP rank (backward slices and
    multiplies by grad_scale)."""
    return _GatherSequence.apply(x, dim, cp_mesh.get_group(), grad_scale)


# ----------------------------------------------------------------------------------------------
# Ulysses: sequence <-> heads all-to-all
# ----------------------------------------------------------------------------------------------

def _all_to_all(x_U: torch.Tensor, group) -> torch.Tensor:
    """x_U[i] goes to group rank i; out[i] came from group rank i."""
    x_U = x_U.contiguous()
    out = torch.empty_like(x_U)  # after .contiguous(): empty_like keeps a view's strides
    dist.all_to_all_single(out, x_U, group=group)
    n = x_U.shape[0]
    COMM_COUNTER.add("all_to_all", _nbytes(x_U) * (n - 1) // n)
    return out


def _seq_to_heads(x_BHSD: torch.Tensor, group) -> torch.Tensor:
    """(B, H, S/U, D) sequence-sharded -> (B, H/U, S, D) head-sharded."""
    U = dist.get_world_size(group)
    B, H, S, D = x_BHSD.shape
    y = _all_to_all(x_BHSD.reshape(B, U, H // U, S, D).transpose(0, 1), group)
    # y[i] = sequence shard i of my heads: put shards back in sequence order.
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // U, U * S, D)


def _heads_to_seq(x_BHSD: torch.Tensor, group) -> torch.Tensor:
    """(B, H/U, S, D) head-sharded -> (B, H, S/U, D) sequence-sharded."""
    U = dist.get_world_size(group)
    B, h, S, D = x_BHSD.shape
    y = _all_to_all(x_BHSD.reshape(B, h, U, S // U, D).permute(2, 0, 1, 3, 4), group)
    # y[i] = head chunk i of my sequence shard.
    return y.transpose(0, 1).reshape(B, U * h, S // U, D)


class _SeqToHeads(torch.autograd.Function):
    # The adjoint of an all-to-all is the reverse all-to-all.
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


# ----------------------------------------------------------------------------------------------
# Ring: blockwise attention with log-sum-exp merge, K/V (and dK/dV) passed around over P2P
# ----------------------------------------------------------------------------------------------

def _ring_shift(x: torch.Tensor, group):
    """Start sending x to the next ring rank and receiving the previous rank's; returns
    (recv buffer, works). x must stay untouched until the works complete."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if n == 1:
        return x, []
    recv = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, group=group, group_peer=(r + 1) % n),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=(r - 1) % n)]
    COMM_COUNTER.add("p2p", _nbytes(x))
    return recv, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for w in works:
        w.wait()


def _finite(lse: torch.Tensor) -> torch.Tensor:
    # A row whose keys are all masked has lse = -inf; subtracting it would give -inf - -inf =
    # NaN. Its scores are all -inf too, so any finite stand-in yields probabilities of 0.
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _scores(qs, k32, mask_BS):
    s = torch.matmul(qs, k32.transpose(-1, -2))
    if mask_BS is not None:
        s.masked_fill_(~mask_BS[:, None, None, :], float("-inf"))
    return s


# Blockwise math is plain torch: the fallback where no fused kernel applies (and the reference the
# fused kernels are tested against). It walks `rows` query rows at a
# time so the fp32 score tile stays at most B*H*rows*S_local elements whatever the sequence,
# works in place on that tile (one live tile in forward, two in backward), and takes queries
# pre-multiplied by the softmax scale (qs) so no tile-sized op is spent on scaling.

def _block_forward(qs, k32, v32, mask_BS, rows):
    """Attention of q to one K/V block: (out normalised within the block, its lse). Rows whose
    keys are all masked in this block get lse = -inf and out = 0."""
    outs, lses = [], []
    for qc in qs.split(rows, dim=2):
        s = _scores(qc, k32, mask_BS)
        m = _finite(s.amax(dim=-1, keepdim=True))
        p = s.sub_(m).exp_()  # unnormalised; all zeros on fully masked rows
        denom = p.sum(dim=-1, keepdim=True)
        outs.append(torch.matmul(p, v32).div_(denom.masked_fill(denom == 0, 1.0)))
        lses.append(m + denom.log())  # log(0) = -inf where everything was masked
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _block_backward(qs, k32, v32, do32, delta, lse, mask_BS, rows):
    """FA2 backward for one K/V block given the final lse: (dq / scale, stacked [dk, dv]).
    dS = P * (dP - delta), delta_i = sum_d dO_id O_id (the softmax Jacobian term)."""
    dqs, dkv = [], k32.new_zeros((2, *k32.shape))
    for qc, doc, dc, lc in zip(*(t.split(rows, dim=2) for t in (qs, do32, delta, lse))):
        p = _scores(qc, k32, mask_BS).sub_(lc).exp_()  # final softmax probabilities
        ds = torch.matmul(doc, v32.transpose(-1, -2)).sub_(dc).mul_(p)
        dqs.append(torch.matmul(ds, k32))
        dkv[0] += torch.matmul(ds.transpose(-1, -2), qc)  # qc carries the scale already
        dkv[1] += torch.matmul(p.transpose(-1, -2), doc)
    return torch.cat(dqs, 2), dkv


# Non-causal ring attention. Blocks run a fused aten kernel that returns the LSE (kernel =
# "cpu_flash" / "cuda_flash" / "cuda_efficient", block output in the input dtype) or fp32 torch
# math (kernel = "math"); merging and the dq/dK/dV accumulators are fp32 either way. Memory: the
# saved q, k, v, out and lse of this rank, one K/V (and dK/dV) block in flight, and (math only)
# bounded score tiles.
#
# It is one torch.library custom op (forward + registered autograd), not a Python
# autograd.Function: op-level selective checkpointing (parallelize.sac_save_ops) then sees the
# whole ring as a single op whose (out, lse) it keeps, so the backward recompute neither re-runs
# the ring's attention nor re-sends its K/V; the per-step kernels inside are not cached one by one.

def _ring_forward(q, k, v, mask_BS, group, scale, rows, kernel):
    R, r = dist.get_world_size(group), dist.get_rank(group)
    S = k.shape[2]
    math = kernel == "math"
    qs = q.float() * scale if math else None
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = out.new_full((*q.shape[:3], 1), float("-inf"))
    kv = torch.stack([k, v])  # one message per step instead of two
    for step in range(R):
        if step + 1 < R:  # next block is in flight while this one is computed
            kv_next, works = _ring_shift(kv, group)
        src = (r - step) % R  # which rank's tokens this block holds
        m = None if mask_BS is None else mask_BS[:, src * S:(src + 1) * S]
        if math:
            o_b, lse_b = _block_forward(qs, kv[0].float(), kv[1].float(), m, rows)
        else:
            o_b, lse_b = block_attention(q, kv[0], kv[1], m, scale, kernel)
            o_b = o_b.float()
        # out = (e^lse out + e^lse_b o_b) / e^new, safe when both are -inf (all masked).
        new = torch.logaddexp(lse, lse_b)
        new_safe = _finite(new)
        out = out * torch.exp(lse - new_safe) + o_b * torch.exp(lse_b - new_safe)
        lse = new
        if step + 1 < R:
            _wait(works)
            kv = kv_next
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, mask_BS, group, scale, rows, kernel):
    R, r = dist.get_world_size(group), dist.get_rank(group)
    S = k.shape[2]
    math = kernel == "math"
    if math:
        qs, do32 = q.float() * scale, dout.float()
        delta = (do32 * out.float()).sum(-1, keepdim=True)
    else:
        dout = dout.contiguous()
    lse = _finite(lse)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])
    for step in range(R):
        if step + 1 < R:
            kv_next, kv_works = _ring_shift(kv, group)
        src = (r - step) % R
        m = None if mask_BS is None else mask_BS[:, src * S:(src + 1) * S]
        if math:
            dq_b, dkv = _block_backward(qs, kv[0].float(), kv[1].float(), do32, delta, lse, m, rows)
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
            _wait(dkv_works)
            dkv += dkv_in
        # Keep the sent buffer referenced until its send completes (on CUDA the caching
        # allocator could otherwise hand its memory out while NCCL still reads it).
        dkv_sent = dkv
        dkv_in, dkv_works = _ring_shift(dkv_sent, group)
        if step + 1 < R:
            _wait(kv_works)
            kv = kv_next
    # R shifts of the accumulators bring every block's full dK/dV home.
    _wait(dkv_works)
    del dkv_sent
    dq = dq * scale if math else dq  # math works on pre-scaled queries
    # Copies: dK and dV share one buffer, and a custom op may not return aliases.
    return dq.to(q.dtype), dkv_in[0].to(k.dtype, copy=True), dkv_in[1].to(v.dtype, copy=True)


def _group(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("sora_dist::ring_attention", mutates_args=())
def _ring_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_BS: Optional[torch.Tensor],
             group_name: str, scale: float, rows: int, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _ring_forward(q, k, v, mask_BS, _group(group_name), scale, rows, kernel)


@_ring_op.register_fake
def _(q, k, v, mask_BS, group_name, scale, rows, kernel):
    return torch.empty_like(q), q.new_empty((*q.shape[:3], 1), dtype=torch.float32)


def _ring_setup_context(ctx, inputs, output):
    q, k, v, mask_BS, group_name, scale, rows, kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask_BS)
    ctx.args = (group_name, scale, rows, kernel)


# The backward is an op of its own too, so torch.compile keeps it opaque instead of tracing
# its point-to-point communication.
@torch.library.custom_op("sora_dist::ring_attention_backward", mutates_args=())
def _ring_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, mask_BS: Optional[torch.Tensor],
                 group_name: str, scale: float, rows: int, kernel: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ring_backward(dout, q, k, v, out, lse, mask_BS, _group(group_name), scale, rows, kernel)


@_ring_bwd_op.register_fake
def _(dout, q, k, v, out, lse, mask_BS, group_name, scale, rows, kernel):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ring_op_backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask_BS = ctx.saved_tensors
    dq, dk, dv = _ring_bwd_op(dout, q, k, v, out, lse, mask_BS, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_ring_op.register_autograd(_ring_op_backward, setup_context=_ring_setup_context)


def resolve_block_kernel(kernel: str, q: torch.Tensor, has_mask: bool) -> str:
    """"auto" -> the fused kernel for q's device/dtype/mask, else "math"; "fused" -> that
    kernel or an error; "math" -> "math"."""
    if kernel not in BLOCK_KERNELS:
        raise ValueError(f"parallel.ring_kernel={kernel!r}: use one of {BLOCK_KERNELS}")
    if kernel == "math":
        return "math"
    fused = fused_block_kernel(q.device.type, q.dtype, q.shape[-1], has_mask,
                               device_capability(q.device))
    if fused is None and kernel == "fused":
        raise ValueError(f"parallel.ring_kernel=fused: no fused attention kernel with LSE on "
                         f"{q.device.type}/{q.dtype}; use parallel.ring_kernel=auto or math")
    return fused or "math"


def ring_attention(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS, ring_group,
                   max_score_elems: int = DEFAULT_MAX_SCORE_ELEMS, kernel: str = "auto") -> torch.Tensor:
    """Attention of local queries to the whole ring's keys. kv_mask_BS is the mask of all the
    ring's keys (B, R * S_local), in ring-rank order, or None. kernel: auto | fused | math (see
    resolve_block_kernel). max_score_elems bounds the math kernel's fp32 score tile (query rows
    are processed in chunks)."""
    B, H, _, D = q_BHSD.shape
    rows = max(1, max_score_elems // (B * H * k_BHSD.shape[2]))
    # One dtype for the block kernels: under autocast q/k can come out fp32 (qk-norm) while v is
    # bf16; use the autocast dtype, as SDPA does. The math kernel upcasts to fp32 anyway.
    dev = q_BHSD.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q_BHSD.dtype
    q_BHSD, k_BHSD, v_BHSD = (t.to(dt).contiguous() for t in (q_BHSD, k_BHSD, v_BHSD))
    kernel = resolve_block_kernel(kernel, q_BHSD, kv_mask_BS is not None)
    return _ring_op(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS, ring_group.group_name, D ** -0.5, rows,
                    kernel)[0]


# ----------------------------------------------------------------------------------------------
# The module model code sees
# ----------------------------------------------------------------------------------------------

class ContextParallelAttention(nn.Module):
    """CoreAttention over a sequence sharded on the CP group: Ulysses over `ulysses_group`
    (inner), then ring over `ring_group` (outer); either may be None. The inner CoreAttention
    runs the local attention when there is no ring (ring blocks need the log-sum-exp, so they
    call the LSE-returning kernels of models/attention.py directly). With a TE inner and
    te_context_parallel, TE's own CP attention replaces both for unmasked batches."""

    def __init__(self, mode: str, cp_group, ulysses_group=None, ring_group=None,
                 inner: Optional[nn.Module] = None, max_score_elems: int = DEFAULT_MAX_SCORE_ELEMS,
                 ring_kernel: str = "auto", te_context_parallel: bool = False):
        super().__init__()
        if ring_kernel not in BLOCK_KERNELS:
            raise ValueError(f"parallel.ring_kernel={ring_kernel!r}: use one of {BLOCK_KERNELS}")
        self.mode, self.max_score_elems, self.ring_kernel = mode, max_score_elems, ring_kernel
        self.inner = inner if inner is not None else CoreAttention("sdpa")
        # Size-1 groups need no communication; drop them so forward does no empty collectives.
        big = lambda g: g if g is not None and dist.get_world_size(g) > 1 else None  # noqa: E731
        self.cp_group, self.ulysses_group, self.ring_group = cp_group, big(ulysses_group), big(ring_group)
        # TE's own CP attention (inner must be the TE backend): its groups are handed over on the
        # first call, when the device (for TE's side stream) is known.
        self.te_cp = te_context_parallel and getattr(self.inner, "backend", None) == "te"
        self._te_cp_groups = ([ulysses_group, ring_group] if mode == "hybrid" else cp_group)
        self._te_cp_ready, self._te_cp_fallback_logged = False, False

    def extra_repr(self) -> str:
        size = lambda g: 1 if g is None else dist.get_world_size(g)  # noqa: E731
        return (f"mode={self.mode}, ulysses={size(self.ulysses_group)}, "
                f"ring={size(self.ring_group)}, ring_kernel={self.ring_kernel}"
                + (", te_context_parallel" if self.te_cp else ""))

    def _use_te_cp(self, q_BHSD, kv_mask_BS) -> bool:
        """TE's CP attention applies to unmasked sequences whose local shard has an even length
        (TE's p2p splits it in halves); otherwise this module's own CP runs, still with TE as
        the local attention. Every CP rank decides the same (equal shards, shared mask-ness)."""
        if not self.te_cp:
            return False
        if kv_mask_BS is not None or q_BHSD.shape[2] % 2:
            if not self._te_cp_fallback_logged:
                log.warning("TE context-parallel attention needs an unmasked sequence with an even "
                            "local length (got %d tokens per rank%s): using sora_dist's %s CP "
                            "around TE attention for such batches. Pick buckets whose token count "
                            "divides by 2*cp.", q_BHSD.shape[2],
                            ", padded" if kv_mask_BS is not None else "", self.mode)
                self._te_cp_fallback_logged = True
            return False
        if not self._te_cp_ready:
            self.inner.set_te_context_parallel(
                self._te_cp_groups, dist.get_process_group_ranks(self.cp_group),
                side_stream(q_BHSD.device), TE_COMM_TYPES[self.mode])
            self._te_cp_ready = True
        return True

    def forward(self, q_BHSD, k_BHSD, v_BHSD, kv_mask_BS=None):
        if self._use_te_cp(q_BHSD, kv_mask_BS):
            return self.inner.forward_te_cp(q_BHSD, k_BHSD, v_BHSD)
        ug, rg = self.ulysses_group, self.ring_group
        if ug is not None and q_BHSD.shape[1] % dist.get_world_size(ug):
            U, H = dist.get_world_size(ug), q_BHSD.shape[1]
            raise ValueError(
                f"Ulysses context parallel over {U} ranks needs the local head count ({H}) to "
                f"divide by {U}; use parallel.cp_mode=ring, a smaller ulysses_degree (hybrid), "
                f"or num_heads/tp that divides")
        # The key mask is tiny (B x S bools): gather it whole once, in cp-rank = sequence order.
        mask = None if kv_mask_BS is None else _gather_along(kv_mask_BS.bool(), 1, self.cp_group)
        if ug is not None:
            B = q_BHSD.shape[0]
            # One all-to-all for q, k and v together (fewer, larger messages).
            qkv = _SeqToHeads.apply(torch.cat([q_BHSD, k_BHSD, v_BHSD]), ug)
            q_BHSD, k_BHSD, v_BHSD = qkv.split(B)
        # Hybrid: this rank now holds ring shard ring_rank (U cp shards) for H/U heads, and the
        # ring wants the whole sequence's key mask in ring order, which `mask` already is.
        if rg is not None:
            o = ring_attention(q_BHSD, k_BHSD, v_BHSD, mask, rg, self.max_score_elems,
                               self.ring_kernel)
        else:
            o = self.inner(q_BHSD, k_BHSD, v_BHSD, mask)
        return _HeadsToSeq.apply(o, ug) if ug is not None else o


def build_cp_attention(meshes, mode: str, inner: Optional[nn.Module] = None, *,
                       max_score_elems: int = DEFAULT_MAX_SCORE_ELEMS,
                       ring_kernel: str = "auto",
                       te_context_parallel: bool = True) -> ContextParallelAttention:
    """The CoreAttention replacement for a sequence sharded over meshes["cp"] (`inner`, default
    SDPA, does the local attention of Ulysses). ulysses / ring use the whole flattened cp group;
    hybrid runs Ulysses over meshes["cp_ulysses"] and the ring over meshes["cp_ring"]. With a TE
    `inner` and te_context_parallel, unmasked batches go through TE's own CP attention instead
    (p2p / a2a / a2a+p2p for ring / ulysses / hybrid, same groups)."""
    if mode not in MODES:
        raise ValueError(f"unknown context-parallel mode {mode!r}; use one of {MODES}")
    cp = meshes["cp"].get_group()
    groups = {"ulysses": dict(ulysses_group=cp), "ring": dict(ring_group=cp),
              "hybrid": dict(ulysses_group=meshes["cp_ulysses"].get_group(),
                             ring_group=meshes["cp_ring"].get_group())}[mode]
    return ContextParallelAttention(mode, cp, inner=inner, max_score_elems=max_score_elems,
                                    ring_kernel=ring_kernel, te_context_parallel=te_context_parallel,
                                    **groups)

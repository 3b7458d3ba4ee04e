"""The module model code sees under context parallelism: ContextParallelAttention replaces each
self-attention's CoreAttention (cross-attention is sequence-local and stays as it is).

The token sequence is sharded contiguously over the CP group for the whole DiT block (cp rank
r holds tokens [r*S/cp, (r+1)*S/cp)); only self-attention needs the other shards. The module
takes this rank's q/k/v (B, H, S/cp, D) and key mask (B, S/cp) and returns this rank's slice of
full attention over the whole sequence.

* ulysses: all-to-all over the whole CP group (ulysses.py), the inner CoreAttention locally.
* ring: K/V rotation over the whole CP group (ring.py).
* hybrid: Ulysses inside (mesh dim cp_ulysses, intra-node all-to-all), ring outside (cp_ring).
  The flattened cp rank is ring_rank * ulysses + ulysses_rank, so after the Ulysses all-to-all
  ring rank r holds the contiguous tokens [r*S/ring, (r+1)*S/ring), as the ring expects.
* With a transformer-engine inner and parallel.te_context_parallel, TE's own CP attention
  (p2p / a2a / a2a+p2p) runs unmasked batches instead.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from sora_dist.config.parallel import CP_MODES, RING_KERNELS
from sora_dist.models.attention import CoreAttention
from sora_dist.parallel.context_parallel.comm import gather_along
from sora_dist.parallel.context_parallel.ring import DEFAULT_MAX_SCORE_ELEMS, ring_attention
from sora_dist.parallel.context_parallel.ulysses import heads_to_seq, seq_to_heads
from sora_dist.parallel.device import side_stream

log = logging.getLogger(__name__)

# transformer-engine's name for each of our CP modes (DotProductAttention.set_context_parallel_group)
TE_COMM_TYPES = {"ring": "p2p", "ulysses": "a2a", "hybrid": "a2a+p2p"}


class ContextParallelAttention(nn.Module):
    """CoreAttention over a sequence sharded on the CP group: Ulysses over `ulysses_group`
    (inner), then ring over `ring_group` (outer); either may be None. The inner CoreAttention
    runs the local attention when there is no ring (ring blocks need the log-sum-exp, so they
    call the LSE-returning kernels of kernels.py directly). With a TE inner and
    te_context_parallel, TE's own CP attention replaces both for unmasked batches."""

    def __init__(self, mode: str, cp_group, ulysses_group=None, ring_group=None,
                 inner: Optional[nn.Module] = None, max_score_elems: int = DEFAULT_MAX_SCORE_ELEMS,
                 ring_kernel: str = "auto", te_context_parallel: bool = False):
        super().__init__()
        if ring_kernel not in RING_KERNELS:
            raise ValueError(f"parallel.ring_kernel={ring_kernel!r}: use one of {RING_KERNELS}")
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

    def forward(self, q_BHSD, k_BHSD, v_BHSD, kv_mask_BS=None, doc_S=None, runs=None):
        """doc_S (a packed sequence): the sample of each of this rank's tokens; runs: those of the
        whole CP sequence (Conditioning.cp_doc_runs). Attention stays within samples across the
        whole CP sequence."""
        if doc_S is not None:
            return self._forward_packed(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS, doc_S, runs)
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
        mask = None if kv_mask_BS is None else gather_along(kv_mask_BS.bool(), 1, self.cp_group)
        if ug is not None:
            B = q_BHSD.shape[0]
            # One all-to-all for q, k and v together (fewer, larger messages).
            qkv = seq_to_heads(torch.cat([q_BHSD, k_BHSD, v_BHSD]), ug)
            q_BHSD, k_BHSD, v_BHSD = qkv.split(B)
        # Hybrid: this rank now holds ring shard ring_rank (U cp shards) for H/U heads, and the
        # ring wants the whole sequence's key mask in ring order, which `mask` already is.
        if rg is not None:
            o = ring_attention(q_BHSD, k_BHSD, v_BHSD, mask, rg, self.max_score_elems,
                               self.ring_kernel)
        else:
            o = self.inner(q_BHSD, k_BHSD, v_BHSD, mask)
        return heads_to_seq(o, ug) if ug is not None else o


    def _forward_packed(self, q_BHSD, k_BHSD, v_BHSD, kv_mask_BS, doc_S, runs=None):
        ug, rg = self.ulysses_group, self.ring_group
        if ug is not None and q_BHSD.shape[1] % dist.get_world_size(ug):
            raise ValueError(f"Ulysses context parallel over {dist.get_world_size(ug)} ranks needs the "
                             f"local head count ({q_BHSD.shape[1]}) to divide by it")
        # Sample ids and key mask are tiny: gather them whole, in cp-rank = sequence order. The
        # ring's blocks need the ids; Ulysses' local attention only the runs, when given.
        doc = gather_along(doc_S, 0, self.cp_group) if rg is not None or runs is None else None
        mask = None if kv_mask_BS is None else gather_along(kv_mask_BS.bool(), 1, self.cp_group)
        if ug is not None:
            B = q_BHSD.shape[0]
            q_BHSD, k_BHSD, v_BHSD = seq_to_heads(torch.cat([q_BHSD, k_BHSD, v_BHSD]), ug).split(B)
        if rg is not None:
            o = ring_attention(q_BHSD, k_BHSD, v_BHSD, mask, rg, self.max_score_elems, "math", doc_S=doc,
                               doc_runs=runs)
        else:
            o = self.inner(q_BHSD, k_BHSD, v_BHSD, mask, doc, runs)
        return heads_to_seq(o, ug) if ug is not None else o


def build_cp_attention(meshes, mode: str, inner: Optional[nn.Module] = None, *,
                       max_score_elems: int = DEFAULT_MAX_SCORE_ELEMS,
                       ring_kernel: str = "auto",
                       te_context_parallel: bool = True) -> ContextParallelAttention:
    """The CoreAttention replacement for a sequence sharded over meshes["cp"] (`inner`, default
    SDPA, does the local attention of Ulysses). ulysses / ring use the whole flattened cp group;
    hybrid runs Ulysses over meshes["cp_ulysses"] and the ring over meshes["cp_ring"]. With a TE
    `inner` and te_context_parallel, unmasked batches go through TE's own CP attention instead
    (p2p / a2a / a2a+p2p for ring / ulysses / hybrid, same groups)."""
    if mode not in CP_MODES:
        raise ValueError(f"unknown context-parallel mode {mode!r}; use one of {CP_MODES}")
    cp = meshes["cp"].get_group()
    groups = {"ulysses": dict(ulysses_group=cp), "ring": dict(ring_group=cp),
              "hybrid": dict(ulysses_group=meshes["cp_ulysses"].get_group(),
                             ring_group=meshes["cp_ring"].get_group())}[mode]
    return ContextParallelAttention(mode, cp, inner=inner, max_score_elems=max_score_elems,
                                    ring_kernel=ring_kernel, te_context_parallel=te_context_parallel,
                                    **groups)


def apply_cp_attention(model: nn.Module, meshes, mode: str, ring_kernel: str = "auto",
                       te_context_parallel: bool = True) -> None:
    """Swap each self-attention core for the context-parallel one (cross-attention is
    sequence-local: queries are local tokens, keys the whole caption)."""
    for blk in model.blocks.values():
        blk.attn.core_attention = build_cp_attention(meshes, mode, blk.attn.core_attention,
                                                     ring_kernel=ring_kernel,
                                                     te_context_parallel=te_context_parallel)

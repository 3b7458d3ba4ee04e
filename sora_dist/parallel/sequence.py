"""Where this rank's tokens sit in the sequence, and the moves between layouts.

Under context parallelism (CP) the token sequence is split into contiguous chunks over the CP
group for the whole model (cp rank r holds tokens [r*S/cp, (r+1)*S/cp)); under Megatron sequence
parallelism (SP, with TP) each CP chunk is split again over the TP group outside attention/MLP.
`apply_sequence_sharding` wraps the model's two seams with these moves: `embed()` shards its
tokens and their conditioning, `head()` gathers them back (with the padding dropped). Pipeline
stages that call embed/head themselves, or rebuild the conditioning, use `SequenceSharding`.

Gradient of the gather (see parallelize.py's contract): every CP rank computes the same loss from
the gathered output, so the backward keeps this rank's slice of the gradient times cp; FSDP's (or
finalize_grads') average over DP x CP then equals the mean over DP of the full-sequence gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

from sora_dist.models.attention import doc_runs, window_runs
from sora_dist.parallel.context_parallel.comm import gather_along, local_slice
from sora_dist.parallel.tensor_parallel import local_params


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence; backward keeps this rank's slice of the grad (times
    `grad_scale`), which is right when whatever consumes the gathered tensor is computed
    identically on every CP rank."""

    @staticmethod
    def forward(ctx, x, dim, group, grad_scale):
        ctx.dim, ctx.group, ctx.scale = dim, group, grad_scale
        return gather_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        g = local_slice(grad, ctx.dim, ctx.group).contiguous()
        return (g * ctx.scale if ctx.scale != 1.0 else g), None, None, None


def shard_sequence(x: Optional[torch.Tensor], dim: int, cp_mesh) -> Optional[torch.Tensor]:
    """This CP rank's contiguous chunk of x along dim (tokens, RoPE table, token mask; None
    passes through). Differentiable (a view); the length must divide by the CP size."""
    return None if x is None else local_slice(x, dim, cp_mesh.get_group())


def gather_sequence(x: torch.Tensor, dim: int, cp_mesh, grad_scale: float = 1.0) -> torch.Tensor:
    """Inverse of shard_sequence: the whole sequence on every CP rank (backward slices and
    multiplies by grad_scale)."""
    return _GatherSequence.apply(x, dim, cp_mesh.get_group(), grad_scale)


class SequenceSharding:
    """The token layout of one rank under CP and/or SP.

    `shard()` (after embed): pad the tokens to a multiple of cp (x tp under SP; `token_mask`
    marks the real ones) and keep this rank's chunk: CP chunk by cp rank, then SP chunk by tp
    rank. RoPE and the mask are sharded over CP only, because attention (after the SP
    all-gather) sees the whole CP-local sequence. `gather_tp` then `gather_cp` (around the
    final layer): the inverse, with the padding dropped.
    """

    def __init__(self, tp_mesh, cp_mesh):
        """tp_mesh: the TP mesh when SP is on (else None); cp_mesh: the CP mesh when cp > 1."""
        self.tp_mesh, self.cp_mesh = tp_mesh, cp_mesh
        self.cp = cp_mesh.size() if cp_mesh is not None else 1
        self.multiple = self.cp * (tp_mesh.size() if tp_mesh is not None else 1)

    def shard(self, tokens: torch.Tensor, cond):
        """Full (B, S, D) tokens and their conditioning -> this rank's shard of both."""
        return self.shard_tokens(tokens), self.shard_cond(cond, tokens.shape[0])

    def shard_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = (-tokens.shape[1]) % self.multiple
        if pad:
            tokens = F.pad(tokens, (0, 0, 0, pad))
        if self.cp_mesh is not None:
            tokens = shard_sequence(tokens, 1, self.cp_mesh)
            if self.tp_mesh is None:
                # A view would keep the whole embedded sequence alive through the first block.
                tokens = tokens.clone()
        if self.tp_mesh is not None:
            # Backward all-gathers the token grads, so the embedders' grads stay whole per rank.
            tokens = DTensor.from_local(tokens, self.tp_mesh, (Replicate(),), run_check=False)
            tokens = tokens.redistribute(self.tp_mesh, (Shard(1),)).to_local()
        return tokens

    def shard_cond(self, cond, batch: int):
        """RoPE table and token mask for this rank's CP chunk (a pipeline stage that rebuilds
        the conditioning for the full grid calls this alone)."""
        S = math.prod(cond.grid)
        pad = (-S) % self.multiple
        rope, mask = cond.rope_SP2, cond.token_mask_BS
        if pad:
            rope = F.pad(rope, (0, 0, 0, 0, 0, pad))
            if mask is None:
                mask = torch.ones(batch, S, dtype=torch.bool, device=rope.device)
            mask = F.pad(mask, (0, pad), value=False)
        if self.cp_mesh is not None:
            rope = shard_sequence(rope, 0, self.cp_mesh)
            mask = None if mask is None else shard_sequence(mask, 1, self.cp_mesh).contiguous()
        cond = cond.with_(rope_SP2=rope, token_mask_BS=mask)
        if cond.doc_S is not None:
            # Packed samples: the sample of each token, CP-sharded like the mask (attention sees
            # the CP chunk); padding tokens belong to no sample (-1). Their runs follow on the
            # host: the padded sequence's (self-attention spans it under CP) and this chunk's.
            doc = F.pad(cond.doc_S, (0, pad), value=-1) if pad else cond.doc_S
            runs = cond.doc_runs if cond.doc_runs is not None else doc_runs(cond.doc_S)
            runs = local = window_runs(runs, 0, S + pad)
            if self.cp_mesh is not None:
                doc = shard_sequence(doc, 0, self.cp_mesh).contiguous()
                chunk = (S + pad) // self.cp
                start = dist.get_rank(self.cp_mesh.get_group()) * chunk
                local = window_runs(runs, start, start + chunk)
            cond = cond.with_(doc_S=doc, doc_runs=local, cp_doc_runs=runs)
        if cond.rows_S is not None:
            # Per-token table rows: the head's cover this rank's CP chunk (padding rows point
            # at row 0, their outputs are dropped), the blocks' also the SP shard of it.
            rows = F.pad(cond.rows_S, (0, pad)) if pad else cond.rows_S
            if self.cp_mesh is not None:
                rows = shard_sequence(rows, 0, self.cp_mesh)
            head_rows = rows.contiguous()
            if self.tp_mesh is not None:
                rows = local_slice(rows, 0, self.tp_mesh.get_group())
            cond = cond.with_(rows_S=rows.contiguous(), head_rows_S=head_rows)
        return cond

    def gather_tp(self, tokens: torch.Tensor) -> torch.Tensor:
        """SP token shards -> this rank's whole CP chunk."""
        if self.tp_mesh is not None:
            tokens = DTensor.from_local(tokens, self.tp_mesh, (Shard(1),), run_check=False)
            tokens = tokens.redistribute(self.tp_mesh, (Replicate(),)).to_local()
        return tokens

    def gather_cp(self, x: torch.Tensor, cond) -> torch.Tensor:
        """CP chunks -> the whole sequence, padding dropped. Backward: this rank's slice of the
        (identical on every CP rank) gradient times cp, see the module docstring."""
        if self.cp_mesh is not None:
            x = gather_sequence(x, 1, self.cp_mesh, grad_scale=float(self.cp))
        return x[:, : math.prod(cond.grid)]


def apply_sequence_sharding(model: nn.Module, seq: SequenceSharding) -> None:
    """Wrap the model's embed()/head() seams with seq.shard / gather; embed() also runs with
    TP's directly-read parameters made local (it reads null_text outside any TP module)."""
    orig_embed = model.embed

    def embed(*args, **kwargs):
        with local_params(model):
            tokens, cond = orig_embed(*args, **kwargs)
        return seq.shard(tokens, cond)

    def head(tokens, cond):
        # The final layer is per token: run it on this rank's CP chunk and gather its narrow
        # output (pt*ph*pw*C wide) rather than the D-wide tokens, so no rank ever holds the
        # whole sequence at model width (at 460k tokens that is GiBs per GPU).
        out = model.final(seq.gather_tp(tokens), cond)
        return model.to_latents(seq.gather_cp(out, cond), cond.with_(token_mask_BS=None))

    # Instance attributes shadow the methods; forward() calls self.embed/self.head.
    model.embed = embed
    model.head = head

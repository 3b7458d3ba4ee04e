"""parallelize_dit(): TP/SP -> CP -> activation checkpointing -> compile -> FSDP2 (torchtitan order).

Contract with the trainer: every rank of a DP group feeds the same batch; `model(...)` returns
the full output (B, C, T, H, W) on every rank; after `loss.backward()` call
`finalize_grads(model)` (a no-op under FSDP) and then clip/step. Gradients then equal the
single-process gradient of the loss averaged over all DP ranks' batches.

How gradients come out right:
  * TP: DTensor's autograd sums partial grads of replicated weights over TP (tensor_parallel.py).
  * CP: each CP rank back-propagates only its own tokens, so block/embedder grads are partial
    over CP. FSDP (or finalize_grads) *averages* over DP x CP; to turn that into
    sum-over-CP / mean-over-DP, the CP gather before the head scales the token gradient by
    cp in backward. The final layer runs on each rank's chunk before that gather, so its grads
    are partial over CP like the blocks' and the same scaling completes them. This relies on every
    CP rank computing the same loss from the gathered output (the trainer's contract).
  * The sequence is padded to a multiple of cp (x tp under SP); `token_mask` hides the padding
    from attention keys and the head drops it, so padding changes nothing.

FQNs are unchanged by everything here except activation checkpointing's wrapper prefix,
which torch.distributed.checkpoint's get_state_dict strips, so checkpoints reshard across layouts.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

from sora_dist.config.train import ACTIVATION_CHECKPOINTING
from sora_dist.parallel.fsdp import allreduce_grads, apply_fsdp, fsdp_mesh, mp_policy, reduce_partial_grads
from sora_dist.parallel.rng import (RNGStatesTracker, TrackedDropout, build_rng_tracker, checkpoint_context_fn,
                                   mix_seed)
from sora_dist.parallel.tensor_parallel import apply_tp, local_params


@dataclass
class ParallelInfo:
    """What parallelize_dit did, kept on the model for finalize_grads and for inspection."""
    tp: int
    cp: int
    sequence_parallel: bool
    fsdp: bool
    grad_mesh: Any  # mesh grads are averaged over when FSDP is off (dp_cp), else None
    rng_tracker: RNGStatesTracker


def parallelize_dit(model: nn.Module, pdims, meshes, cfg) -> nn.Module:
    """Apply the layout of `cfg.parallel` to a VideoDiT built identically on every rank (in place;
    returns the model). `pdims`/`meshes` come from ParallelDims.from_config(...).build_mesh(...).
    A model built on the meta device is materialised and initialised at the end."""
    p, t = cfg.parallel, cfg.train
    device_type = meshes.world.device_type
    tp, cp = pdims.tp, pdims.cp
    sp = bool(p.sequence_parallel) and tp > 1
    coords = _coords(meshes, tp, cp)
    tracker = build_rng_tracker(
        t.seed, coords["tp"], coords["cp"] * tp + coords["tp"] if sp else coords["cp"], device_type
    )

    if tp > 1:
        apply_tp(model, meshes["tp"], sp)
    if cp > 1:
        apply_cp_attention(model, meshes, p.cp_mode, p.ring_kernel, p.te_context_parallel)
    install_seams(model, meshes, tp, sp, cp)
    if model.args.dropout > 0 and (sp or cp > 1):
        # Dropout acts on the residual stream, which is token-sharded here: one stream per shard.
        for blk in model.blocks.values():
            blk.mlp.dropout = TrackedDropout(model.args.dropout, tracker, "seq")
    apply_activation_checkpointing(model, t.activation_checkpointing, tracker)
    if t.compile:
        for blk in model.blocks.values():
            blk.compile()  # in place: no "_orig_mod." in FQNs

    use_fsdp = bool(p.fsdp) and pdims.dp * cp > 1
    if use_fsdp:
        apply_fsdp(model, fsdp_mesh(meshes, pdims.dp_replicate), mp_policy(device_type, t.mixed_precision),
                   pipeline=pdims.pp > 1)
    if any(p_.is_meta for p_ in model.parameters()):
        materialize(model, device_type, t.seed)
    grad_mesh = meshes["dp_cp"] if not use_fsdp and pdims.dp * cp > 1 else None
    # object.__setattr__: plain attribute, not a submodule/state.
    object.__setattr__(model, "_sora_parallel", ParallelInfo(tp, cp, sp, use_fsdp, grad_mesh, tracker))
    return model


def materialize(model: nn.Module, device_type: str, seed: int) -> None:
    """A model built under `torch.device("meta")` (no full copy of the weights on any rank)
    gets its shards allocated and initialised here, from `seed` on every rank (DTensor's
    requirement for rank-consistent random ops; the caller's RNG state is left as it was).
    On CUDA, DTensor's RNG tracker draws each shard from one global stream, so the init is
    valid for any layout (though not the same draw as a single-device init). On CPU DTensor
    has no distributed RNG, so each random init of a DTensor parameter draws the whole
    (global-shape) tensor from the seed shared by the ranks and keeps this rank's shard: one
    full parameter at a time, never the whole model. The result is the same for every layout:
    what `init_weights()` gives a plain model from the same seed (stage_seed under PP)."""
    if device_type == "cpu":
        device, devices = torch.device("cpu"), []
    else:
        device = torch.device(device_type, torch.get_device_module(device_type).current_device())
        devices = [device]
    model.to_empty(device=device)
    # A pipeline stage draws from its own seed (mixed with its first block id), or stages would
    # repeat one another's weights; the whole model (first block 0) uses `seed` itself.
    first = min(int(k) for k in model.blocks.keys()) if len(model.blocks) else 0
    stage_seed = seed if first == 0 else mix_seed(seed, first)
    mesh = next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)
    from contextlib import nullcontext

    full_draws = nullcontext()
    with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad():
        if mesh is not None and device_type != "cpu":
            # DTensor's RNG tracker, created lazily, would broadcast rank 0's generator state to
            # every rank (so all pipeline stages would draw stage 0's weights). Creating it here
            # without that sync (what torchtitan does for PP) keeps each stage's own seed; the
            # ranks of one stage share it, as DTensor requires.
            from torch.distributed.tensor import _random as dtensor_random

            dtensor_random.manual_seed(stage_seed, mesh)
        else:
            torch.manual_seed(stage_seed)
            if mesh is not None:
                from torch.distributed.tensor import distribute_tensor
                from torch.overrides import TorchFunctionMode

                # nn.init.normal_/uniform_ hand a DTensor to torch-function modes as themselves
                # (tensor=... keyword), xavier_uniform_ etc. reach Tensor.uniform_ directly.
                draws = (torch.Tensor.uniform_, torch.Tensor.normal_, nn.init.uniform_, nn.init.normal_)

                class _FullDraws(TorchFunctionMode):
                    """A random init of a DTensor: draw the global tensor on every rank (same
                    seed, same order) and keep this rank's shard of it."""

                    def __torch_function__(self, func, types, args=(), kwargs=None):
                        kwargs = dict(kwargs or {})
                        t = kwargs.get("tensor", args[0] if args else None)
                        if func not in draws or not isinstance(t, DTensor):
                            return func(*args, **kwargs)
                        full = torch.empty(t.shape, dtype=t.dtype, device=t.to_local().device)
                        if "tensor" in kwargs:
                            kwargs["tensor"] = full
                        else:
                            args = (full, *args[1:])
                        func(*args, **kwargs)
                        shard = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)
                        t.to_local().copy_(shard.to_local())
                        return t

                full_draws = _FullDraws()
        with full_draws:
            model.init_weights()


def finalize_grads(model: nn.Module) -> None:
    """Call after backward, before clipping. Without FSDP: sums TP-partial grads of replicated
    weights and averages grads over DP x CP. With FSDP (or a single rank) it does nothing."""
    info: Optional[ParallelInfo] = getattr(model, "_sora_parallel", None)
    if info is None or info.fsdp:
        return
    params = [p for p in model.parameters() if p.grad is not None]
    reduce_partial_grads(params)
    if info.grad_mesh is not None:
        allreduce_grads(params, info.grad_mesh.get_group())


def apply_cp_attention(model: nn.Module, meshes, mode: str, ring_kernel: str = "auto",
                       te_context_parallel: bool = True) -> None:
    """Swap each self-attention core for the context-parallel one (cross-attention is
    sequence-local: queries are local tokens, keys the whole caption)."""
    from sora_dist.parallel.context import build_cp_attention

    for blk in model.blocks.values():
        blk.attn.core_attention = build_cp_attention(meshes, mode, blk.attn.core_attention,
                                                     ring_kernel=ring_kernel,
                                                     te_context_parallel=te_context_parallel)


def sac_save_ops() -> set:
    """Ops whose outputs op-level selective checkpointing keeps: the matmuls (nn.Linear lowers
    to mm/addmm; FP8 to _scaled_mm), the fused attention kernels (output and log-sum-exp) and
    ring attention as a whole (parallel/context.py).
    Everything between them (norms, adaLN modulate, RoPE, GELU, gates, casts) is recomputed
    in backward: cheap elementwise work for most of the activation memory."""
    import sora_dist.parallel.context  # noqa: F401  (registers sora_dist::ring_attention)

    aten = torch.ops.aten
    names = ("mm", "addmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    # The ring is one op: its (out, lse) are kept whole, so recompute re-sends no K/V. Under
    # TP+SP the row-parallel outputs' reduce-scatters are kept too (small: token-sharded), so
    # recompute does not repeat them (the all-gathers before column-parallel linears it does).
    return {getattr(aten, n).default for n in names if hasattr(aten, n)} | {
        torch.ops.sora_dist.ring_attention.default,
        torch.ops._c10d_functional.reduce_scatter_tensor.default}


def sac_context_fn(tracker: Optional[RNGStatesTracker]):
    """checkpoint context_fn for op-level SAC, composed with the tracked-RNG replay when the
    block draws from tracked streams (tracker given)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = sac_save_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    if tracker is None:  # plain SAC contexts: what torch.compile can trace through
        return lambda: create_selective_checkpoint_contexts(policy)
    rng = checkpoint_context_fn(tracker)

    def context_fn():
        sac_fwd, sac_rec = create_selective_checkpoint_contexts(policy)
        rng_fwd, rng_rec = rng()
        # The RNG replay clones generator states: outside the SAC mode, which would log them.
        return _both(rng_fwd, sac_fwd), _both(rng_rec, sac_rec)

    return context_fn


@contextmanager
def _both(a, b):
    with a, b:
        yield


def apply_activation_checkpointing(model: nn.Module, mode: str, tracker: RNGStatesTracker) -> None:
    """"full": every block; "selective": every other block; "op": every block, keeping the
    outputs of matmuls and attention kernels (sac_save_ops) and recomputing the rest. Before
    FSDP, so FSDP wraps the wrapper."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing={mode!r}: use one of {ACTIVATION_CHECKPOINTING}")
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, checkpoint_wrapper,
    )

    for i, name in enumerate(list(model.blocks.keys())):
        if mode in ("full", "op") or (mode == "selective" and i % 2 == 0):
            blk = model.blocks[name]
            # Only blocks with tracked-stream dropout (SP/CP) need the RNG replay; without it the
            # contexts are ones torch.compile can trace (the replay clones generator states).
            tracked = any(isinstance(m, TrackedDropout) for m in blk.modules())
            kw = {}
            if mode == "op":
                kw["context_fn"] = sac_context_fn(tracker if tracked else None)
            elif tracked:
                kw["context_fn"] = checkpoint_context_fn(tracker)
            model.blocks[name] = checkpoint_wrapper(
                blk, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True, **kw)


class SequenceSharding:
    """Where this rank's tokens sit in the sequence, and the two moves between layouts.

    `shard()` (after embed): pad the tokens to a multiple of cp (x tp under SP; `token_mask`
    marks the real ones) and keep this rank's chunk: CP chunk by cp rank, then SP chunk by tp
    rank. RoPE and the mask are sharded over CP only, because attention (after the SP
    all-gather) sees the whole CP-local sequence. `gather()` (before head): the inverse, with
    the padding dropped. Pipeline stages that call VideoDiT.embed/head themselves use these.
    """

    def __init__(self, meshes, tp: int, sp: bool, cp: int):
        self.cp = cp
        self.tp_mesh = meshes["tp"] if sp and tp > 1 else None
        self.cp_mesh = meshes["cp"] if cp > 1 else None
        self.cp_rank = self.cp_mesh.get_local_rank() if self.cp_mesh is not None else 0
        self.multiple = cp * (tp if self.tp_mesh is not None else 1)

    def shard(self, tokens: torch.Tensor, cond):
        """Full (B, S, D) tokens and their conditioning -> this rank's shard of both."""
        return self.shard_tokens(tokens), self.shard_cond(cond, tokens.shape[0])

    def shard_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = (-tokens.shape[1]) % self.multiple
        if pad:
            tokens = F.pad(tokens, (0, 0, 0, pad))
        if self.cp_mesh is not None:
            tokens = tokens.chunk(self.cp, 1)[self.cp_rank]
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
            rope = rope.chunk(self.cp, 0)[self.cp_rank]
            mask = None if mask is None else mask.chunk(self.cp, 1)[self.cp_rank].contiguous()
        return cond.with_(rope_SP2=rope, token_mask_BS=mask)

    def gather(self, tokens: torch.Tensor, cond) -> torch.Tensor:
        return self.gather_cp(self.gather_tp(tokens), cond)

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
            from sora_dist.parallel.context import gather_sequence

            x = gather_sequence(x, 1, self.cp_mesh, grad_scale=float(self.cp))
        return x[:, : math.prod(cond.grid)]


def install_seams(model: nn.Module, meshes, tp: int, sp: bool, cp: int) -> None:
    """Wrap the model's embed()/head() seams with SequenceSharding.shard/gather; under TP,
    embed() also runs with the directly-read parameters made local."""
    if tp == 1 and cp == 1:
        return
    seq = SequenceSharding(meshes, tp, sp, cp)
    orig_embed = model.embed

    def embed(*args, **kwargs):
        with local_params(model):
            tokens, cond = orig_embed(*args, **kwargs)
        return seq.shard(tokens, cond)

    def head(tokens, cond):
        # The final layer is per token: run it on this rank's CP chunk and gather its narrow
        # output (pt*ph*pw*C wide) rather than the D-wide tokens, so no rank ever holds the
        # whole sequence at model width (at 460k tokens that is GiBs per GPU).
        out = model.final_layer(seq.gather_tp(tokens), cond.c_BD)
        return model.to_latents(seq.gather_cp(out, cond), cond.with_(token_mask_BS=None))

    # Instance attributes shadow the methods; forward() calls self.embed/self.head.
    model.embed = embed
    model.head = head


def _coords(meshes, tp: int, cp: int) -> dict[str, int]:
    return {
        "tp": meshes["tp"].get_local_rank() if tp > 1 else 0,
        "cp": meshes["cp"].get_local_rank() if cp > 1 else 0,
    }

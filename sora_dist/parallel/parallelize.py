"""parallelize(): the one build path from a single-device VideoDiT to this rank's parallel model,
for any world size (torchtitan's parallelize step: a degree-1 step is a no-op, so one process
takes the same path as 1024).

Per model part (the whole model, or each pipeline stage this rank runs), in this order:
TP/SP -> CP attention -> sequence sharding at the embed/head seams -> per-shard dropout streams
-> activation checkpointing -> compile -> FSDP2 -> materialise (a model built on meta).
What the trainer gets back is a `ParallelModel`: the parts, their RNG trackers, the optional
pipeline, and the two calls of a step (`forward_backward`, `finalize_grads`).

Contract with the trainer: every rank of a DP group feeds the same batch; a part returns the full
output (B, C, T, H, W) on every rank; after backward `finalize_grads()` runs (a no-op under
FSDP), then clip/step. Gradients then equal the single-process gradient of the loss averaged
over all DP ranks' batches.

How gradients come out right:
  * TP: DTensor's autograd sums partial grads of replicated weights over TP (tensor_parallel.py).
  * CP: each CP rank back-propagates only its own tokens, so block/embedder grads are partial
    over CP. FSDP (or finalize_grads) *averages* over DP x CP; to turn that into
    sum-over-CP / mean-over-DP, the CP gather before the head scales the token gradient by
    cp in backward (sequence.py). The final layer runs on each rank's chunk before that
    gather, so its grads are partial over CP like the blocks' and the same scaling completes
    them. This relies on every CP rank computing the same loss from the gathered output.
  * The sequence is padded to a multiple of cp (x tp under SP); `token_mask` hides the padding
    from attention keys and the head drops it, so padding changes nothing.

FQNs are unchanged by everything here except activation checkpointing's wrapper prefix,
which torch.distributed.checkpoint's get_state_dict strips, so checkpoints reshard across layouts.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import _random as dtensor_random
from torch.overrides import TorchFunctionMode

from sora_dist.models.packing import packed_loss
from sora_dist.parallel.activation_checkpoint import apply_activation_checkpointing
from sora_dist.parallel.context_parallel import apply_cp_attention
from sora_dist.parallel.device import autocast
from sora_dist.parallel.dims import ParallelDims
from sora_dist.parallel.fsdp import allreduce_grads, apply_fsdp, fsdp_mesh, mp_policy, reduce_partial_grads
from sora_dist.parallel.grad import clip_grad_norm_
from sora_dist.parallel.pipeline import PipelineRunner
from sora_dist.parallel.rng import RNGStatesTracker, TrackedDropout, build_rng_tracker, mix_seed
from sora_dist.parallel.sequence import SequenceSharding, apply_sequence_sharding
from sora_dist.parallel.tensor_parallel import apply_tp


@dataclass
class ParallelPart:
    """One parallelized model part and what its step needs besides forward/backward."""
    module: nn.Module
    rng_tracker: RNGStatesTracker
    sequence: Optional[SequenceSharding]  # token layout under SP/CP (pipeline stages reuse it)
    fsdp: bool
    grad_mesh: Any  # mesh grads are averaged over when FSDP is off and dp*cp > 1, else None

    def finalize_grads(self) -> None:
        """Without FSDP: sum TP-partial grads of replicated weights, average over DP x CP.
        With FSDP (which reduces in backward) or one process: nothing to do."""
        if self.fsdp:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        reduce_partial_grads(params)
        if self.grad_mesh is not None:
            allreduce_grads(params, self.grad_mesh.get_group())


@dataclass
class ParallelModel:
    """What `parallelize` returns: the one step path for every layout. `model` holds this rank's
    parameters under their full-model names (optimizer, EMA and checkpoints use it); `parts` are
    what runs (the model, or this rank's pipeline stages)."""
    model: nn.Module
    parts: list[ParallelPart]
    pipeline: Optional[PipelineRunner]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autocast: Callable[[], Any]  # the forward's mixed-precision context (bf16 on GPU)
    pp_mesh: Any = None          # PP mesh when pp > 1: stages hold disjoint parameters

    @property
    def rng_trackers(self) -> list[RNGStatesTracker]:
        return [p.rng_tracker for p in self.parts]

    def forward_backward(self, x_t, t, text, text_mask, drop, target, grids=None) -> torch.Tensor:
        """Forward and backward of one batch; returns the detached batch loss (under PP, the
        mean over microbatches, on every PP rank). Autocast covers the forward only: backward
        runs in the dtypes the forward saved (the pipeline schedule interleaves the two, so
        there it covers the schedule). grids: a packed sequence (models/packing.py), whose
        target carries the per-token loss weights (under PP its samples are dealt to the
        microbatches and the loss is still the pack's packed_loss)."""
        if self.pipeline is not None:
            with self.autocast():
                return self.pipeline.step(x_t, t, text, text_mask, drop, target, grids)
        if grids is not None:
            with self.autocast():
                loss = packed_loss(self.model(x_t, t, text, text_mask, drop, grids), target)
            loss.backward()
            return loss.detach()
        with self.autocast():
            loss = self.loss_fn(self.model(x_t, t, text, text_mask, drop), target)
        loss.backward()
        return loss.detach()

    def finalize_grads(self) -> None:
        for p in self.parts:
            p.finalize_grads()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global grad norm over every rank's parameters (clipped in place when max_norm > 0)."""
        return clip_grad_norm_(self.model.parameters(), max_norm, self.pp_mesh)


def parallelize(model: nn.Module, pdims: ParallelDims, cfg, device: torch.device,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> ParallelModel:
    """Apply cfg.parallel / cfg.train's layout to a VideoDiT built identically on every rank (or on
    the meta device). Under PP the model is cut into this rank's stages (the loss runs on the
    last one) and each stage is parallelized like a whole model."""
    pdims.build_mesh(device.type)
    mixed = partial(autocast, device, cfg.train.mixed_precision)
    if pdims.pp > 1:
        p = cfg.parallel
        pp_mesh = pdims.meshes["pp"]
        pipeline = PipelineRunner(model, pp_mesh, device, p.pp_schedule, p.pp_microbatches,
                                  p.pp_virtual_stages, loss_fn,
                                  stage_wrapper=lambda st: parallelize_dit(st, pdims, cfg))
        return ParallelModel(model, pipeline.parts, pipeline, loss_fn, mixed, pp_mesh)
    return ParallelModel(model, [parallelize_dit(model, pdims, cfg)], None, loss_fn, mixed)


def parallelize_dit(model: nn.Module, pdims: ParallelDims, cfg) -> ParallelPart:
    """Apply the layout to one part (a VideoDiT or a pipeline stage with the same seams), in
    place. pdims.build_mesh() must have run. A part built on meta is materialised at the end."""
    p, t = cfg.parallel, cfg.train
    meshes = pdims.meshes
    tp, cp = pdims.tp, pdims.cp
    sp = bool(p.sequence_parallel) and tp > 1
    tp_rank, cp_rank = pdims.local_rank("tp"), pdims.local_rank("cp")
    # The "seq" stream differs per token shard: per CP rank, and per TP rank under SP.
    tracker = build_rng_tracker(t.seed, tp_rank, cp_rank * tp + tp_rank if sp else cp_rank,
                                meshes.device_type)

    if tp > 1:
        apply_tp(model, meshes["tp"], sp)
    if cp > 1:
        apply_cp_attention(model, meshes, p.cp_mode, p.ring_kernel, p.te_context_parallel)
    seq = None
    if tp > 1 or cp > 1:  # (under TP alone: no sharding, but embed() needs local parameters)
        seq = SequenceSharding(meshes["tp"] if sp else None, meshes["cp"] if cp > 1 else None)
        apply_sequence_sharding(model, seq)
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
        apply_fsdp(model, fsdp_mesh(meshes, pdims.dp_replicate),
                   mp_policy(meshes.device_type, t.mixed_precision), pipeline=pdims.pp > 1)
    if any(p_.is_meta for p_ in model.parameters()):
        materialize(model, meshes.device_type, t.seed)
    grad_mesh = meshes["dp_cp"] if not use_fsdp and pdims.dp * cp > 1 else None
    return ParallelPart(model, tracker, seq, use_fsdp, grad_mesh)


# nn.init.normal_/uniform_ hand a DTensor to torch-function modes as themselves (tensor=...
# keyword); xavier_uniform_ etc. reach Tensor.uniform_ directly.
_RANDOM_INITS = (torch.Tensor.uniform_, torch.Tensor.normal_, nn.init.uniform_, nn.init.normal_)


class _FullDraws(TorchFunctionMode):
    """A random init of a DTensor on CPU, where DTensor has no distributed RNG: draw the global
    tensor on every rank (same seed, same order) and keep this rank's shard of it. One
    parameter at a time, never the whole model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        t = kwargs.get("tensor", args[0] if args else None)
        if func not in _RANDOM_INITS or not isinstance(t, DTensor):
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


def materialize(model: nn.Module, device_type: str, seed: int) -> None:
    """A model built under `torch.device("meta")` (no full copy of the weights on any rank)
    gets its shards allocated and initialised here, from `seed` on every rank (DTensor's
    requirement for rank-consistent random ops; the caller's RNG state is left as it was).
    On CUDA, DTensor's RNG tracker draws each shard from one global stream, so the init is
    valid for any layout (though not the same draw as a single-device init). On CPU DTensor
    has no distributed RNG, so each random init of a DTensor parameter draws the whole
    (global-shape) tensor from the seed shared by the ranks and keeps this rank's shard
    (`_FullDraws`). The result is the same for every layout: what `init_weights()` gives a
    plain model from the same seed (stage_seed under PP)."""
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
    full_draws = nullcontext()
    with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad():
        if mesh is not None and device_type != "cpu":
            # DTensor's RNG tracker, created lazily, would broadcast rank 0's generator state to
            # every rank (so all pipeline stages would draw stage 0's weights). Creating it here
            # without that sync (what torchtitan does for PP) keeps each stage's own seed; the
            # ranks of one stage share it, as DTensor requires.
            dtensor_random.manual_seed(stage_seed, mesh)
        else:
            torch.manual_seed(stage_seed)
            if mesh is not None:
                full_draws = _FullDraws()
        with full_draws:
            model.init_weights()

"""Pipeline parallelism for VideoDiT with torch.distributed.pipelining.

The DiT is cut into `pp * virtual` stages of consecutive blocks; the first stage also owns the
patch/timestep/caption embedders, the last the final layer (the loss runs there). Between
stages travel, per sample: the token stream, the timestep vector c and the projected caption
(both with gradients, so the embedders on stage 0 get every stage's gradient contribution and
the text path runs once) and the caption mask as integers. Every PP rank of a DP group holds
the same batch, so each stage knows the latent shape without receiving it; RoPE tables have no
parameters and are rebuilt from the patch grid on each stage.

Packed sequences (data.packing) travel the same way. The pack's whole samples are dealt to the
microbatches, each padded to one shape (models/packing.py:split_pack; a schedule's P2P buffers
are fixed), and the small per-sample metadata, each microbatch's patch grids, reaches every
stage as a schedule kwarg (torch chunks kwargs like the inputs and hands them to every stage),
from which a stage rebuilds the sample ids, table rows and per-sample RoPE; c and the captions
are then tables of one row per sample. The last stage's loss is packed_loss with the pack's
weights, so the microbatch losses sum to the pack's loss.

Parameters keep their full-model FQNs ("blocks.7.attn.wq.weight"): a rank's `model` is the
VideoDiT with the blocks and embedders of other ranks' stages deleted, so checkpoints and
optimizer state are keyed like the unsplit model and load across PP degrees.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import pipelining

from sora_dist.config.parallel import PP_ONE_STAGE_SCHEDULES, PP_SCHEDULES, layout_problems, pp_virtual_stages
from sora_dist.models.dit import Conditioning, VideoDiT
from sora_dist.models.dit import packed_conditioning
from sora_dist.models.embeddings import build_rope_3d
from sora_dist.models.packing import packed_loss, split_pack
from sora_dist.models.wan import frame_rows

# torch's schedule class for each parallel.pp_schedule; the first two run one stage per rank.
SCHEDULE_CLASSES = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B,
                     "interleaved_1f1b": pipelining.ScheduleInterleaved1F1B,
                     "interleaved_zb": pipelining.ScheduleInterleavedZeroBubble,
                     "zbv": pipelining.ScheduleZBVZeroBubble}


def stage_ids_for_rank(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Which global stages a PP rank runs: looped (r, r+pp, ...) or V-shape for ZBV."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(virtual)]


def split_blocks(depth: int, n_stages: int) -> list[list[int]]:
    """Contiguous, balanced block ranges; the first/last stages also carry embed/head, so any
    remainder blocks go to the middle stages."""
    base, extra = divmod(depth, n_stages)
    sizes = [base] * n_stages
    order = sorted(range(n_stages), key=lambda s: (s in (0, n_stages - 1), s))
    for s in order[:extra]:
        sizes[s] += 1
    out, start = [], 0
    for n in sizes:
        out.append(list(range(start, start + n)))
        start += n
    return out


class DiTStage(nn.Module):
    """Runs one stage. Stage 0 takes (x_t, t, text, text_mask, drop); other stages take the
    previous stage's outputs (tokens, c, text_emb, text_mask); the last returns latents.
    `set_shape()` tells every stage the batch's latent (T, H, W) before a schedule runs; a
    packed microbatch instead comes with kwargs grids (its samples' patch grids) and pack_len
    (its padded length), and the last stage returns tokens (models/packing.py)."""

    def __init__(self, model: nn.Module, block_ids: list[int], is_first: bool, is_last: bool):
        super().__init__()
        self.args, self.is_first, self.is_last = model.args, is_first, is_last
        # The model class's own seams (VideoDiT or WanDiT), bound to this stage; instance
        # attributes, so parallelize's sequence sharding wraps them as it wraps a whole model's.
        cls = type(model)
        self._init_part = cls.init_part
        self.embed, self.final, self.head, self.to_latents = (
            cls.embed.__get__(self), cls.final.__get__(self), cls.head.__get__(self), cls.to_latents.__get__(self))
        self.blocks = nn.ModuleDict({str(i): model.blocks[str(i)] for i in block_ids})
        if is_first:
            self.x_embedder, self.t_embedder, self.y_embedder = model.x_embedder, model.t_embedder, model.y_embedder
            self.null_text = model.null_text
        if is_last:
            self.final_layer = model.final_layer
        self.shape_THW = self.grid = None

    def init_weights(self, zero_init=None) -> None:
        """The model's init of this stage's parts (train.meta_init materialises stages)."""
        self._init_part(self, self.args.zero_init if zero_init is None else zero_init)

    seq = None  # SequenceSharding under TP/CP: set by PipelineRunner from parallelize_dit's result

    def set_shape(self, shape_THW: tuple[int, int, int]) -> None:
        self.shape_THW = tuple(shape_THW)
        self.grid = tuple(-(-n // p) for n, p in zip(shape_THW, self.args.patch_size))

    def _cond_from_wire(self, c, text_emb, text_mask, grids=None, pack_len=None) -> Conditioning:
        if grids is not None:  # a packed microbatch: c (1, Kp, ...) and the captions per sample
            cond = packed_conditioning(c[0], text_emb, text_mask.bool(), grids, self.args.head_dim, pack_len)
            return cond if self.seq is None else self.seq.shard_cond(cond, 1)
        rope = build_rope_3d(self.grid, self.args.head_dim, c.device)
        # A per-frame table (B, T, 7, D) (WanDiT's per-frame timesteps) comes with its token rows,
        # which depend on the grid alone.
        rows = frame_rows(self.grid, c.device) if c.ndim == 4 else None
        cond = Conditioning(c_BD=c, text_BLD=text_emb, text_mask_BL=text_mask.bool(), rope_SP2=rope,
                            grid=self.grid, shape_THW=self.shape_THW, rows_S=rows, head_rows_S=rows)
        if self.seq is not None:
            # The received tokens are this rank's SP/CP shard: give RoPE and the padding mask
            # the same layout stage 0's embed seam gave them.
            cond = self.seq.shard_cond(cond, c.shape[0])
        return cond

    def forward(self, *inputs, grids=None, pack_len=None):
        if self.is_first:
            x_t, t, text, text_mask, drop = inputs
            tokens, cond = self.embed(x_t, t, text, text_mask.bool(), drop.bool(), grids)
        else:
            tokens, c, text_emb, text_mask = inputs
            cond = self._cond_from_wire(c, text_emb, text_mask, grids, pack_len)
        for blk in self.blocks.values():
            tokens = blk(tokens, cond)
        if self.is_last:
            return self.head(tokens, cond)
        # The integer mask travels without gradients; c and text_emb carry theirs back.
        return tuple(_wire(x) for x in (tokens, cond.c_BD, cond.text_BLD, cond.text_mask_BL.long()))


def _wire(x: torch.Tensor) -> torch.Tensor:
    """A stage output as P2P takes it: dense (the patch embedding's token view is strided) and
    not a view (zero-bubble schedules detach outputs in place, which a view refuses; a pack's
    per-sample table c_BD is a (1, K, ...) view)."""
    x = x.contiguous()
    return x.clone() if x._base is not None else x


def prune_model(model: VideoDiT, keep_blocks: set[int], first: bool, last: bool) -> None:
    """Delete what this rank does not run, keeping the remaining FQNs unchanged."""
    for name in list(model.blocks.keys()):
        if int(name) not in keep_blocks:
            del model.blocks[name]
    if not first:
        model.x_embedder = model.t_embedder = model.y_embedder = None
        del model.null_text
        model.register_parameter("null_text", None)
    if not last:
        model.final_layer = None


class PipelineRunner:
    """Holds this rank's stages and builds one schedule per input shape (bucketed batches and
    packs' padded microbatches change the P2P buffer shapes, and torch's stages infer shapes
    once), cached by shape. `loss_fn(output, target)` runs on the last stage (the objective's
    loss; a pack's is packed_loss)."""

    # Schedules kept at once, least recently used dropped first: each holds its stages' P2P
    # buffers (one set per microbatch). Bucketed runs have a few shapes, packed runs a few padded
    # lengths; a rebuilt schedule re-infers its shapes (one microbatch forward+backward).
    MAX_SCHEDULES = 16

    def __init__(self, model: VideoDiT, pp_mesh, device, schedule: str, microbatches: int, virtual: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 stage_wrapper: Optional[Callable] = None):
        """stage_wrapper(stage) parallelizes one stage in place and returns its ParallelPart
        (parallelize.parallelize_dit); without one, stages run as they are."""
        if schedule not in PP_SCHEDULES:
            raise ValueError(f"parallel.pp_schedule={schedule!r}: use one of {PP_SCHEDULES}")
        self.pp = pp_mesh.size()
        self.pp_rank = pp_mesh.get_local_rank()
        self.group = pp_mesh.get_group()
        self.device, self.schedule_name, self.microbatches = device, schedule, microbatches
        self.loss_fn = loss_fn
        a = model.args
        # validate() checked the config with the same rules; this guards direct use.
        problems = layout_problems(heads=a.num_heads, mlp_width=a.mlp_width, depth=a.depth, pp=self.pp,
                                   pp_schedule=schedule, virtual=virtual, microbatches=microbatches)
        if problems:
            raise ValueError(problems[0])
        virtual = pp_virtual_stages(schedule, virtual)
        self.n_stages = self.pp * virtual
        ranges = split_blocks(model.args.depth, self.n_stages)
        self.stage_ids = stage_ids_for_rank(self.pp_rank, self.pp, virtual, schedule)
        self.stages = [DiTStage(model, ranges[s], s == 0, s == self.n_stages - 1) for s in self.stage_ids]
        # TP / CP / FSDP / recompute applied per stage module (in place).
        self.parts = [stage_wrapper(st) for st in self.stages] if stage_wrapper is not None else []
        for st, part in zip(self.stages, self.parts):
            # A wrapper may re-register the stage's direct parameter (TP/FSDP make DTensor
            # params): point the model at it so optimizer/checkpoint see the live one.
            if st.is_first:
                model.register_parameter("null_text", st.null_text)
            st.seq = part.sequence
        keep = {b for s in self.stage_ids for b in ranges[s]}
        prune_model(model, keep, 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids)
        self.has_first = 0 in self.stage_ids
        self.has_last = self.n_stages - 1 in self.stage_ids
        self._schedules: OrderedDict = OrderedDict()

    # Schedules kept at once, least recently used dropped first: each holds its stages' P2P
    # buffers (one set per microbatch). Bucketed runs have a few shapes, packed runs a few padded
    # lengths; a rebuilt schedule re-infers its shapes (one microbatch forward+backward).
    MAX_SCHEDULES = 16

    def _schedule(self, key, packed: bool):
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        stages = [pipelining.PipelineStage(m, s, self.n_stages, self.device, group=self.group)
                  for m, s in zip(self.stages, self.stage_ids)]
        single = self.schedule_name in PP_ONE_STAGE_SCHEDULES
        self._schedules[key] = SCHEDULE_CLASSES[self.schedule_name](
            stages[0] if single else stages, self.microbatches,
            loss_fn=self._packed_loss if packed else self.loss_fn, scale_grads=True)
        if len(self._schedules) > self.MAX_SCHEDULES:
            self._schedules.popitem(last=False)
        return self._schedules[key]

    def _packed_loss(self, out_1LP: torch.Tensor, target_1LP1: torch.Tensor) -> torch.Tensor:
        """A packed microbatch's loss: its samples' share of the pack's packed_loss (the targets
        carry the whole pack's weights) times the microbatch count, because the schedule
        averages the microbatch losses (and scales the grads by 1/microbatches)."""
        return packed_loss(out_1LP, target_1LP1) * self.microbatches

    def step(self, x_t, t, text, text_mask, drop, target, grids=None) -> torch.Tensor:
        """Forward+backward of one batch over all microbatches. Returns the batch loss (mean of
        the microbatch losses) on every PP rank. grids: the batch is one pack (models/packing.py)
        whose samples split_pack deals to the microbatches; the loss is then its packed_loss."""
        kwargs = {}
        if grids is None:
            for st in self.stages:
                st.set_shape(x_t.shape[-3:])
        else:
            # Every PP rank of a DP group holds the same pack, so each deals it the same way and
            # passes each microbatch's grids to its own stages.
            x_t, t, text, text_mask, drop, grids, target = split_pack(
                self.microbatches, x_t, t, text, text_mask, drop, grids, target)
            kwargs = {"grids": grids, "pack_len": x_t.shape[1]}
        key = (grids is not None, tuple(x_t.shape), tuple(text.shape))
        sched = self._schedule(key, grids is not None)
        losses: list = []
        args = (x_t, t, text, text_mask.long(), drop.long()) if self.has_first else ()
        sched.step(*args, target=target if self.has_last else None, losses=losses if self.has_last else None,
                   **kwargs)
        loss = torch.stack([l.detach().float() for l in losses]).mean() if self.has_last else torch.zeros((), device=x_t.device)
        loss = loss.to(x_t.device)
        # The loss lives on the last stage; share it with the other PP ranks for logging.
        dist.all_reduce(loss, group=self.group)
        return loss

"""Sampling at training scale: the denoiser under the training engine's TP/SP/CP layouts, plus
classifier-free-guidance parallelism and data parallelism over prompts.

World = prompt groups x cfg (2 with CFG-parallel, else 1) x cp x tp, laid out like training's
mesh with dp = prompt groups x cfg (cfg innermost of dp), so `parallelize_dit` builds the model
exactly as for training. Within a prompt group every rank feeds the same batch:
  * TP/CP ranks split the model and the token sequence (every rank gets the full output);
  * with CFG-parallel, the two halves run the conditional and the unconditional pass of each
    step on their own ranks, then swap outputs (one all-gather per step over a 2-rank group).
Prompt groups take whole sampler batches in turn (batch j -> group j % groups), so each batch
is sampled exactly as one process would (same seed, same batch), and nothing twice.

Weights: built on the meta device, sharded, then filled from the run's DCP checkpoint (any
training layout; EMA when asked) without a gather to one rank; FSDP (parallel.fsdp=true) keeps
them sharded over the data-parallel ranks for models whose weights do not fit one device.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from sora_dist.parallel.dims import ParallelDims


@dataclass
class SamplingLayout:
    pdims: ParallelDims
    groups: int               # prompt groups (data parallel over batches)
    group: int                # this rank's prompt group
    cfg_parallel: bool
    branch: int               # 0: conditional pass, 1: unconditional (CFG-parallel only)
    cfg_group: Any            # the 2-rank group exchanging the two passes, or None
    writer: bool              # tp = cp = branch = 0: decodes and writes the group's videos
    group_ranks: list         # global ranks of this prompt group, the writer first

    def batches(self, n_batches: int) -> list[int]:
        return [j for j in range(n_batches) if j % self.groups == self.group]


def build_sampling_layout(parallel_cfg, cfg_parallel: bool, world: int, device_type: str) -> SamplingLayout:
    """The sampling mesh for `world` ranks (parallel.tp/cp/cp_mode/ulysses_degree; parallel.dp
    = -1 or the number of prompt groups x 2 with CFG-parallel)."""
    p = copy.deepcopy(parallel_cfg)
    if p.pp != 1:
        raise ValueError(f"parallel.pp={p.pp}: sampling runs without pipeline stages; use tp/cp (and fsdp) instead")
    cfg = 2 if cfg_parallel else 1
    model_ranks = p.tp * p.cp
    if world % (model_ranks * cfg):
        raise ValueError(f"world size {world} is not divisible by tp*cp*cfg = {p.tp}*{p.cp}*{cfg}; launch a "
                         f"multiple of {model_ranks * cfg} processes or change parallel.tp/cp/cfg_parallel")
    p.dp = world // model_ranks
    p.dp_replicate = 1
    pdims = ParallelDims.from_config(p, world)
    pdims.build_mesh(device_type)
    rank = dist.get_rank() if dist.is_initialized() else 0
    c = pdims.coords(rank)
    groups, group, branch = pdims.dp // cfg, c["dp"] // cfg, c["dp"] % cfg
    cfg_group = None
    if cfg == 2:
        # One 2-rank group per (prompt group, cp, tp) coordinate; every rank creates all of them.
        ranks_of = {}
        for r in range(world):
            rc = pdims.coords(r)
            ranks_of.setdefault((rc["dp"] // 2, rc["cp"], rc["tp"]), []).append(r)
        for key in sorted(ranks_of):
            g = dist.new_group(ranks_of[key])
            if rank in ranks_of[key]:
                cfg_group = g
    writer = c["tp"] == 0 and c["cp"] == 0 and branch == 0
    members = sorted((r for r in range(world) if pdims.coords(r)["dp"] // cfg == group),
                     key=lambda r: (pdims.coords(r)["dp"] % cfg, pdims.coords(r)["cp"], pdims.coords(r)["tp"]))
    return SamplingLayout(pdims, groups, group, cfg == 2, branch, cfg_group, writer, members)


class CFGParallel(torch.nn.Module):
    """The denoiser of one CFG branch: `guide(scale)` gives the guided prediction from this rank's
    pass (conditional or unconditional) and the partner's, exchanged by one all-gather."""

    def __init__(self, model: torch.nn.Module, branch: int, group):
        super().__init__()
        self.model, self.branch, self.group = model, branch, group

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def guide(self, scale: float) -> Callable:
        def fn(x, t, text, text_mask):
            if scale == 1.0:  # no guidance: both halves compute the conditional pass
                return self.model(x, t, text, text_mask)
            drop = torch.full((x.shape[0],), bool(self.branch), dtype=torch.bool, device=x.device)
            mine = self.model(x, t, text, text_mask, drop).contiguous()
            both = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(both, mine, group=self.group)
            cond, uncond = both
            return uncond + scale * (cond - uncond)
        return fn


def parallel_denoiser(job, parallel_cfg, layout: SamplingLayout, load: Callable[[torch.nn.Module], None],
                      device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The run's model (job: its JobConfig) built on meta, parallelized for sampling (no
    recompute, no compile, fp32 on CPU / the run's mixed precision on GPU) and filled by
    `load(model)` (a DCP load: every rank reads its own shards)."""
    from sora_dist.models import build_model
    from sora_dist.parallel.parallelize import parallelize_dit

    jcfg = copy.deepcopy(job)
    jcfg.parallel = copy.deepcopy(parallel_cfg)
    jcfg.parallel.pp, jcfg.parallel.dp = 1, layout.pdims.dp
    jcfg.parallel.dp_replicate = 1
    jcfg.train.activation_checkpointing, jcfg.train.compile, jcfg.train.seed = "none", False, seed
    if device.type == "cpu":
        jcfg.train.mixed_precision = "fp32"
    if layout.pdims.world_size == 1:
        part_module = build_model(jcfg.model).to(device)
    else:
        with torch.device("meta"):
            model = build_model(jcfg.model)
        part_module = parallelize_dit(model, layout.pdims, jcfg).module
    load(part_module)
    part_module.eval().requires_grad_(False)
    if layout.cfg_parallel:
        return CFGParallel(part_module, layout.branch, layout.cfg_group)
    return part_module


def gather_records(records: list[dict], layout: SamplingLayout) -> Optional[list[dict]]:
    """Every writer's records on global rank 0 (None elsewhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return records
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, records if layout.writer else [])
    return [r for part in out for r in part] if dist.get_rank() == 0 else None

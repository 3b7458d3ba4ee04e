"""Config checks that run before any allocation. Each error names the field and the fix."""
from __future__ import annotations

import os
from typing import Optional

from sora_dist.config.data import DATA_SOURCES, SHARDS_MANIFEST
from sora_dist.config.diffusion import BETA_SCHEDULES, FLOW_GRIDS, OBJECTIVES, SAMPLERS
from sora_dist.config.model import (ARCHS, ATTENTION_BACKENDS, FP8_LINEARS, FP8_RECIPES, SDPA_KERNELS, DiTArgs,
                                    shape_problems)
from sora_dist.config.parallel import (BACKENDS, CP_MODES, PP_SCHEDULES, PP_ZERO_BUBBLE_SCHEDULES, RING_KERNELS,
                                       layout_problems)
from sora_dist.config.train import ACTIVATION_CHECKPOINTING, DEVICES, MIXED_PRECISIONS


class ConfigError(ValueError):
    """A config value that cannot work; the message says which field and how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_none(problems: list[str]) -> None:
    """Raise the first of a shared rule's problems (config/model.py, config/parallel.py)."""
    if problems:
        raise ConfigError(problems[0])


def either(options, quote: bool = False) -> str:
    """("a", "b", "c") -> "a, b or c" (quoted: "'a', 'b' or 'c'"), for "use ..." messages."""
    words = [repr(o) if quote else o for o in options]
    return ", ".join(words[:-1]) + " or " + words[-1]


def validate(cfg, world_size: Optional[int] = None) -> None:
    """Validate a JobConfig. With world_size, also check the parallel layout against it."""
    m, p, d, diff, o, t = cfg.model, cfg.parallel, cfg.data, cfg.diffusion, cfg.optim, cfg.train
    try:
        dims = m.resolved()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    hidden, heads, depth = dims["hidden_size"], dims["num_heads"], dims["depth"]
    _check_none(shape_problems(hidden, heads, depth))
    args = DiTArgs.from_config(m)
    head_dim = args.head_dim
    # 3D RoPE splits the rotary half-dims over (t, h, w); it needs an even head dim >= 6.
    _check(head_dim % 2 == 0 and head_dim >= 6,
           f"model: head dim hidden_size/num_heads={head_dim} must be even and >= 6 for 3D RoPE")
    _check(len(m.patch_size) == 3 and all(int(x) >= 1 for x in m.patch_size),
           f"model.patch_size={list(m.patch_size)} must be three positive ints [pt, ph, pw]")
    _check(m.in_channels >= 1, f"model.in_channels={m.in_channels} must be >= 1")
    _check(m.text_dim >= 1, f"model.text_dim={m.text_dim} must be >= 1")
    _check(m.arch in ARCHS, f"model.arch={m.arch!r}: use {either(ARCHS, True)}")
    _check(m.ffn_dim is None or m.ffn_dim >= 1, f"model.ffn_dim={m.ffn_dim} must be >= 1 (or null: mlp_ratio)")
    if m.init_from is not None:
        _check(m.arch == "wan",
               f"model.init_from={m.init_from!r} loads diffusers WanTransformer3DModel weights; it needs "
               f"model.arch=wan (a wan* flavor), not {m.arch!r}")
        _check(os.path.isfile(os.path.join(m.init_from, "config.json")),
               f"model.init_from={m.init_from!r} has no config.json; point it at a diffusers transformer "
               f"folder (e.g. /models/Wan2.1-T2V-1.3B-Diffusers/transformer)")
        _check(not cfg.train.init_from,
               f"model.init_from (diffusers weights) and train.init_from={cfg.train.init_from!r} (a run's "
               f"checkpoint) both set the initial weights; keep one")
        # Config, files, headers (truncation) and every key/shape, read from headers only.
        from sora_dist.models.wan_weights import init_from_problems
        _check_none(init_from_problems(m.init_from, args))
    _check(m.sdpa_kernel in SDPA_KERNELS,
           f"model.sdpa_kernel={m.sdpa_kernel!r}: use {either(SDPA_KERNELS)}")
    _check(m.attention_backend in ATTENTION_BACKENDS,
           f"model.attention_backend={m.attention_backend!r}: use {either(ATTENTION_BACKENDS, True)}")
    _check(m.fp8_linears in FP8_LINEARS,
           f"model.fp8_linears={m.fp8_linears!r}: use {either(FP8_LINEARS, True)}")
    _check(m.fp8_recipe in FP8_RECIPES,
           f"model.fp8_recipe={m.fp8_recipe!r}: use {either(FP8_RECIPES, True)}")
    _check(not m.fp8_attention or m.attention_backend == "te",
           "model.fp8_attention=true needs model.attention_backend=te (SDPA has no FP8 path)")
    uses_te_fp8 = m.fp8_attention or m.fp8_linears == "te"
    # Delayed scaling all-reduces amax histories when each FP8 region exits; under PP or CP the
    # ranks run different regions, so those collectives would not line up.
    _check(not (uses_te_fp8 and m.fp8_recipe == "delayed" and (p.pp > 1 or p.cp > 1)),
           f"model.fp8_recipe=delayed with parallel.pp={p.pp} / parallel.cp={p.cp}: its amax "
           f"reductions do not line up across pipeline stages / TE context parallelism; use "
           f"model.fp8_recipe=current")
    if m.fp8_linears != "none":
        # FP8 GEMMs need both weight dims divisible by 16; otherwise no block linear converts.
        _check(hidden % 16 == 0,
               f"model.fp8_linears={m.fp8_linears} needs model.hidden_size={hidden} divisible by 16")
        # te.Linear does its own tensor parallelism and is not a DTensor-TP module.
        _check(m.fp8_linears != "te" or p.tp == 1,
               f"model.fp8_linears=te does not compose with DTensor tensor parallel "
               f"(parallel.tp={p.tp}); use parallel.tp=1 or model.fp8_linears=torchao")

    _check(diff.objective in OBJECTIVES,
           f"diffusion.objective={diff.objective!r}: use {either(OBJECTIVES, quote=True)}")
    _check(diff.beta_schedule in BETA_SCHEDULES,
           f"diffusion.beta_schedule={diff.beta_schedule!r}: use {either(BETA_SCHEDULES, quote=True)}")
    _check(diff.num_timesteps >= 2, f"diffusion.num_timesteps={diff.num_timesteps} must be >= 2")
    _check(0.0 <= diff.caption_dropout < 1.0,
           f"diffusion.caption_dropout={diff.caption_dropout} must be in [0, 1)")
    ok_samplers = SAMPLERS[diff.objective]
    _check(diff.sampler in ok_samplers,
           f"diffusion.sampler={diff.sampler!r} does not fit objective={diff.objective!r}; "
           f"use one of {list(ok_samplers)}")
    _check_none(flow_problems(diff))

    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(o.decay in ("cosine", "constant"), f"optim.decay={o.decay!r}: use 'cosine' or 'constant'")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 = off)")

    _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _check(t.device in DEVICES, f"train.device={t.device!r}: use {either(DEVICES)}")
    _check(t.mixed_precision in MIXED_PRECISIONS,
           f"train.mixed_precision={t.mixed_precision!r}: use {either(MIXED_PRECISIONS, quote=True)}")
    _check(t.activation_checkpointing in ACTIVATION_CHECKPOINTING,
           f"train.activation_checkpointing={t.activation_checkpointing!r}: use {either(ACTIVATION_CHECKPOINTING)}")
    # TE attention is no aten op the SAC policy could keep: op would recompute attention itself.
    _check(not (t.activation_checkpointing == "op" and m.attention_backend == "te"),
           "train.activation_checkpointing=op needs model.attention_backend=sdpa (transformer-engine "
           "attention would be recomputed in backward); use activation_checkpointing=selective|full "
           "with te")
    # Zero-bubble schedules run a block's backward in two passes (inputs, then weights); op-level
    # checkpointing's cached outputs can serve only one (torch raises "backward an extra time").
    _check(not (t.activation_checkpointing == "op" and p.pp > 1
                and p.pp_schedule in PP_ZERO_BUBBLE_SCHEDULES),
           f"train.activation_checkpointing=op does not combine with parallel.pp_schedule="
           f"{p.pp_schedule} (it splits each backward in two passes); use 1f1b / interleaved_1f1b / "
           f"gpipe, or activation_checkpointing=full|selective")
    tracked_dropout = m.dropout > 0 and ((p.tp > 1 and p.sequence_parallel) or p.cp > 1)
    _check(not (t.activation_checkpointing != "none" and t.compile and tracked_dropout),
           f"train.activation_checkpointing={t.activation_checkpointing} with train.compile cannot "
           f"replay the per-shard dropout streams of SP/CP (model.dropout>0); use "
           f"train.compile=false, activation_checkpointing=none or model.dropout=0")
    _check(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    _check(t.ckpt_keep >= 1, f"train.ckpt_keep={t.ckpt_keep} must be >= 1")
    if t.meta_init:
        _check(m.fp8_linears != "te", "train.meta_init=true does not combine with model.fp8_linears=te "
                                      "(te.Linear is not materialised by the DiT init); use "
                                      "model.fp8_linears=torchao or train.meta_init=false")

    lg = cfg.logging
    _check(lg.sample_every >= 0, f"logging.sample_every={lg.sample_every} must be >= 0")
    if lg.sample_every:
        _check(d.source == "shards",
               "logging.sample_every needs the run's VAE and text encoder, which come from the shard "
               "manifest: use data.source=shards, or set logging.sample_every=0")
        _check(len(lg.sample_prompts) > 0, "logging.sample_prompts is empty")
    _check(d.source in DATA_SOURCES, f"data.source={d.source!r}: use {either(DATA_SOURCES, quote=True)}")
    _check(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1")
    # Whether to pack (data.packing=null: by the data's sizes) and the budget (0: from the longest
    # sample), T/H/W divisibility and per-sample length are settled where the samples are known:
    # by the loaders at load time (data/packing.py resolve_packing; each error names the sample).
    _check(d.packing in (None, True, False), f"data.packing={d.packing!r}: use true, false or null (auto)")
    _check(d.tokens_per_rank >= 0, f"data.tokens_per_rank={d.tokens_per_rank} must be >= 0 (0: data.batch_size "
                                   "x the longest sample's tokens)")
    if d.packing is not False:
        _check(d.pack_window >= 1, f"data.pack_window={d.pack_window} must be >= 1 (e.g. 64)")
        _check(d.pack_balance in ("flops", "tokens"), f"data.pack_balance={d.pack_balance!r}: use flops "
               "(DP ranks agree on the step's modelled cost) or tokens (each rank fills its own budget)")
        _check(d.pack_attention_cost is None or d.pack_attention_cost > 0,
               f"data.pack_attention_cost={d.pack_attention_cost} must be > 0 (the time of an attention "
               "FLOP in linear FLOPs, e.g. 1.0), or null for the precisions' default")
    if d.source == "shards":
        _check(bool(d.shards), "data.source=shards needs data.shards=<folder written by sora-encode>")
        _check_none(shards_problems(d.shards))
    else:
        _check(len(d.synthetic_buckets) > 0 and all(len(b) == 3 for b in d.synthetic_buckets),
               f"data.synthetic_buckets={d.synthetic_buckets} must be a list of [T, H, W]")
        _check(d.text_len >= 1, f"data.text_len={d.text_len} must be >= 1")

    for name in ("tp", "cp", "pp", "dp_replicate", "ulysses_degree", "pp_microbatches",
                 "pp_virtual_stages"):
        _check(getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1")
    _check(p.dp == -1 or p.dp >= 1, f"parallel.dp={p.dp} must be >= 1 or -1 (fill the world)")
    _check(p.cp_mode in CP_MODES, f"parallel.cp_mode={p.cp_mode!r}: use {either(CP_MODES)}")
    _check(p.ring_kernel in RING_KERNELS,
           f"parallel.ring_kernel={p.ring_kernel!r}: use {either(RING_KERNELS)}")
    _check(p.backend in BACKENDS, f"parallel.backend={p.backend!r}: use {either(BACKENDS)}")
    _check(p.pp_schedule in PP_SCHEDULES,
           f"parallel.pp_schedule={p.pp_schedule!r}: use one of {list(PP_SCHEDULES)}")
    # The same rules the planner applies to its candidate layouts.
    _check_none(layout_problems(
        heads=heads, mlp_width=args.mlp_width, depth=depth, tp=p.tp, cp=p.cp, cp_mode=p.cp_mode,
        hybrid_degree=p.ulysses_degree, pp=p.pp, pp_schedule=p.pp_schedule,
        virtual=p.pp_virtual_stages, microbatches=p.pp_microbatches))
    # Bucket batches split into the microbatches; a pack's samples are dealt to them. With
    # data.packing=null the data decides at load time, so batches must be able to split.
    if p.pp > 1 and d.packing is not True:
        for key, bs in [("", d.batch_size)] + sorted(getattr(d, "bucket_batch_size", {}).items()):
            _check(bs % p.pp_microbatches == 0,
                   f"data.{'bucket_batch_size[' + key + ']' if key else 'batch_size'}={bs} must divide "
                   f"into parallel.pp_microbatches={p.pp_microbatches} for bucket batches (or set "
                   "data.packing=true: a pack's samples are dealt to the microbatches)")
    if world_size is not None:
        check_world(p, world_size)


def flow_problems(diff) -> list[str]:
    """Rectified flow's shift, t_range and flow_grid ([] when they are fine)."""
    tr = list(diff.t_range)
    if not (diff.shift > 0):
        return [f"diffusion.shift={diff.shift} must be > 0 (1.0 = off; Wan uses 3.0 at 480p, 5.0 at 720p)"]
    if not (len(tr) == 2 and all(isinstance(v, (int, float)) for v in tr) and 0.0 <= tr[0] < tr[1] <= 1.0):
        return [f"diffusion.t_range={tr} must be two numbers [lo, hi] with 0 <= lo < hi <= 1 "
                f"(e.g. [0.875, 1.0] for Wan2.2's high-noise expert)"]
    if diff.flow_grid not in FLOW_GRIDS:
        return [f"diffusion.flow_grid={diff.flow_grid!r}: use {either(FLOW_GRIDS, quote=True)}"]
    if diff.objective != "flow":
        # Each flow-only field set away from its default, with the value that turns it off.
        for name, value, off in (("shift", diff.shift, 1.0), ("t_range", [float(v) for v in tr], [0.0, 1.0]),
                                 ("flow_grid", diff.flow_grid, "uniform")):
            if value != off:
                return [f"diffusion.{name}={value!r} applies to rectified flow only, not "
                        f"objective={diff.objective!r}; use diffusion.objective=flow (sampler=euler) "
                        f"or diffusion.{name}={off!r}"]
    elif (tr[0], tr[1]) != (0.0, 1.0) and not diff.logit_std > 0:
        return [f"diffusion.t_range={tr} truncates the logit-normal t, which needs "
                f"diffusion.logit_std={diff.logit_std} > 0; set logit_std > 0 or t_range=[0.0, 1.0]"]
    return []


def resolve_dp(p, world_size: int) -> int:
    """The data-parallel degree: explicit, or what the world leaves after tp*cp*pp."""
    mp = p.tp * p.cp * p.pp
    if p.dp == -1:
        _check(world_size % mp == 0,
               f"world size {world_size} is not divisible by tp*cp*pp={p.tp}*{p.cp}*{p.pp}={mp}; "
               f"launch a multiple of {mp} processes or change parallel.tp/cp/pp")
        return world_size // mp
    return p.dp


def shards_problems(path: str) -> list[str]:
    """Why data.shards cannot be read ([] when it can): a plain file-system look, so a missing or
    unfinished sora-encode output stops the run before any process group (the loader's
    data/shards.load_manifest resolves the path the same way: a folder, or its manifest)."""
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
    elif os.path.isdir(path):
        folder = path
    else:
        return [f"data.shards={path!r}: no such folder; point data.shards at the folder sora-encode "
                f"wrote (its encode.out_dir), or run sora-encode to write it there"]
    if not os.path.isfile(os.path.join(folder, SHARDS_MANIFEST)):
        return [f"data.shards={path!r}: no {SHARDS_MANIFEST} there, so sora-encode has not finished "
                f"(rank 0 writes it when every rank is done); run sora-encode to completion, or point "
                f"data.shards at the folder it wrote"]
    return []


def check_world(p, world_size: int) -> None:
    dp = resolve_dp(p, world_size)
    _check(p.tp * p.cp * p.pp * dp == world_size,
           f"tp*cp*pp*dp = {p.tp}*{p.cp}*{p.pp}*{dp} = {p.tp * p.cp * p.pp * dp} != world size "
           f"{world_size}; set parallel.dp=-1 or launch {p.tp * p.cp * p.pp * dp} processes")
    _check(dp % p.dp_replicate == 0,
           f"dp={dp} is not divisible by parallel.dp_replicate={p.dp_replicate}")

"""Candidate layouts (tp x cp x pp x dp x recompute), their memory per GPU and step time, and
a pick.

Memory per GPU (FSDP2 over dp*cp, as parallel/fsdp.py shards it):
  * params fp32 (they are the AdamW master copy), grads fp32, AdamW exp_avg + exp_avg_sq fp32,
    EMA fp32 (train.ema_decay > 0), all / (dp*cp); TP-split weights also / tp, adaLN, norms and
    the embedders are replicated over TP (tensor_parallel.py);
  * FSDP working set: bf16 all-gathered weights of two blocks (current + prefetch) and one
    block's unsharded grads (bf16 + fp32 for the reduce-scatter);
  * activations: saved tensors of one microbatch x layers on the stage x microbatches in flight
    (1F1B: pp on the first stage), plus the recomputed block and the backward working set.
Layouts are rejected by the rules config validation applies (config/parallel.py
layout_problems), plus the planner's own: the GPU count and TP inside a node.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from sora_dist.config.model import FLAVORS, DiTArgs, shape_problems
from sora_dist.config.parallel import layout_problems
from sora_dist.planning.flops import RECOMPUTES, step_flops
from sora_dist.planning.memory import (
    PRECISIONS, backward_working_bytes, recompute_transient_bytes, saved_bytes_parts,
)

GiB = 2**30
# TP stays inside a node (its collectives are per layer).
GPUS_PER_NODE = 8
# What a production run feeds the model: T5-XXL caption embeddings, up to 300 caption tokens
# (PixArt / Open-Sora use 120-300), 16-channel VAE latents (Wan / CogVideoX).
T5_XXL_DIM = 4096
CAPTION_TOKENS = 300
LATENT_CHANNELS = 16


# Wan's captions: umT5-XXL, padded to 512 tokens.
WAN_TEXT_TOKENS = 512


def flavor_model(flavor: str, **fields) -> DiTArgs:
    """DiTArgs of a FLAVORS size with production inputs (T5-XXL text, 16 latent channels; a
    Wan flavor's own inputs); `fields` that are not None override either."""
    given = {k: v for k, v in fields.items() if v is not None}
    production = {} if FLAVORS.get(flavor, {}).get("arch") == "wan" else {
        "text_dim": T5_XXL_DIM, "in_channels": LATENT_CHANNELS}
    return DiTArgs.from_flavor(flavor, **{**production, **given})


def vae_stride(flavor: str) -> tuple[int, int, int]:
    """Pixels per latent (t, h, w) of the VAE a flavor is paired with: Wan2.2-TI2V-5B's VAE
    compresses 4x16x16, the Wan2.1 VAE (and CogVideoX-like ones) 4x8x8."""
    return (4, 16, 16) if flavor == "wan2.2-5b" else (4, 8, 8)


def video_tokens(m: DiTArgs, frames: int, height: int, width: int, stride=(4, 8, 8)) -> int:
    """Tokens of one clip: causal VAE latents (1 + (frames-1)/st frames), then the patch (padded
    up, as PatchEmbed3D does)."""
    st, sh, sw = stride
    T, H, W = 1 + (frames - 1) // st, -(-height // sh), -(-width // sw)
    pt, ph, pw = m.patch_size
    return -(-T // pt) * -(-H // ph) * -(-W // pw)


@dataclass(frozen=True)
class Hardware:
    gpus: int
    mem_gib: float = 80.0
    peak_tflops_bf16: float = 989.0    # H100 SXM dense
    peak_tflops_fp8: float = 1979.0
    mfu: float = 0.4                   # of executed FLOPs (recompute included)
    gpus_per_node: int = GPUS_PER_NODE
    reserve_gib: float = 3.0           # CUDA context, NCCL buffers, allocator slack
    headroom: float = 0.10             # keep this share of memory free


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int
    recompute: str = "none"
    cp_mode: str = "ulysses"
    ulysses: int = 1
    microbatches: int = 1


@dataclass
class Plan:
    layout: Layout
    ok: bool
    why: str = ""
    mem: dict = field(default_factory=dict)     # GiB by kind
    model_tflop: float = 0.0                    # per step, all GPUs
    exec_tflop: float = 0.0
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    activation_parts: dict = field(default_factory=dict)  # GiB: blocks, embed, head

    @property
    def total_gib(self) -> float:
        return sum(self.mem.values())


def cp_attention_mode(heads: int, tp: int, cp: int, gpus_per_node: int) -> tuple[str, int, str]:
    """Pick how CP runs attention: Ulysses when tp*cp divides the heads and fits in a node,
    else hybrid with the largest in-node Ulysses degree, else ring. Returns (mode, ulysses, why
    not Ulysses)."""
    if cp == 1:
        return "ulysses", 1, ""
    if heads % (tp * cp) == 0 and tp * cp <= gpus_per_node:
        return "ulysses", cp, ""
    for u in range(cp - 1, 1, -1):
        if cp % u == 0 and heads % (tp * u) == 0 and tp * u <= gpus_per_node:
            return "hybrid", u, f"heads={heads} % (tp*cp)={tp * cp} != 0 or tp*cp > node"
    return "ring", 1, f"no Ulysses degree divides heads/tp={heads // tp} within a node"


def check_layout(m: DiTArgs, lay: Layout, hw: Hardware) -> str:
    """'' when the layout can run, else why not: the first of config validation's problems
    (the planner runs 1F1B, one stage per rank), or of the planner's own rules."""
    if lay.tp * lay.cp * lay.pp * lay.dp != hw.gpus:
        return f"tp*cp*pp*dp={lay.tp * lay.cp * lay.pp * lay.dp} != gpus={hw.gpus}"
    problems = shape_problems(m.hidden_size, m.num_heads, m.depth) or layout_problems(
        heads=m.num_heads, mlp_width=m.mlp_width, depth=m.depth, tp=lay.tp, cp=lay.cp,
        cp_mode=lay.cp_mode, hybrid_degree=lay.ulysses, pp=lay.pp, microbatches=lay.microbatches)
    if lay.tp > hw.gpus_per_node:
        problems.append(f"tp={lay.tp} > GPUs per node={hw.gpus_per_node}")
    return problems[0] if problems else ""


def estimate(m: DiTArgs, lay: Layout, hw: Hardware, tokens: int, micro_batch: int,
             attn_dtype: str = "bf16", ema: bool = True, text_len: int = CAPTION_TOKENS) -> Plan:
    """Memory per GPU (worst stage: the first, which holds the embedders, ceil(depth/pp) blocks
    and pp microbatches in flight), FLOPs and step time of one layout."""
    why = check_layout(m, lay, hw)
    if why:
        return Plan(lay, False, why)
    prec = PRECISIONS["cuda_fp8attn" if attn_dtype == "fp8" else "cuda_bf16"]
    tp, cp, pp = lay.tp, lay.cp, lay.pp
    shard = lay.dp * cp  # FSDP shards over dp x cp (dp_shard_cp)
    layers = math.ceil(m.depth / pp)
    split, repl = m.block_params()
    embed_p, head_p = m.outer_params()
    stage_params = layers * (split / tp + repl) + embed_p + (head_p if pp == 1 else 0)
    mem = {
        "params": stage_params * 4 / shard,
        "grads": stage_params * 4 / shard,
        "optim": stage_params * 8 / shard,
        "ema": stage_params * 4 / shard if ema else 0.0,
        # Two gathered blocks in bf16 + one block's unsharded grads (bf16 + fp32 reduce copy).
        "fsdp_buffers": (split / tp + repl) * (2 * 2 + 2 + 4) if shard > 1 else 0.0,
    }
    # Activations: one microbatch's saved tensors on this stage, times microbatches in flight.
    in_flight = min(pp, lay.microbatches) if pp > 1 else 1
    parts = saved_bytes_parts(m, prec, tokens, text_len, micro_batch, tp, cp, True, lay.recompute,
                              layers=layers, head=pp == 1)
    mem["activations"] = in_flight * sum(parts.values())
    local = math.ceil(tokens / (cp * tp)) * tp  # this CP rank's tokens
    mem["bwd_transient"] = recompute_transient_bytes(m, prec, lay.recompute, tokens, text_len,
                                                     local * micro_batch, micro_batch, tp) \
        + backward_working_bytes(m, prec, local * micro_batch, tp)
    mem = {k: v / GiB for k, v in mem.items()}
    mem["reserve"] = hw.reserve_gib

    samples = lay.dp * lay.microbatches * micro_batch
    model_f, exec_f = step_flops(m, tokens, text_len, samples, lay.recompute)
    peak_attn = hw.peak_tflops_fp8 if attn_dtype == "fp8" else hw.peak_tflops_bf16
    per_gpu_s = (exec_f.linear / (hw.peak_tflops_bf16 * 1e12)
                 + exec_f.attention / (peak_attn * 1e12)) / (hw.mfu * hw.gpus)
    bubble = (lay.microbatches + pp - 1) / lay.microbatches if pp > 1 else 1.0
    step_s = per_gpu_s * bubble
    plan = Plan(lay, True, "", mem, model_f.total / 1e12, exec_f.total / 1e12, step_s,
                samples * tokens / step_s, {k: in_flight * v / GiB for k, v in parts.items()})
    limit = hw.mem_gib * (1 - hw.headroom)
    if plan.total_gib > limit:
        plan.ok = False
        plan.why = f"needs {plan.total_gib:.1f} GiB > {limit:.1f} GiB ({hw.mem_gib:g} x {1 - hw.headroom:.0%})"
    return plan


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# The planner's --cp-mode: "auto" picks per layout (Ulysses, hybrid or ring), the others force one.
PLANNER_CP_MODES = ("auto", "ulysses", "ring")


def candidate_layouts(m: DiTArgs, hw: Hardware, microbatches: Optional[int] = None,
                      recomputes=RECOMPUTES, cp_mode: str = "auto") -> list[Layout]:
    """Every (tp, cp, pp, dp, recompute) with tp*cp*pp*dp = gpus. cp_mode "auto" picks the
    attention per layout (cp_attention_mode); "ulysses"/"ring" force it (Ulysses then needs
    heads % (tp*cp) == 0). Divisibility is checked later so rejected layouts show why."""
    if cp_mode not in PLANNER_CP_MODES:
        raise ValueError(f"cp_mode={cp_mode!r}: use one of {PLANNER_CP_MODES}")
    heads = m.num_heads
    out = []
    for tp in _divisors(hw.gpus):
        for cp in _divisors(hw.gpus // tp):
            for pp in _divisors(hw.gpus // (tp * cp)):
                dp = hw.gpus // (tp * cp * pp)
                if cp_mode == "auto" and heads % tp == 0:
                    mode, u, _ = cp_attention_mode(heads, tp, cp, hw.gpus_per_node)
                else:
                    mode, u = ("ring", 1) if cp_mode == "ring" else ("ulysses", cp)
                mb = microbatches or (2 * pp if pp > 1 else 1)
                for rc in recomputes:
                    out.append(Layout(tp, cp, pp, dp, rc, mode, u, mb))
    return out


def plan_all(m: DiTArgs, hw: Hardware, tokens: int, micro_batch: int = 1,
             attn_dtype: str = "bf16", microbatches: Optional[int] = None,
             ema: bool = True, cp_mode: str = "auto", text_len: int = CAPTION_TOKENS) -> list[Plan]:
    return [estimate(m, lay, hw, tokens, micro_batch, attn_dtype, ema, text_len)
            for lay in candidate_layouts(m, hw, microbatches, cp_mode=cp_mode)]


def recommend(plans: list[Plan]) -> Optional[Plan]:
    """Fits (with headroom), then highest throughput (within 1%), then the smallest tp, pp and
    cp: TP/PP/CP communication is not in the MFU figure, so the fewer model-parallel ranks the
    better; CP grows only as far as memory needs; then the least recompute (op's elementwise
    replay is not in the FLOPs either)."""
    fits = [p for p in plans if p.ok]
    if not fits:
        return None
    best = max(p.tokens_per_s for p in fits)
    top = [p for p in fits if p.tokens_per_s >= 0.99 * best]
    return min(top, key=lambda p: (p.layout.tp, p.layout.pp, p.layout.cp,
                                   RECOMPUTES.index(p.layout.recompute), p.total_gib))

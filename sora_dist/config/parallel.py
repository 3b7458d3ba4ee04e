"""Parallel layout. world = dp_replicate * dp_shard * pp * cp * tp (TP innermost, then CP, PP, DP).

Also the layout's option lists and rules, written once here (torch-free): config/validate.py
checks a config with them, the parallel/ code that runs a layout imports them, and the planner
(sora_dist/planning) rejects candidate layouts with the same `layout_problems`.
"""
from __future__ import annotations

from dataclasses import dataclass

# Process-group backend: "auto" is nccl on CUDA, gloo on CPU (parallel/device.py).
BACKENDS = ("auto", "gloo", "nccl")
# Context-parallel attention: all-to-all seq<->heads, K/V rotation, or Ulysses inside ring.
CP_MODES = ("ulysses", "ring", "hybrid")
# Ring attention's per-block kernel (parallel/context_parallel/kernels.py picks the fused op per device).
RING_KERNELS = ("auto", "fused", "math")
# Pipeline schedules (torch.distributed.pipelining), by how many stages each rank runs:
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")
PP_ONE_STAGE_SCHEDULES = ("gpipe", "1f1b")                     # exactly one
PP_INTERLEAVED_SCHEDULES = ("interleaved_1f1b", "interleaved_zb")  # pp_virtual_stages >= 2
# zbv always runs two, in a V. The zero-bubble ones split each backward in two passes (input,
# then weight grads), which op-level activation checkpointing cannot serve.
PP_ZERO_BUBBLE_SCHEDULES = ("interleaved_zb", "zbv")


def ulysses_degree(cp_mode: str, cp: int, hybrid_degree: int) -> int:
    """The Ulysses (all-to-all) part of the CP degree; the ring part is cp // this.
    hybrid_degree is parallel.ulysses_degree, read only by cp_mode=hybrid."""
    if cp_mode not in CP_MODES:
        raise ValueError(f"parallel.cp_mode={cp_mode!r}: use one of {CP_MODES}")
    return {"ulysses": cp, "ring": 1, "hybrid": hybrid_degree}[cp_mode]


def pp_virtual_stages(schedule: str, virtual: int) -> int:
    """Stages each PP rank runs: zbv always 2 (V-shape), the others parallel.pp_virtual_stages."""
    return 2 if schedule == "zbv" else virtual


def pp_min_virtual_stages(schedule: str) -> int:
    """The fewest stages per rank a schedule can run (what its bubble is simulated with)."""
    return 1 if schedule in PP_ONE_STAGE_SCHEDULES else 2


def pp_schedule_problems(schedule: str, virtual: int) -> list[str]:
    """Why `schedule` cannot run `virtual` stages per rank ([] when it can); `virtual` as
    pp_virtual_stages() resolves it."""
    if schedule in PP_ONE_STAGE_SCHEDULES and virtual != 1:
        return [f"parallel.pp_schedule={schedule} runs one stage per rank; set "
                f"parallel.pp_virtual_stages=1 or use interleaved_1f1b"]
    if schedule in PP_INTERLEAVED_SCHEDULES and virtual < 2:
        return [f"parallel.pp_schedule={schedule} needs parallel.pp_virtual_stages >= 2"]
    return []


def layout_problems(*, heads: int, mlp_width: int, depth: int, tp: int = 1, cp: int = 1,
                    cp_mode: str = "ulysses", hybrid_degree: int = 1, pp: int = 1,
                    pp_schedule: str = "1f1b", virtual: int = 1,
                    microbatches: int = 1) -> list[str]:
    """Why a layout cannot split a model of these sizes ([] when it can), in the order
    validate() reports them. TP splits heads and the MLP width; Ulysses moves whole heads
    between the tp*ulysses ranks; PP needs a block per stage and a microbatch per rank."""
    out = []
    if cp_mode == "hybrid" and cp % hybrid_degree:
        out.append(f"parallel.cp={cp} is not divisible by parallel.ulysses_degree={hybrid_degree}")
    ulysses = ulysses_degree(cp_mode, cp, hybrid_degree)
    if heads % (tp * ulysses):
        out.append(f"model.num_heads={heads} is not divisible by tp*ulysses={tp}*{ulysses}; "
                   f"change parallel.tp / parallel.cp (Ulysses degree) or model.num_heads")
    if mlp_width % tp:
        out.append(f"MLP width {mlp_width} (hidden*mlp_ratio) is not divisible by parallel.tp={tp}")
    if pp > 1:
        virtual = pp_virtual_stages(pp_schedule, virtual)
        out += pp_schedule_problems(pp_schedule, virtual)
        if depth < pp * virtual:
            out.append(f"model depth={depth} < pp*pp_virtual_stages={pp * virtual}: fewer stages")
        if microbatches < pp:
            out.append(f"parallel.pp_microbatches={microbatches} must be >= parallel.pp={pp}")
    return out


@dataclass
class ParallelConfig:
    # Tensor-parallel degree (heads and MLP width split over it). Keep inside a node.
    tp: int = 1
    # Megatron sequence parallel over the TP group (norms/adaLN/residual sharded by tokens).
    sequence_parallel: bool = True
    # Context-parallel degree (token sequence split over it for the whole block).
    cp: int = 1
    # CP attention: "ulysses" (all-to-all seq<->heads), "ring" (K/V rotation) or "hybrid".
    cp_mode: str = "ulysses"
    # For cp_mode=hybrid: the Ulysses (inner, intra-node) degree; ring degree = cp / ulysses_degree.
    ulysses_degree: int = 1
    # Ring attention block kernel: "auto" (fused SDPA kernel returning the log-sum-exp where the
    # device has one, else math), "fused" (error if none) or "math" (fp32 torch, reference).
    ring_kernel: str = "auto"
    # With model.attention_backend=te and cp > 1: transformer-engine's own CP attention (p2p /
    # a2a / a2a+p2p for ring / ulysses / hybrid; FP8 when enabled) for unmasked batches. False:
    # sora_dist's CP around TE's local attention.
    te_context_parallel: bool = True
    # Pipeline-parallel degree (blocks split into stages).
    pp: int = 1
    # Pipeline schedule: "gpipe", "1f1b" (one stage per rank), "interleaved_1f1b",
    # "interleaved_zb" (pp_virtual_stages per rank) or "zbv" (always 2 stages per rank, V-shape).
    pp_schedule: str = "1f1b"
    # Microbatches per step for PP (must be >= pp).
    pp_microbatches: int = 1
    # Virtual stages per PP rank (interleaved schedules).
    pp_virtual_stages: int = 1
    # Data-parallel degree; -1 = whatever is left of the world size.
    dp: int = -1
    # HSDP: number of FSDP replicas (shard inside, replicate across). 1 = plain FSDP over dp.
    dp_replicate: int = 1
    # Shard parameters/grads/optimizer over DP with FSDP2 (ZeRO-3). False = replicate (DDP-like).
    fsdp: bool = True
    # "gloo", "nccl" or "auto" (nccl when CUDA is present).
    backend: str = "auto"
    # Seconds before a collective times out (a dead rank makes the others fail, not hang).
    timeout_s: int = 600

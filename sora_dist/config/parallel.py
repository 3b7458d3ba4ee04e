"""Parallel layout. world = dp_replicate * dp_shard * pp * cp * tp (TP innermost, then CP, PP, DP)."""
from __future__ import annotations

from dataclasses import dataclass


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

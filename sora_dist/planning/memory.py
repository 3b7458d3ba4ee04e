"""Activation memory: the bytes autograd saves, per tensor, as VideoDiT's forward makes them.

One term per saved storage, read off models/dit.py (views share their base's storage and count
once), checked against the real model with saved_tensors_hooks (planning/measure.py,
tests/unit/test_planner.py). What is not measured here is said where it is assumed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from sora_dist.config.model import T_FREQ_DIM, DiTArgs
from sora_dist.planning.flops import recomputed_fraction


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of saved tensor.

    cpu_fp32: everything fp32 (CPU runs fp32; measured in the tests).
    cuda_bf16: CUDA autocast bf16 with FSDP bf16 parameters, derived from the autocast op lists
    (not measurable on a CPU machine; tools/bench_step.py prints measured vs estimate on CUDA):
      layer_norm and pow run in fp32, so LayerNorm saves an fp32 copy of its input and its fp32
      output feeds modulate (fp32); each Linear then saves its own bf16 cast of that input
      (autocast caches casts of parameters only, so q, k and v each keep one); RMSNorm saves
      its fp32 upcast and a bf16 product; RoPE runs in fp32 but saves only its cos/sin table.
    """
    act: int = 4            # matmul outputs, attention q/k/v/o, residual stream
    fp32: int = 4           # RMSNorm rsqrt, attention LSE, RoPE table
    ln_stats: int = 4       # LayerNorm mean/rstd (fp32 on CUDA; the input dtype on CPU)
    ln_in: int = 4          # LayerNorm's saved input
    ln_out: int = 4         # LayerNorm output saved by modulate's multiply
    lin_in: int = 4         # a Linear's saved input after a norm/modulate (one cast per Linear)
    lin_in_copies_qkv: int = 1  # storages saved for q/k/v's shared input
    rms_up: int = 4         # RMSNorm's fp32 view/copy of its input
    attn_qkvo: int = 4      # q, k, v, o as the attention kernel saves them (fp8: 1)
    rope_copy: int = 0      # FSDP2 casts each block's inputs, Conditioning included, to
                            # param_dtype: every block saves its own bf16 copy of the RoPE table


PRECISIONS = {
    "cpu_fp32": Precision(),
    # bf16 weights and inputs without autocast (CPU): checks the dtype split of the terms
    # above (RMSNorm's fp32 upcast next to its bf16 product, fp32 LSE/rsqrt/RoPE) on CPU.
    "cpu_bf16": Precision(act=2, ln_stats=2, ln_in=2, ln_out=2, lin_in=2, attn_qkvo=2),
    "cuda_bf16": Precision(act=2, ln_in=4, ln_out=4, lin_in=2, lin_in_copies_qkv=3, rms_up=4,
                           attn_qkvo=2, rope_copy=2),
    # TE FP8 attention keeps q/k/v/o in fp8; everything else as bf16.
    "cuda_fp8attn": Precision(act=2, ln_in=4, ln_out=4, lin_in=2, lin_in_copies_qkv=3, rms_up=4,
                              attn_qkvo=1, rope_copy=2),
}


@dataclass(frozen=True)
class BlockActs:
    """Saved bytes of one DiTBlock, split by how TP with sequence parallel shards them."""
    seq_sharded: float   # residual-stream side (token-sharded over TP under SP), per token
    gathered: float      # inputs of column-parallel linears: all-gathered, full on every TP rank
    head_sharded: float  # inside attention/MLP: split by heads / MLP width over TP, per token
    per_sample: float    # adaLN and the caption side of cross-attention, per sample
    per_sample_head_sharded: float
    per_position: float = 0.0  # per sequence position, shared by the samples (RoPE table copy)

    def bytes(self, tokens: int, samples: int, tp: int, sp: bool = True) -> float:
        """tokens: this CP rank's tokens of all `samples` samples. Without SP the residual
        side is replicated over TP instead of token-sharded."""
        seq = self.seq_sharded / tp if sp else self.seq_sharded
        return (tokens * (seq + self.gathered + self.head_sharded / tp)
                + samples * (self.per_sample + self.per_sample_head_sharded / tp)
                + tokens // samples * self.per_position)


def block_activations(m: DiTArgs, attn_backend: str, prec: Precision, kv_len: int,
                      text_len: int) -> BlockActs:
    """Bytes of the tensors one DiTBlock saves for backward.

    attn_backend: "flash" (GPU flash / cuDNN / mem-efficient, and torch's CPU flash kernel: saves
    q, k, v, o and the fp32 log-sum-exp, no S^2 term) or "math" (SDPA's math path: saves scaled
    copies of q and k, v and the softmax probabilities, (heads x kv_len) per query, instead of
    o and the LSE). kv_len: keys each query sees in self-attention (this CP rank's sequence
    after the Ulysses all-to-all = the whole sequence). text_len: caption tokens.
    """
    D, F, H, L = m.hidden_size, m.mlp_width, m.num_heads, text_len
    p = prec
    flash = attn_backend == "flash"
    if attn_backend not in ("flash", "math"):
        raise ValueError(f"attn_backend={attn_backend!r}: use flash or math")
    stats = 2 * p.ln_stats  # LayerNorm mean + rstd, one each per token
    # Residual side: norm1 input/stats/output (modulate keeps it), the wo output (kept by the
    # gate multiply), norm_cross input/stats, norm2 input/stats/output, fc2 output (gate).
    seq = (p.ln_in * D + stats + p.ln_out * D + p.act * D
           + p.ln_in * D + stats
           + p.ln_in * D + stats + p.ln_out * D + p.act * D)
    # Gathered inputs of q/k/v, cross q and fc1.
    gathered = p.lin_in * D * (p.lin_in_copies_qkv + 1 + 1)
    # q/k RMSNorm: input (fp32), rsqrt, normalised product (kept by `* weight`).
    rms = (p.rms_up * D + p.fp32 * H + p.act * D) if m.qk_norm else 0
    if flash:
        # Self: q, k (RoPE outputs), v, o, LSE; then o reshaped for wo.
        self_attn = 2 * rms + 4 * p.attn_qkvo * D + p.fp32 * H + p.act * D
        # Cross: q (as the kernel keeps it), o, LSE. q is a transposed view of (B, S, H, hd),
        # the kernel's o follows q's layout, so wo's input is a view of o (self-attention's q
        # comes out of RoPE contiguous in (B, H, S, hd): there the reshape copies).
        cross = rms + 2 * p.attn_qkvo * D + p.fp32 * H
    else:
        # Math path: q*scale, k*scale, v, probs (heads x keys per query); o reshaped for wo.
        self_attn = 2 * rms + 3 * p.act * D + p.act * H * kv_len + p.act * D
        cross = rms + p.act * D + p.act * H * L + p.act * D
    mlp = p.act * F * 2  # fc1 output (GELU input), GELU output (fc2 input)
    head_sharded = self_attn + cross + mlp
    # Per sample: adaLN SiLU output, its 6*D output (gates are views), 1+scale twice.
    per_sample = p.act * (D + 6 * D + 2 * D)
    # Caption side of cross-attention: k projection, its RMSNorm terms, k/v as attention keeps
    # them (math: scaled k and v), and the key mask converted to an additive float mask (flash).
    k_rms = (p.rms_up * D + p.fp32 * H + p.act * D) if m.qk_norm else 0
    per_sample_heads = L * (k_rms + 2 * p.attn_qkvo * D) if flash else L * (k_rms + 2 * p.act * D)
    per_sample += L * p.act if flash else 0
    return BlockActs(seq, gathered, head_sharded, per_sample, per_sample_heads,
                     m.head_dim * p.rope_copy)


def outer_activations(m: DiTArgs, prec: Precision, seq: int, text_len: int,
                      samples: int) -> tuple[float, float]:
    """(embed side, head side) saved bytes for `samples` samples of `seq` tokens. The embedders
    run on the whole sequence before it is sharded; the final layer runs on each rank's CP
    chunk (parallel/sequence.py gathers its narrow output), so callers pass the chunk for the head."""
    D, C, P, L, p = m.hidden_size, m.in_channels, m.patch_volume, text_len, prec
    blocks = m.depth > 0  # the RoPE table and projected caption are saved by blocks only
    embed = (seq * C * P * p.act                                 # latents (conv input)
             + T_FREQ_DIM * p.act + 2 * D * p.act                # timestep MLP: freq, SiLU in/out
             + L * (m.text_dim + 2 * D) * p.act                  # caption MLP: input, GELU in/out
             + (L * D * p.act if blocks else 0)                  # projected caption (k/v input)
             + D * p.act) * samples \
        + (seq * m.head_dim * p.fp32 if blocks else 0)          # RoPE cos/sin, one per batch
    # Final layer: its input, LayerNorm stats/output, modulated input of the linear; per
    # sample SiLU(c) and 1+scale.
    head = (seq * (p.ln_in * D + 2 * p.ln_stats + p.ln_out * D + p.lin_in * D)
            + 2 * D * p.act) * samples
    return embed, head


def saved_bytes_per_microbatch(
    m: DiTArgs, prec: Precision, seq: int, text_len: int, batch: int, tp: int = 1, cp: int = 1,
    sp: bool = True, recompute: str = "none", attn_backend: str = "flash",
    layers: Optional[int] = None, embed: bool = True, head: bool = True,
) -> float:
    """Saved bytes of one microbatch on one rank holding `layers` blocks (default: all), with
    the embedders (`embed`) and/or the final layer (`head`), as parallel/sequence.py lays it out:
    the sequence is padded to a multiple of cp*tp (SP), each CP rank keeps its chunk."""
    return sum(saved_bytes_parts(m, prec, seq, text_len, batch, tp, cp, sp, recompute,
                                 attn_backend, layers, embed, head).values())


def saved_bytes_parts(
    m: DiTArgs, prec: Precision, seq: int, text_len: int, batch: int, tp: int = 1, cp: int = 1,
    sp: bool = True, recompute: str = "none", attn_backend: str = "flash",
    layers: Optional[int] = None, embed: bool = True, head: bool = True,
) -> dict[str, float]:
    """saved_bytes_per_microbatch by part: blocks, embedders, final layer."""
    tp_seq = tp if sp else 1  # token sharding of the residual stream over TP
    padded = math.ceil(seq / (cp * tp_seq)) * cp * tp_seq
    local = padded // cp
    layers = m.depth if layers is None else layers
    acts = block_activations(m, attn_backend, prec, padded, text_len)
    n_rec = round(recomputed_fraction(layers, recompute) * layers)
    embed_b, _ = outer_activations(m, prec, padded, text_len, batch)
    _, head_b = outer_activations(m, prec, local, text_len, batch)
    kept_input = checkpoint_input_bytes(m, prec, local * batch, tp_seq, batch)
    if recompute == "op":
        blocks = layers * (kept_input + sac_block_bytes(m, prec, local * batch, batch, tp, text_len))
    else:
        blocks = (layers - n_rec) * acts.bytes(local * batch, batch, tp, sp) + n_rec * kept_input
    return {
        "blocks": blocks,
        "embed": embed_b if embed else 0.0,
        # The final layer runs on this rank's CP chunk (gathered over TP under SP).
        "head": head_b if head else 0.0,
    }


def estimate_saved_bytes(m: DiTArgs, seq: int, text_len: int, batch: int, recompute: str = "none",
                         attn_backend: str = "flash", precision: str = "cpu_fp32",
                         tp: int = 1, cp: int = 1, sp: bool = True) -> float:
    """What one VideoDiT forward saves for backward on one rank (the figure planning/measure.py
    measures), by precision profile name."""
    return saved_bytes_per_microbatch(m, PRECISIONS[precision], seq, text_len, batch, tp, cp, sp,
                                      recompute, attn_backend)


def checkpoint_input_bytes(m: DiTArgs, prec: Precision, tokens: int, tp: int,
                           samples: int = 1) -> float:
    """A fully recomputed block keeps only its input (the token-sharded residual stream), and
    under FSDP the checkpoint holds its bf16 RoPE copy (per position, `samples` share it)."""
    return tokens * m.hidden_size * prec.act / tp + tokens // samples * m.head_dim * prec.rope_copy


def sac_block_bytes(m: DiTArgs, prec: Precision, tokens: int, samples: int, tp: int,
                    text_len: int) -> float:
    """What op-level selective checkpointing keeps of one block (activation_checkpoint.sac_save_ops):
    the outputs of its matmuls and attention kernels. tokens: this CP rank's tokens of all
    samples. Column-parallel outputs (q, k, v, cross q, fc1) and the attention outputs / LSE
    split over TP by heads; row-parallel outputs (wo, cross wo, fc2) are each rank's full-size
    partial sums before the reduce-scatter, whose token-sharded results are kept as well under
    TP; per sample: the adaLN projection, caption k / v."""
    D, F, H, L, p = m.hidden_size, m.mlp_width, m.num_heads, text_len, prec
    head_sharded = (4 * D + F) * p.act + 2 * D * p.attn_qkvo + 2 * H * p.fp32
    row_parallel = 3 * D * p.act * (1 + 1 / tp if tp > 1 else 1)
    per_sample = 6 * D * p.act + L * 2 * D * p.act / tp
    return tokens * (head_sharded / tp + row_parallel) + samples * per_sample


def recompute_transient_bytes(m: DiTArgs, prec: Precision, recompute: str, kv_len: int,
                              text_len: int, tokens: int, samples: int, tp: int) -> float:
    """What a recomputed block rebuilds while its backward runs: all its activations ("full",
    "selective"), or those op-level checkpointing did not keep ("op"); nothing without recompute."""
    if recompute == "none":
        return 0.0
    block = block_activations(m, "flash", prec, kv_len, text_len).bytes(tokens, samples, tp)
    if recompute == "op":
        return max(0.0, block - sac_block_bytes(m, prec, tokens, samples, tp, text_len))
    return block


def backward_working_bytes(m: DiTArgs, prec: Precision, tokens: int, tp: int) -> float:
    """Gradients live at once inside one block's backward, beyond the saved tensors: the MLP
    hidden's grad pair (fc2 input grad, GELU input grad) and a few residual-size grads:
    2*mlp/tp + 4*hidden elements per token (12*hidden at mlp_ratio 4). Measured on CPU (fwd+bwd
    peak minus saved tensors minus the recomputed block, tools/bench_step.py): 4.7 to 6.3 x hidden
    per token, 14 x hidden once (3 recomputed blocks, hidden 128), so this is about the worst case."""
    return tokens * (2 * m.mlp_width / tp + 4 * m.hidden_size) * prec.act

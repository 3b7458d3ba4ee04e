"""Parallel-layout planner for VideoDiT: memory per GPU, FLOPs per step, estimated step time.

Pure arithmetic (no torch at import), so `tools/plan.py` answers in milliseconds. Every formula
follows the model's actual forward (models/dit.py) and the framework's actual parallelism
(parallel/): the activation term is a list of the tensors autograd saves, one entry per saved
storage, checked against the real VideoDiT with saved_tensors_hooks (`measure_saved_bytes`,
tests/unit/test_planner.py). What is *not* measured here is said where it is assumed.

Memory per GPU (FSDP2 over dp*cp, as parallel/fsdp.py shards it):
  * params fp32 (they are the AdamW master copy), grads fp32, AdamW exp_avg + exp_avg_sq fp32,
    EMA fp32 (train.ema_decay > 0), all / (dp*cp); TP-split weights also / tp, adaLN, norms and
    the embedders are replicated over TP (tensor_parallel.py);
  * FSDP working set: bf16 all-gathered weights of two blocks (current + prefetch) and one
    block's unsharded grads (bf16 + fp32 for the reduce-scatter);
  * activations: saved tensors of one microbatch x layers on the stage x microbatches in flight
    (1F1B: pp on the first stage), plus the recomputed block and the backward working set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from sora_dist.config.train import ACTIVATION_CHECKPOINTING

GiB = 2**30
# Rank grid sizes worth trying; TP stays inside a node (its collectives are per layer).
GPUS_PER_NODE = 8
T_FREQ_DIM = 256  # TimestepEmbedder's sinusoidal width


# ----------------------------------------------------------------------------------------------
# Model dimensions
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDims:
    hidden: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    text_dim: int = 4096       # T5-XXL
    text_len: int = 300        # caption tokens (PixArt/Open-Sora use 120-300)
    in_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True

    @classmethod
    def from_flavor(cls, flavor: str, **overrides) -> "ModelDims":
        from sora_dist.config.model import FLAVORS  # plain dict, no torch

        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; pick one of {sorted(FLAVORS)}")
        f = FLAVORS[flavor]
        base = dict(hidden=f["hidden_size"], depth=f["depth"], heads=f["num_heads"])
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp(self) -> int:
        return int(self.hidden * self.mlp_ratio)  # same rounding as DiTBlock

    @property
    def patch_vol(self) -> int:
        return self.patch[0] * self.patch[1] * self.patch[2]

    def block_params(self) -> tuple[int, int]:
        """(split over TP, replicated over TP) parameters of one DiTBlock. Column-parallel
        q/k/v/fc1 split weight and bias; row-parallel wo/fc2 split the weight only."""
        D, F, hd = self.hidden, self.mlp, self.head_dim
        split = 2 * (3 * (D * D + D) + D * D) + (D * F + F) + F * D
        norms = (4 * hd if self.qk_norm else 0) + 2 * D  # q/k RMSNorms, norm_cross affine
        replicated = 2 * D + D + norms + (6 * D * D + 6 * D)  # wo/fc2 biases, adaLN
        return split, replicated

    def outer_params(self) -> tuple[int, int]:
        """(first stage, last stage) parameters outside the blocks (replicated over TP)."""
        D, C, P = self.hidden, self.in_channels, self.patch_vol
        embed = (C * P * D + D) + (T_FREQ_DIM * D + D + D * D + D) \
            + (self.text_dim * D + D + D * D + D) + self.text_dim
        head = (2 * D * D + 2 * D) + (D * P * C + P * C)
        return embed, head

    def params(self) -> int:
        s, r = self.block_params()
        e, h = self.outer_params()
        return self.depth * (s + r) + e + h


# ----------------------------------------------------------------------------------------------
# FLOPs (matmuls and attention only, 2*m*n*k per matmul, as torch.utils.flop_counter counts)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flops:
    linear: float      # projections, MLP, adaLN, embedders, head
    attention: float   # self-attention (4*S^2*D per layer) + cross-attention (4*S*L*D)

    @property
    def total(self) -> float:
        return self.linear + self.attention


def block_forward_flops(m: ModelDims, seq: int, batch: int = 1) -> Flops:
    """One DiTBlock forward on `batch` samples of `seq` video tokens."""
    D, F, L = m.hidden, m.mlp, m.text_len
    per_token = 2 * (4 * D * D) + 2 * (2 * D * D) + 2 * (2 * D * F)  # self qkvo, cross q/o, MLP
    per_sample = 2 * (2 * D * D) * L + 2 * (6 * D * D)                # cross k/v on text, adaLN
    attn = 4 * seq * seq * D + 4 * seq * L * D
    return Flops(batch * (seq * per_token + per_sample), batch * attn)


def forward_flops(m: ModelDims, seq: int, batch: int = 1) -> Flops:
    """Whole VideoDiT forward: blocks + patch embed, timestep/caption embedders, final layer."""
    D, C, P, L = m.hidden, m.in_channels, m.patch_vol, m.text_len
    blk = block_forward_flops(m, seq, batch)
    outer = 2 * seq * D * C * P + 2 * (T_FREQ_DIM * D + D * D) + 2 * L * (m.text_dim * D + D * D) \
        + 2 * (2 * D * D) + 2 * seq * D * P * C
    return Flops(m.depth * blk.linear + batch * outer, m.depth * blk.attention)


def step_flops(m: ModelDims, seq: int, samples: int, recompute: str = "none") -> tuple[Flops, Flops]:
    """(model FLOPs, executed FLOPs) of one optimizer step over `samples` samples. Backward is
    2x forward (input and weight grads); recompute re-runs the forward of the recomputed blocks.
    Flash attention's backward also recomputes q k^T (+0.5x the attention forward); like the
    kernels' other overheads, that is left to the MFU figure rather than counted here."""
    f = forward_flops(m, seq, samples)
    model = Flops(3 * f.linear, 3 * f.attention)
    frac = recomputed_fraction(m.depth, recompute)
    blk = block_forward_flops(m, seq, samples)
    extra = frac * m.depth
    return model, Flops(model.linear + extra * blk.linear, model.attention + extra * blk.attention)


RECOMPUTES = ACTIVATION_CHECKPOINTING  # by rising recompute cost


def recomputed_fraction(depth: int, recompute: str) -> float:
    """Share of blocks whose matmuls run again in backward: "selective" wraps every other block
    (i % 2 == 0), as the trainer and parallelize.py do; "op" keeps every matmul and attention
    output (it replays only the elementwise ops between them, not counted in FLOPs)."""
    if recompute in ("none", "op"):
        return 0.0
    if recompute == "full":
        return 1.0
    if recompute == "selective":
        return math.ceil(depth / 2) / depth
    raise ValueError(f"recompute={recompute!r}: use one of {RECOMPUTES}")


# ----------------------------------------------------------------------------------------------
# Activations: bytes autograd saves, per tensor, as the forward makes them
# ----------------------------------------------------------------------------------------------

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


def block_activations(m: ModelDims, attn_backend: str, prec: Precision, kv_len: int) -> BlockActs:
    """Bytes of the tensors one DiTBlock saves for backward (read off models/dit.py, one term
    per saved storage; views share their base's storage and count once).

    attn_backend: "flash" (GPU flash / cuDNN / mem-efficient, and torch's CPU flash kernel: saves
    q, k, v, o and the fp32 log-sum-exp, no S^2 term) or "math" (SDPA's math path: saves scaled
    copies of q and k, v and the softmax probabilities, (heads x kv_len) per query, instead of
    o and the LSE). kv_len: keys each query sees in self-attention (this CP rank's sequence
    after the Ulysses all-to-all = the whole sequence).
    """
    D, F, H, L = m.hidden, m.mlp, m.heads, m.text_len
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


def outer_activations(m: ModelDims, prec: Precision, seq: int, samples: int) -> tuple[float, float]:
    """(embed side, head side) saved bytes for `samples` samples of `seq` tokens. The embedders
    run on the whole sequence before it is sharded; the final layer runs on each rank's CP
    chunk (parallelize.py gathers its narrow output), so callers pass the chunk for the head."""
    D, C, P, L, p = m.hidden, m.in_channels, m.patch_vol, m.text_len, prec
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
    m: ModelDims, prec: Precision, seq: int, batch: int, tp: int = 1, cp: int = 1,
    sp: bool = True, recompute: str = "none", attn_backend: str = "flash",
    layers: Optional[int] = None, embed: bool = True, head: bool = True,
) -> float:
    """Saved bytes of one microbatch on one rank holding `layers` blocks (default: all), with
    the embedders (`embed`) and/or the final layer (`head`), as parallelize.py lays it out:
    the sequence is padded to a multiple of cp*tp (SP), each CP rank keeps its chunk."""
    return sum(saved_bytes_parts(m, prec, seq, batch, tp, cp, sp, recompute, attn_backend,
                                 layers, embed, head).values())


def saved_bytes_parts(
    m: ModelDims, prec: Precision, seq: int, batch: int, tp: int = 1, cp: int = 1,
    sp: bool = True, recompute: str = "none", attn_backend: str = "flash",
    layers: Optional[int] = None, embed: bool = True, head: bool = True,
) -> dict[str, float]:
    """saved_bytes_per_microbatch by part: blocks, embedders, final layer."""
    tp_seq = tp if sp else 1  # token sharding of the residual stream over TP
    padded = math.ceil(seq / (cp * tp_seq)) * cp * tp_seq
    local = padded // cp
    layers = m.depth if layers is None else layers
    acts = block_activations(m, attn_backend, prec, kv_len=padded)
    n_rec = round(recomputed_fraction(layers, recompute) * layers)
    embed_b, _ = outer_activations(m, prec, padded, batch)
    _, head_b = outer_activations(m, prec, local, batch)
    if recompute == "op":
        blocks = layers * (checkpoint_input_bytes(m, prec, local * batch, tp_seq, batch)
                           + sac_block_bytes(m, prec, local * batch, batch, tp))
    else:
        blocks = ((layers - n_rec) * acts.bytes(local * batch, batch, tp, sp)
                  + n_rec * checkpoint_input_bytes(m, prec, local * batch, tp_seq, batch))
    parts = {
        "blocks": blocks,
        "embed": embed_b if embed else 0.0,
        # The final layer runs on this rank's CP chunk (gathered over TP under SP).
        "head": head_b if head else 0.0,
    }
    return parts


def checkpoint_input_bytes(m: ModelDims, prec: Precision, tokens: int, tp: int,
                           samples: int = 1) -> float:
    """A fully recomputed block keeps only its input (the token-sharded residual stream), and
    under FSDP the checkpoint holds its bf16 RoPE copy (per position, `samples` share it)."""
    return tokens * m.hidden * prec.act / tp + tokens // samples * m.head_dim * prec.rope_copy


def sac_block_bytes(m: ModelDims, prec: Precision, tokens: int, samples: int, tp: int) -> float:
    """What op-level selective checkpointing keeps of one block (parallelize.sac_save_ops):
    the outputs of its matmuls and attention kernels. tokens: this CP rank's tokens of all
    samples. Column-parallel outputs (q, k, v, cross q, fc1) and the attention outputs / LSE
    split over TP by heads; row-parallel outputs (wo, cross wo, fc2) are each rank's full-size
    partial sums before the reduce-scatter, whose token-sharded results are kept as well under
    TP; per sample: the adaLN projection, caption k / v."""
    D, F, H, L, p = m.hidden, m.mlp, m.heads, m.text_len, prec
    head_sharded = (4 * D + F) * p.act + 2 * D * p.attn_qkvo + 2 * H * p.fp32
    row_parallel = 3 * D * p.act * (1 + 1 / tp if tp > 1 else 1)
    per_sample = 6 * D * p.act + L * 2 * D * p.act / tp
    return tokens * (head_sharded / tp + row_parallel) + samples * per_sample


def recompute_transient_bytes(m: ModelDims, prec: Precision, recompute: str, kv_len: int,
                              tokens: int, samples: int, tp: int) -> float:
    """What a recomputed block rebuilds while its backward runs: all its activations ("full",
    "selective"), or those op-level checkpointing did not keep ("op"); nothing without recompute."""
    if recompute == "none":
        return 0.0
    block = block_activations(m, "flash", prec, kv_len).bytes(tokens, samples, tp)
    if recompute == "op":
        return max(0.0, block - sac_block_bytes(m, prec, tokens, samples, tp))
    return block


def backward_working_bytes(m: ModelDims, prec: Precision, tokens: int, tp: int) -> float:
    """Gradients live at once inside one block's backward, beyond the saved tensors: the MLP
    hidden's grad pair (fc2 input grad, GELU input grad) and a few residual-size grads:
    2*mlp/tp + 4*hidden elements per token (12*hidden at mlp_ratio 4). Measured on CPU (fwd+bwd
    peak minus saved tensors minus the recomputed block, tools/bench_step.py): 4.7 to 6.3 x hidden
    per token, 14 x hidden once (3 recomputed blocks, hidden 128), so this is about the worst case."""
    return tokens * (2 * m.mlp / tp + 4 * m.hidden) * prec.act


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------

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
    activation_parts: dict = field(default_factory=dict)  # GiB: blocks, embed, views, head

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


def check_layout(m: ModelDims, lay: Layout, hw: Hardware) -> str:
    """'' when the layout can run, else why not (the same rules as config/validate.py)."""
    if lay.tp * lay.cp * lay.pp * lay.dp != hw.gpus:
        return f"tp*cp*pp*dp={lay.tp * lay.cp * lay.pp * lay.dp} != gpus={hw.gpus}"
    if m.hidden % m.heads:
        return f"hidden={m.hidden} % heads={m.heads} != 0"
    if m.heads % lay.tp:
        return f"heads={m.heads} % tp={lay.tp} != 0"
    if m.heads % (lay.tp * lay.ulysses):
        return f"heads={m.heads} % (tp*ulysses)={lay.tp * lay.ulysses} != 0"
    if m.mlp % lay.tp:
        return f"mlp={m.mlp} % tp={lay.tp} != 0"
    if lay.tp > hw.gpus_per_node:
        return f"tp={lay.tp} > GPUs per node={hw.gpus_per_node}"
    if lay.cp_mode == "hybrid" and lay.cp % lay.ulysses:
        return f"cp={lay.cp} % ulysses={lay.ulysses} != 0"
    if lay.pp > m.depth:
        return f"pp={lay.pp} > depth={m.depth}"
    if lay.pp > 1 and lay.microbatches < lay.pp:
        return f"microbatches={lay.microbatches} < pp={lay.pp}"
    return ""


def estimate(m: ModelDims, lay: Layout, hw: Hardware, tokens: int, micro_batch: int,
             attn_dtype: str = "bf16", ema: bool = True) -> Plan:
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
    parts = saved_bytes_parts(m, prec, tokens, micro_batch, tp, cp, True, lay.recompute,
                              layers=layers, head=pp == 1)
    mem["activations"] = in_flight * sum(parts.values())
    local = math.ceil(tokens / (cp * tp)) * tp  # this CP rank's tokens
    mem["bwd_transient"] = recompute_transient_bytes(m, prec, lay.recompute, tokens,
                                                     local * micro_batch, micro_batch, tp) \
        + backward_working_bytes(m, prec, local * micro_batch, tp)
    mem = {k: v / GiB for k, v in mem.items()}
    mem["reserve"] = hw.reserve_gib

    samples = lay.dp * lay.microbatches * micro_batch
    model_f, exec_f = step_flops(m, tokens, samples, lay.recompute)
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


def candidate_layouts(m: ModelDims, hw: Hardware, microbatches: Optional[int] = None,
                      recomputes=RECOMPUTES, cp_mode: str = "auto") -> list[Layout]:
    """Every (tp, cp, pp, dp, recompute) with tp*cp*pp*dp = gpus. cp_mode "auto" picks the
    attention per layout (cp_attention_mode); "ulysses"/"ring" force it (Ulysses then needs
    heads % (tp*cp) == 0). Divisibility is checked later so rejected layouts show why."""
    if cp_mode not in ("auto", "ulysses", "ring"):
        raise ValueError(f"cp_mode={cp_mode!r}: use auto, ulysses or ring")
    out = []
    for tp in _divisors(hw.gpus):
        for cp in _divisors(hw.gpus // tp):
            for pp in _divisors(hw.gpus // (tp * cp)):
                dp = hw.gpus // (tp * cp * pp)
                if cp_mode == "auto" and m.heads % tp == 0:
                    mode, u, _ = cp_attention_mode(m.heads, tp, cp, hw.gpus_per_node)
                else:
                    mode, u = ("ring", 1) if cp_mode == "ring" else ("ulysses", cp)
                mb = microbatches or (2 * pp if pp > 1 else 1)
                for rc in recomputes:
                    out.append(Layout(tp, cp, pp, dp, rc, mode, u, mb))
    return out


def plan_all(m: ModelDims, hw: Hardware, tokens: int, micro_batch: int = 1,
             attn_dtype: str = "bf16", microbatches: Optional[int] = None,
             ema: bool = True, cp_mode: str = "auto") -> list[Plan]:
    return [estimate(m, lay, hw, tokens, micro_batch, attn_dtype, ema)
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


# ----------------------------------------------------------------------------------------------
# Measurement on the real model (CPU, tests and calibration)
# ----------------------------------------------------------------------------------------------

def estimate_saved_bytes(m: ModelDims, seq: int, batch: int, recompute: str = "none",
                         attn_backend: str = "flash", precision: str = "cpu_fp32",
                         tp: int = 1, cp: int = 1, sp: bool = True) -> float:
    """Planner estimate of what one VideoDiT forward saves for backward on one rank."""
    return saved_bytes_per_microbatch(m, PRECISIONS[precision], seq, batch, tp, cp, sp,
                                      recompute, attn_backend)


def measure_saved_bytes(model, inputs: tuple) -> int:
    """Bytes of the storages autograd saves during one forward of `model(*inputs)` on this
    rank: unique storages (views count once), parameters excluded (they are not activations);
    DTensors (TP) count their local shard."""
    return saved_bytes_of(lambda: model(*inputs), model.parameters())


def saved_bytes_of(fn, params=()) -> int:
    """measure_saved_bytes for any forward callable; `params` are left out."""
    import torch

    def storages(t):
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:  # DTensor -> its local tensor
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    yield from storages(inner)
        else:
            yield t.untyped_storage()

    skip = {s.data_ptr() for p in params for s in storages(p)}
    seen: dict[int, int] = {}

    def pack(t):
        for s in storages(t):
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def live_bytes_of(fn) -> int:
    """Bytes allocated while fn() runs and still live when it returns, its result excluded
    (CPU profiler memory events): everything a forward keeps for backward, whether autograd
    saved it or a checkpoint's op cache holds it (op-level SAC's outputs are not saved tensors,
    so saved_bytes_of cannot see them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    net = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return net - out.untyped_storage().nbytes()  # the result may view a larger buffer


def tiny_inputs(m: ModelDims, grid_thw: tuple[int, int, int], batch: int, seed: int = 0):
    """Random latents/timesteps/captions for a VideoDiT of dims `m` (a quarter of the caption
    masked, as real padded captions are). grid_thw is the latent T, H, W."""
    import torch

    g = torch.Generator().manual_seed(seed)
    T, H, W = grid_thw
    x = torch.randn(batch, m.in_channels, T, H, W, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, m.text_len, m.text_dim, generator=g)
    mask = torch.ones(batch, m.text_len, dtype=torch.bool)
    mask[:, m.text_len - m.text_len // 4:] = False
    return x, t, text, mask


def build_model(m: ModelDims, recompute: str = "none"):
    """The real VideoDiT for dims `m`, with the trainer's activation checkpointing."""
    from sora_dist.models.dit import DiTArgs, VideoDiT
    from sora_dist.parallel.parallelize import apply_activation_checkpointing
    from sora_dist.parallel.rng import build_rng_tracker

    model = VideoDiT(DiTArgs(in_channels=m.in_channels, hidden_size=m.hidden, depth=m.depth,
                             num_heads=m.heads, mlp_ratio=m.mlp_ratio, patch_size=m.patch,
                             text_dim=m.text_dim, qk_norm=m.qk_norm))
    apply_activation_checkpointing(model, recompute, build_rng_tracker(0, 0, 0, "cpu"))
    return model


def cpu_peak_bytes(step) -> int:
    """Allocator high-water mark (CPU profiler memory events) of running step() above what
    was live before it; step does its own backward. Used by tools/bench_step.py and bench_cp.py."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cur = peak = 0
    mem = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(mem, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak

"""Model config and the one description of a VideoDiT's dimensions.

`ModelConfig` is the Hydra schema: a flavor name picks the size from FLAVORS; any field set
explicitly wins. `DiTArgs` is that config resolved: what `models/dit.py` builds from, and what
answers parameter and FLOP counts (torchtitan's `get_nparams_and_flops`) for the trainer's MFU
and the layout planner. Torch-free, so `tools/plan.py` answers in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Sizes follow DiT (S/B/XL) and extend to the video-model range (1B/7B/30B).
# hidden, depth, heads. Head dim stays 64 (S/B/XL) or 128 (1B and up), like DiT and Open-Sora.
# A block holds ~22*D^2 params (self-attn 4, cross-attn 4, MLP 8, adaLN 6), so the big
# flavors' depths are chosen to land on their names.
FLAVORS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, depth=2, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
    "1B": dict(hidden_size=1536, depth=20, num_heads=12),
    "7B": dict(hidden_size=3072, depth=34, num_heads=24),
    "30B": dict(hidden_size=6144, depth=36, num_heads=48),
}

# Option lists, each checked by config/validate.py and used by the code that implements it.
ATTENTION_BACKENDS = ("sdpa", "te")
SDPA_KERNELS = ("auto", "cudnn", "flash", "efficient", "math")
FP8_LINEARS = ("none", "torchao", "te")
FP8_RECIPES = ("current", "delayed")

# TimestepEmbedder's sinusoidal width (models/embeddings.py), for the parameter/FLOP counts.
T_FREQ_DIM = 256


@dataclass
class ModelConfig:
    # Size preset from FLAVORS (tiny, S, B, XL, 1B, 7B, 30B). Explicit fields below override it.
    flavor: str = "tiny"
    # Transformer width; None takes the flavor's value.
    hidden_size: Optional[int] = None
    # Number of DiT blocks; None takes the flavor's value.
    depth: Optional[int] = None
    # Attention heads; hidden_size must divide by it. None takes the flavor's value.
    num_heads: Optional[int] = None
    # MLP width = mlp_ratio * hidden_size.
    mlp_ratio: float = 4.0
    # Latent channels produced by the video VAE (4 for tiny demos, 16 for Wan/CogVideoX VAEs).
    in_channels: int = 4
    # Spacetime patch (pt, ph, pw) over latent frames/height/width.
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    # Width of the text encoder's embeddings (T5-XXL: 4096).
    text_dim: int = 32
    # RMS-normalise q and k per head before RoPE (stabilises long-context training).
    qk_norm: bool = True
    # Attention implementation behind the one seam: "sdpa" (torch) or "te" (transformer-engine, GPU).
    attention_backend: str = "sdpa"
    # With attention_backend=sdpa: the SDPA kernel tried first ("auto": torch's choice, or
    # "cudnn" | "flash" | "efficient" | "math"); the others stay as fallbacks for calls it
    # cannot take. tools/bench_step.py --sdpa-kernel compares them on a GPU.
    sdpa_kernel: str = "auto"
    # adaLN-Zero: the blocks' gates and the final layer start at zero, so every block starts
    # as the identity and the first output is 0 (DiT). false keeps them random: the loss then
    # depends on every weight from step 0 (what layout-equivalence tests need).
    zero_init: bool = True
    # Dropout inside attention/MLP (0 for diffusion pre-training).
    dropout: float = 0.0
    # FP8 matmuls for the blocks' attention/MLP linears (embedders, adaLN, final layer stay in
    # high precision): "none", "torchao" (Float8Linear, dynamic scaling; runs on CPU too) or
    # "te" (transformer-engine te.Linear, CUDA only). Applied by models/fp8.py:apply_fp8.
    fp8_linears: str = "none"
    # Run transformer-engine attention in FP8 (needs attention_backend=te and an FP8 GPU).
    fp8_attention: bool = False
    # transformer-engine FP8 recipe for fp8_linears=te / fp8_attention: "current"
    # (Float8CurrentScaling, no state) or "delayed" (DelayedScaling, amax history per tensor).
    fp8_recipe: str = "current"

    def resolved(self) -> dict:
        """Flavor values merged with explicit overrides."""
        if self.flavor not in FLAVORS:
            raise ValueError(
                f"model.flavor={self.flavor!r} is unknown; pick one of {sorted(FLAVORS)}"
            )
        out = dict(FLAVORS[self.flavor])
        for k in ("hidden_size", "depth", "num_heads"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out


def shape_problems(hidden: int, heads: int, depth: int) -> list[str]:
    """Why these sizes cannot make a VideoDiT ([] when they can): checked by validate() and by
    the planner for every candidate model."""
    if not (hidden > 0 and heads > 0 and depth > 0):
        return [f"model: hidden_size={hidden}, num_heads={heads}, depth={depth} must all be > 0"]
    if hidden % heads:
        near = sorted((x for x in range(1, hidden + 1) if hidden % x == 0), key=lambda x: abs(x - heads))
        return [f"model.hidden_size={hidden} is not divisible by model.num_heads={heads}; "
                f"pick heads that divide it (e.g. {near[:3]})"]
    return []


@dataclass(frozen=True)
class Flops:
    """Matmul and attention FLOPs (2*m*n*k per matmul, as torch.utils.flop_counter counts)."""
    linear: float      # projections, MLP, adaLN, embedders, head
    attention: float   # self-attention (4*S^2*D per layer) + cross-attention (4*S*L*D)

    @property
    def total(self) -> float:
        return self.linear + self.attention


@dataclass
class DiTArgs:
    """A VideoDiT's dimensions and build options (ModelConfig resolved). The counts below
    follow models/dit.py layer by layer; tests/unit/test_planner.py checks them against the
    real model's parameters and torch's FlopCounterMode."""
    in_channels: int = 4
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 32
    qk_norm: bool = True
    attention_backend: str = "sdpa"
    sdpa_kernel: str = "auto"
    dropout: float = 0.0
    zero_init: bool = True

    @classmethod
    def from_config(cls, m: ModelConfig) -> "DiTArgs":
        return cls(
            in_channels=m.in_channels, mlp_ratio=m.mlp_ratio, patch_size=tuple(m.patch_size),
            text_dim=m.text_dim, qk_norm=m.qk_norm, attention_backend=m.attention_backend,
            sdpa_kernel=m.sdpa_kernel, dropout=m.dropout, zero_init=m.zero_init, **m.resolved(),
        )

    @classmethod
    def from_flavor(cls, flavor: str, **fields) -> "DiTArgs":
        """FLAVORS[flavor] sizes; other fields (and sizes) from `fields`, None ones skipped."""
        sizes = ModelConfig(flavor=flavor).resolved()
        sizes.update({k: v for k, v in fields.items() if v is not None})
        return cls(**sizes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_width(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)  # same rounding as DiTBlock

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    # ---- parameters ----------------------------------------------------------------------

    def block_params(self) -> tuple[int, int]:
        """(split over TP, replicated over TP) parameters of one DiTBlock. Column-parallel
        q/k/v/fc1 split weight and bias; row-parallel wo/fc2 split the weight only."""
        D, F, hd = self.hidden_size, self.mlp_width, self.head_dim
        split = 2 * (3 * (D * D + D) + D * D) + (D * F + F) + F * D
        norms = (4 * hd if self.qk_norm else 0) + 2 * D  # q/k RMSNorms, norm_cross affine
        replicated = 2 * D + D + norms + (6 * D * D + 6 * D)  # wo/fc2 biases, adaLN
        return split, replicated

    def outer_params(self) -> tuple[int, int]:
        """(embedders, final layer) parameters: outside the blocks, replicated over TP; the
        first / last pipeline stage holds them."""
        D, C, P, E = self.hidden_size, self.in_channels, self.patch_volume, self.text_dim
        embed = (C * P * D + D) + (T_FREQ_DIM * D + D + D * D + D) + (E * D + D + D * D + D) + E
        head = (2 * D * D + 2 * D) + (D * P * C + P * C)
        return embed, head

    def num_params(self) -> int:
        split, replicated = self.block_params()
        return self.depth * (split + replicated) + sum(self.outer_params())

    # ---- FLOPs ---------------------------------------------------------------------------

    def block_forward_flops(self, seq_len: int, text_len: int, batch: int = 1) -> Flops:
        """One DiTBlock forward on `batch` samples of `seq_len` video and `text_len` caption
        tokens."""
        D, F, L = self.hidden_size, self.mlp_width, text_len
        per_token = 2 * (4 * D * D) + 2 * (2 * D * D) + 2 * (2 * D * F)  # self qkvo, cross q/o, MLP
        per_sample = 2 * (2 * D * D) * L + 2 * (6 * D * D)                # cross k/v on text, adaLN
        attn = 4 * seq_len * seq_len * D + 4 * seq_len * L * D
        return Flops(batch * (seq_len * per_token + per_sample), batch * attn)

    def forward_flops(self, seq_len: int, text_len: int, batch: int = 1) -> Flops:
        """Whole VideoDiT forward: blocks + patch embed, timestep/caption embedders, final layer."""
        D, C, P, L = self.hidden_size, self.in_channels, self.patch_volume, text_len
        blk = self.block_forward_flops(seq_len, text_len, batch)
        outer = (2 * seq_len * D * C * P + 2 * (T_FREQ_DIM * D + D * D)
                 + 2 * L * (self.text_dim * D + D * D) + 2 * (2 * D * D) + 2 * seq_len * D * P * C)
        return Flops(self.depth * blk.linear + batch * outer, self.depth * blk.attention)

    def flops_per_sample(self, seq_len: int, text_len: int) -> float:
        """Model FLOPs of forward + backward (backward = 2x forward: input and weight grads) on
        one sample, recompute not counted: the MFU numerator. Attention grows with seq_len^2,
        so this is per sample of a given size rather than per token."""
        return 3 * self.forward_flops(seq_len, text_len).total

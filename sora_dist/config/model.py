"""Model config and the one description of a DiT's dimensions (sora_dist's VideoDiT or Wan).

`ModelConfig` is the Hydra schema: a flavor name picks the architecture and size from FLAVORS;
any field set explicitly wins. `DiTArgs` is that config resolved: what `models/dit.py` and
`models/wan.py` build from, and what answers parameter and FLOP counts (torchtitan's
`get_nparams_and_flops`) for the trainer's MFU and the layout planner. Torch-free, so
`tools/plan.py` answers in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
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
    # Wan's published transformers (diffusers' WanTransformer3DModel config.json of each
    # release). Wan2.2-A14B is two experts of this size (high / low noise), one per run.
    "wan2.1-1.3b": dict(arch="wan", hidden_size=1536, depth=30, num_heads=12, ffn_dim=8960,
                        in_channels=16, text_dim=4096, patch_size=[1, 2, 2]),
    "wan2.1-14b": dict(arch="wan", hidden_size=5120, depth=40, num_heads=40, ffn_dim=13824,
                       in_channels=16, text_dim=4096, patch_size=[1, 2, 2]),
    "wan2.2-5b": dict(arch="wan", hidden_size=3072, depth=30, num_heads=24, ffn_dim=14336,
                      in_channels=48, text_dim=4096, patch_size=[1, 2, 2]),
    "wan2.2-a14b": dict(arch="wan", hidden_size=5120, depth=40, num_heads=40, ffn_dim=13824,
                        in_channels=16, text_dim=4096, patch_size=[1, 2, 2]),
}

# Model architectures: "dit" (models/dit.py: adaLN-Zero blocks with a per-block modulation MLP,
# learned null caption) and "wan" (models/wan.py: diffusers' WanTransformer3DModel, one shared
# time projection plus a learned per-block scale_shift_table, loads/exports diffusers weights).
ARCHS = ("dit", "wan")
# Fields a flavor may set besides the sizes; ModelConfig fills the ones left None from it.
_FLAVOR_INPUTS = {"arch": "dit", "ffn_dim": None, "in_channels": 4, "text_dim": 32,
                  "patch_size": [1, 2, 2]}

# Option lists, each checked by config/validate.py and used by the code that implements it.
ATTENTION_BACKENDS = ("sdpa", "te")
SDPA_KERNELS = ("auto", "cudnn", "flash", "efficient", "math")
FP8_LINEARS = ("none", "torchao", "te")
FP8_RECIPES = ("current", "delayed")

# TimestepEmbedder's sinusoidal width (models/embeddings.py), for the parameter/FLOP counts.
T_FREQ_DIM = 256


@dataclass
class ModelConfig:
    # Size preset from FLAVORS (tiny, S, B, XL, 1B, 7B, 30B; wan2.1-1.3b, wan2.1-14b, wan2.2-5b,
    # wan2.2-a14b). Explicit fields below override it.
    flavor: str = "tiny"
    # "dit" (sora_dist's VideoDiT) or "wan" (Wan2.x, diffusers' WanTransformer3DModel layout);
    # None takes the flavor's (wan* flavors are "wan").
    arch: Optional[str] = None
    # Transformer width; None takes the flavor's value.
    hidden_size: Optional[int] = None
    # Number of DiT blocks; None takes the flavor's value.
    depth: Optional[int] = None
    # Attention heads; hidden_size must divide by it. None takes the flavor's value.
    num_heads: Optional[int] = None
    # MLP width = mlp_ratio * hidden_size, unless ffn_dim is set.
    mlp_ratio: float = 4.0
    # MLP width in features (Wan: 8960 for 1.3B, 13824 for 14B); None: the flavor's, else
    # mlp_ratio * hidden_size.
    ffn_dim: Optional[int] = None
    # Latent channels produced by the video VAE (4 for tiny demos, 16 for Wan2.1/CogVideoX VAEs,
    # 48 for Wan2.2's); None takes the flavor's (4 for the VideoDiT flavors).
    in_channels: Optional[int] = None
    # Spacetime patch (pt, ph, pw) over latent frames/height/width; None: the flavor's ([1, 2, 2]).
    patch_size: Optional[list[int]] = None
    # Width of the text encoder's embeddings (T5-XXL and umT5-XXL: 4096); None takes the
    # flavor's (32 for the VideoDiT flavors, the tiny demo encoder's width).
    text_dim: Optional[int] = None
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
    # Start from these weights instead of a random init: a diffusers transformer folder
    # (config.json + model.safetensors, or sharded with model.safetensors.index.json), e.g.
    # /models/Wan2.1-T2V-1.3B-Diffusers/transformer (model.arch=wan). Checked against the model
    # config before anything is built; with train.meta_init each rank reads only its slices.
    init_from: Optional[str] = None

    def __post_init__(self):
        # Inputs the flavor defines (Wan: 16/48 latent channels, umT5's 4096) unless set; the
        # saved run config then holds the values used. An unknown flavor is validate()'s error.
        preset = FLAVORS.get(self.flavor, {})
        for k, default in _FLAVOR_INPUTS.items():
            if getattr(self, k) is None:
                v = preset.get(k, default)
                setattr(self, k, list(v) if isinstance(v, list) else v)

    def resolved(self) -> dict:
        """Flavor sizes merged with explicit overrides."""
        if self.flavor not in FLAVORS:
            raise ValueError(
                f"model.flavor={self.flavor!r} is unknown; pick one of {sorted(FLAVORS)}"
            )
        out = {k: v for k, v in FLAVORS[self.flavor].items() if k in ("hidden_size", "depth", "num_heads")}
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
    """A DiT's dimensions and build options (ModelConfig resolved). The counts below follow
    models/dit.py and models/wan.py layer by layer; tests/unit/test_planner.py checks them
    against the real models' parameters and torch's FlopCounterMode."""
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
    arch: str = "dit"
    ffn_dim: Optional[int] = None

    @classmethod
    def from_config(cls, m: ModelConfig) -> "DiTArgs":
        return cls(
            in_channels=m.in_channels, mlp_ratio=m.mlp_ratio, patch_size=tuple(m.patch_size),
            text_dim=m.text_dim, qk_norm=m.qk_norm, attention_backend=m.attention_backend,
            sdpa_kernel=m.sdpa_kernel, dropout=m.dropout, zero_init=m.zero_init, arch=m.arch,
            ffn_dim=m.ffn_dim, **m.resolved(),
        )

    @classmethod
    def from_flavor(cls, flavor: str, **fields) -> "DiTArgs":
        """FLAVORS[flavor] (sizes, arch and inputs); other fields (and overrides) from `fields`,
        None ones skipped."""
        m = ModelConfig(flavor=flavor)
        sizes = {**m.resolved(), "arch": m.arch, "ffn_dim": m.ffn_dim, "in_channels": m.in_channels,
                 "text_dim": m.text_dim, "patch_size": tuple(m.patch_size)}
        sizes.update({k: v for k, v in fields.items() if v is not None})
        return cls(**sizes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_width(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return int(self.hidden_size * self.mlp_ratio)  # same rounding as DiTBlock

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    # ---- parameters ----------------------------------------------------------------------

    def block_params(self) -> tuple[int, int]:
        """(split over TP, replicated over TP) parameters of one block. Column-parallel
        q/k/v/fc1 split weight and bias; row-parallel wo/fc2 split the weight only."""
        D, F, hd = self.hidden_size, self.mlp_width, self.head_dim
        split = 2 * (3 * (D * D + D) + D * D) + (D * F + F) + F * D
        if self.arch == "wan":
            # q/k RMSNorms span all heads (split with them); no modulation MLP, a 6xD table.
            split += 4 * D if self.qk_norm else 0
            return split, 2 * D + D + 2 * D + 6 * D  # wo/fc2 biases, norm_cross, table
        norms = (4 * hd if self.qk_norm else 0) + 2 * D  # q/k RMSNorms, norm_cross affine
        replicated = 2 * D + D + norms + (6 * D * D + 6 * D)  # wo/fc2 biases, adaLN
        return split, replicated

    def outer_params(self) -> tuple[int, int]:
        """(embedders, final layer) parameters: outside the blocks, replicated over TP; the
        first / last pipeline stage holds them."""
        D, C, P, E = self.hidden_size, self.in_channels, self.patch_volume, self.text_dim
        embed = (C * P * D + D) + (T_FREQ_DIM * D + D + D * D + D) + (E * D + D + D * D + D)
        if self.arch == "wan":
            # + the shared time projection to six modulation vectors; no null caption.
            return embed + (6 * D * D + 6 * D), 2 * D + (D * P * C + P * C)
        head = (2 * D * D + 2 * D) + (D * P * C + P * C)
        return embed + E, head

    def num_params(self) -> int:
        split, replicated = self.block_params()
        return self.depth * (split + replicated) + sum(self.outer_params())

    # ---- FLOPs ---------------------------------------------------------------------------

    def block_forward_flops(self, seq_len: int, text_len: int, batch: int = 1) -> Flops:
        """One DiTBlock forward on `batch` samples of `seq_len` video and `text_len` caption
        tokens."""
        D, F, L = self.hidden_size, self.mlp_width, text_len
        per_token = 2 * (4 * D * D) + 2 * (2 * D * D) + 2 * (2 * D * F)  # self qkvo, cross q/o, MLP
        per_sample = 2 * (2 * D * D) * L                                 # cross k/v on text
        if self.arch != "wan":
            per_sample += 2 * (6 * D * D)                                # adaLN (Wan: a table)
        attn = 4 * seq_len * seq_len * D + 4 * seq_len * L * D
        return Flops(batch * (seq_len * per_token + per_sample), batch * attn)

    def forward_flops(self, seq_len: int, text_len: int, batch: int = 1) -> Flops:
        """Whole VideoDiT forward: blocks + patch embed, timestep/caption embedders, final layer."""
        D, C, P, L = self.hidden_size, self.in_channels, self.patch_volume, text_len
        blk = self.block_forward_flops(seq_len, text_len, batch)
        # patch embed, time MLP, caption MLP, head (Wan: the shared 6-way time projection,
        # a table instead of the head's modulation MLP).
        mod = 2 * (6 * D * D) if self.arch == "wan" else 2 * (2 * D * D)
        outer = (2 * seq_len * D * C * P + 2 * (T_FREQ_DIM * D + D * D)
                 + 2 * L * (self.text_dim * D + D * D) + mod + 2 * seq_len * D * P * C)
        return Flops(self.depth * blk.linear + batch * outer, self.depth * blk.attention)

    def flops_per_sample(self, seq_len: int, text_len: int) -> float:
        """Model FLOPs of forward + backward (backward = 2x forward: input and weight grads) on
        one sample, recompute not counted: the MFU numerator. Attention grows with seq_len^2,
        so this is per sample of a given size rather than per token."""
        return 3 * self.forward_flops(seq_len, text_len).total

"""Model config: a flavor name picks the size from FLAVORS; any field set explicitly wins."""
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

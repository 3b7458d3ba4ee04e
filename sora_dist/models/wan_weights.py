"""The one place where WanDiT's parameter names meet diffusers' `WanTransformer3DModel` names
and config (loading `model.init_from`, and `sora-export`).

Every WanDiT parameter maps to exactly one diffusers key with the same shape; the rules below
are applied in order, first match wins, and a name no rule matches is an error (never a
silent partial load).
"""
from __future__ import annotations

import re

from sora_dist.config.model import DiTArgs

# (sora_dist regex, diffusers template): per block ("blocks.N.") and outside the blocks.
_RULES: list[tuple[str, str]] = [
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embedding.\1"),
    (r"t_embedder\.mlp\.0\.(weight|bias)", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"t_embedder\.proj\.1\.(weight|bias)", r"condition_embedder.time_proj.\1"),
    (r"y_embedder\.0\.(weight|bias)", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"y_embedder\.2\.(weight|bias)", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"blocks\.(\d+)\.attn\.w([qkv])\.(weight|bias)", r"blocks.\1.attn1.to_\2.\3"),
    (r"blocks\.(\d+)\.attn\.wo\.(weight|bias)", r"blocks.\1.attn1.to_out.0.\2"),
    (r"blocks\.(\d+)\.attn\.([qk])_norm\.weight", r"blocks.\1.attn1.norm_\2.weight"),
    (r"blocks\.(\d+)\.cross_attn\.w([qkv])\.(weight|bias)", r"blocks.\1.attn2.to_\2.\3"),
    (r"blocks\.(\d+)\.cross_attn\.wo\.(weight|bias)", r"blocks.\1.attn2.to_out.0.\2"),
    (r"blocks\.(\d+)\.cross_attn\.([qk])_norm\.weight", r"blocks.\1.attn2.norm_\2.weight"),
    (r"blocks\.(\d+)\.norm_cross\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.ffn.net.0.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.ffn.net.2.\2"),
    (r"blocks\.(\d+)\.modulation\.scale_shift_table", r"blocks.\1.scale_shift_table"),
    (r"final_layer\.linear\.(weight|bias)", r"proj_out.\1"),
    (r"final_layer\.modulation\.scale_shift_table", r"scale_shift_table"),
]
_TO = [(re.compile(a + "$"), b) for a, b in _RULES]


def _inverse(template: str) -> str:
    pat = re.escape(template)
    for g in ("1", "2", "3"):
        pat = pat.replace(re.escape("\\" + g), r"([^.]+)")
    return pat


_FROM = [(re.compile(_inverse(b) + "$"), re.sub(r"\\\.", ".", re.sub(r"\(.*?\)", "{}", a))) for a, b in _RULES]


def to_diffusers_key(name: str) -> str:
    """WanDiT parameter name -> diffusers key (KeyError naming it when no rule applies)."""
    for pat, tmpl in _TO:
        if pat.match(name):
            return pat.sub(tmpl, name)
    raise KeyError(f"WanDiT parameter {name!r} has no diffusers name (models/wan_weights.py rules)")


def from_diffusers_key(key: str) -> str:
    """diffusers key -> WanDiT parameter name (KeyError naming it when no rule applies)."""
    for pat, tmpl in _FROM:
        m = pat.match(key)
        if m:
            name = tmpl.format(*m.groups())
            try:  # the inverse patterns are looser than the rules: confirm by the forward rule
                if to_diffusers_key(name) == key:
                    return name
            except KeyError:
                pass
    raise KeyError(f"diffusers key {key!r} is not part of a WanTransformer3DModel this loader knows "
                   f"(models/wan_weights.py rules)")


def diffusers_config(a: DiTArgs) -> dict:
    """The config.json of a WanTransformer3DModel with WanDiT `a`'s architecture."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(a.patch_size),
        "num_attention_heads": a.num_heads,
        "attention_head_dim": a.head_dim,
        "in_channels": a.in_channels,
        "out_channels": a.in_channels,
        "text_dim": a.text_dim,
        "freq_dim": 256,
        "ffn_dim": a.mlp_width,
        "num_layers": a.depth,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads" if a.qk_norm else None,
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def args_from_diffusers_config(cfg: dict) -> dict:
    """DiTArgs fields of a WanTransformer3DModel config.json (ValueError naming the field for
    what WanDiT does not implement: image cross-attention (Wan2.1 I2V), cross_attn_norm off,
    out_channels != in_channels)."""
    unsupported = [
        (cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None,
         "image_dim/added_kv_proj_dim (Wan2.1 I2V's CLIP image cross-attention)"),
        (not cfg.get("cross_attn_norm", True), "cross_attn_norm=false"),
        (cfg.get("out_channels") not in (None, cfg.get("in_channels", 16)), "out_channels != in_channels"),
        (cfg.get("freq_dim", 256) != 256, "freq_dim != 256"),
        (cfg.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", None),
         f"qk_norm={cfg.get('qk_norm')!r}"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ValueError(f"WanTransformer3DModel config with {what} is not supported by WanDiT")
    heads = int(cfg.get("num_attention_heads", 40))
    return dict(
        arch="wan", hidden_size=heads * int(cfg.get("attention_head_dim", 128)), num_heads=heads,
        depth=int(cfg.get("num_layers", 40)), ffn_dim=int(cfg.get("ffn_dim", 13824)),
        in_channels=int(cfg.get("in_channels", 16)), text_dim=int(cfg.get("text_dim", 4096)),
        patch_size=tuple(int(p) for p in cfg.get("patch_size", (1, 2, 2))),
        qk_norm=cfg.get("qk_norm", "rms_norm_across_heads") is not None,
    )


def from_diffusers_state_dict(sd: dict) -> dict:
    """A whole diffusers state dict renamed to WanDiT names (tensors shared, not copied)."""
    return {from_diffusers_key(k): v for k, v in sd.items()}


def to_diffusers_state_dict(sd: dict) -> dict:
    """A whole WanDiT state dict renamed to diffusers keys (tensors shared, not copied)."""
    return {to_diffusers_key(k): v for k, v in sd.items()}

"""Config of the `sora-encode` pre-encoding job (videos -> VAE/text latents -> webdataset shards)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from sora_dist.config.train import DEVICES
from sora_dist.config.validate import ConfigError, either

# How shards store latents and caption embeddings (the mask is always bool). bf16 halves the
# bytes of fp32 with fp32's range; numpy has no bfloat16, so shards hold its raw words.
STORAGE_DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class EncodeConfig:
    # Input: a folder of videos/images (caption = sibling <stem>.txt), or a manifest file
    # (.jsonl with {"path", "caption"} per line, or .csv with path,caption columns; relative
    # paths are resolved against the manifest's folder).
    input: str = "???"
    # Output folder for shards, done-lists, rejects.jsonl and manifest.json.
    output: str = "???"
    # diffusers VAE folder (save_pretrained layout; AutoencoderKLWan or AutoencoderKLCogVideoX).
    vae_path: str = "???"
    # transformers text encoder + tokenizer folder (save_pretrained layout). Its config.json
    # model_type picks the class: "t5" -> T5EncoderModel (T5-v1.1), "umt5" -> UMT5EncoderModel
    # (Wan's umT5-XXL). A diffusers pipeline's text_encoder/ folder works too (tokenizer from the
    # sibling tokenizer/ folder).
    text_encoder_path: str = "???"
    # Bucket resolutions [H, W] in pixels; a clip goes to the one with the nearest aspect ratio.
    # H and W must divide by the VAE's spatial compression (8 for Wan).
    resolutions: list[list[int]] = field(default_factory=lambda: [[256, 256], [240, 432], [432, 240]])
    # Bucket frame counts; each must be 1 + k * temporal compression (Wan: 1, 5, 9, 17, 33, ...).
    # A clip takes the longest count its duration allows; 1 is the bucket for images.
    frames: list[int] = field(default_factory=lambda: [1, 17, 33])
    # Frames are sampled at this rate; slower sources are taken frame by frame at their own rate.
    target_fps: float = 16.0
    # Reject inputs whose longer side exceeds this many pixels (guards memory before decoding).
    max_side: int = 4096
    # Samples per shard file (the last shard of each rank may be shorter).
    samples_per_shard: int = 64
    # Caption tokens kept; longer captions are truncated. None = the encoder's default:
    # 120 for t5, 512 for umt5 (as Wan).
    text_max_length: Optional[int] = None
    # Training batches carry captions zero-padded to the full text_max_length (Wan's layout,
    # which its DiT was trained on) instead of to the batch's longest caption. Shards store only
    # the real tokens either way; the manifest records this and the loader pads.
    # None = the encoder's default: false for t5, true for umt5.
    text_pad_to_max: Optional[bool] = None
    # Encode only the first N inputs of the sorted list (0 = all); for quick trials.
    limit: int = 0
    # "auto" (cuda if visible), "cpu" or "cuda".
    device: str = "auto"
    # Model compute precision: "fp32" or "bf16" (bf16 only on cuda).
    dtype: str = "fp32"
    # Precision latents and caption embeddings are stored in: "bf16" (half of fp32's bytes, the
    # precision a bf16 DiT computes in anyway; exactly torch's .to(bfloat16) rounding), "fp16"
    # (more mantissa, but |x| > 65504 is refused) or "fp32" (bit-exact). The loader hands out
    # float32 whatever the shards hold; the manifest records it.
    storage_dtype: str = "bf16"
    # VAE spatial tiling for large frames: tile side in pixels (tiles overlap by a quarter);
    # 0 = off. Bounds activation memory at high resolution (720p and up on a GPU).
    vae_tile_size: int = 0
    # Threads decoding upcoming videos while the current one is encoded (0 = decode inline).
    decode_workers: int = 2
    # Intra-op threads per rank (0 = CPU cores / ranks on this node).
    num_threads: int = 0
    # Rank 0 waits this long for the other ranks' completion markers before writing the manifest.
    wait_timeout_s: float = 3600.0
    # Retry inputs an earlier run rejected (e.g. after adding missing captions); by default a
    # rerun skips them like finished inputs.
    retry_rejects: bool = False
    # Show a tqdm progress bar (videos/s) per rank.
    progress: bool = True
    # Also print other libraries' import-time warnings (filtered by default; sora_dist/console.py).
    verbose: bool = False
    # Rank/world override for tests and manual splitting; None = from torchrun/Slurm env.
    rank: Optional[int] = None
    world_size: Optional[int] = None


def validate_encode(cfg: EncodeConfig) -> None:
    """Cheap checks before any model is loaded or video decoded."""
    for name in ("input", "output", "vae_path", "text_encoder_path"):
        v = getattr(cfg, name)
        if not v or v == "???":
            raise ConfigError(f"encode.{name} is required (e.g. sora-encode {name}=/path)")
    if not os.path.exists(cfg.input):
        raise ConfigError(f"encode.input={cfg.input!r} does not exist; give a folder or a .jsonl/.csv manifest")
    if os.path.isfile(cfg.input) and not cfg.input.endswith((".jsonl", ".csv")):
        raise ConfigError(f"encode.input={cfg.input!r} is a file but not .jsonl or .csv")
    for name in ("vae_path", "text_encoder_path"):
        if not os.path.isfile(os.path.join(getattr(cfg, name), "config.json")):
            raise ConfigError(f"encode.{name}={getattr(cfg, name)!r} has no config.json; "
                              "point it at a save_pretrained() folder")
    if not cfg.resolutions or any(len(r) != 2 or min(r) < 1 for r in cfg.resolutions):
        raise ConfigError(f"encode.resolutions={cfg.resolutions} must be a non-empty list of [H, W]")
    if not cfg.frames or min(cfg.frames) < 1:
        raise ConfigError(f"encode.frames={cfg.frames} must be a non-empty list of counts >= 1")
    if cfg.target_fps <= 0:
        raise ConfigError(f"encode.target_fps={cfg.target_fps} must be > 0")
    if cfg.samples_per_shard < 1:
        raise ConfigError(f"encode.samples_per_shard={cfg.samples_per_shard} must be >= 1")
    if cfg.decode_workers < 0:
        raise ConfigError(f"encode.decode_workers={cfg.decode_workers} must be >= 0")
    if cfg.max_side < 1:
        raise ConfigError(f"encode.max_side={cfg.max_side} must be >= 1")
    if cfg.text_max_length is not None and cfg.text_max_length < 2:
        raise ConfigError(f"encode.text_max_length={cfg.text_max_length} must be >= 2")
    if cfg.device not in DEVICES:
        raise ConfigError(f"encode.device={cfg.device!r}: use {either(DEVICES)}")
    if cfg.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"encode.dtype={cfg.dtype!r}: use fp32 or bf16")
    if cfg.storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"encode.storage_dtype={cfg.storage_dtype!r}: use {either(STORAGE_DTYPES)}")


def validate_against_vae(cfg: EncodeConfig, temporal: int, spatial: int) -> None:
    """Bucket table vs the loaded VAE's compression (still before any video is decoded)."""
    bad_t = [t for t in cfg.frames if (t - 1) % temporal]
    if bad_t:
        raise ConfigError(f"encode.frames has {bad_t}; this VAE encodes 1 + {temporal}*k frames "
                          f"(e.g. {[1 + temporal * k for k in range(4)]})")
    bad_r = [r for r in cfg.resolutions if r[0] % spatial or r[1] % spatial]
    if bad_r:
        raise ConfigError(f"encode.resolutions has {bad_r}; H and W must divide by the VAE's spatial factor {spatial}")

"""Config of the `sora-train-vae` job: train or fine-tune a diffusers video VAE (AutoencoderKLWan)
on a folder/manifest of clips, data parallel, and export a diffusers folder sora-encode reads."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from sora_dist.config.optim import OptimConfig
from sora_dist.config.train import DEVICES, MIXED_PRECISIONS, LoggingConfig
from sora_dist.config.validate import ConfigError, either

# How parameters are spread over the DP ranks: replicated weights with a gradient all-reduce
# (DDP without overlap), or FSDP2 (one unit per top-level encoder/decoder block + the root),
# which is refused for now: Wan's causal chunked forward calls each block once per frame chunk
# and the FSDP2 run's first loss differs from one process (tests/integration/test_train_vae.py).
DP_MODES = ("ddp", "fsdp")
TRAINABLE_VAES = ("AutoencoderKLWan",)


@dataclass
class VAETrainConfig:
    # Clips: a folder of videos/images or a .jsonl/.csv manifest (captions are not needed), read
    # with sora-encode's PyAV reader and bucket rules.
    input: str = "???"
    # diffusers VAE folder to start from (save_pretrained layout, AutoencoderKLWan; Wan 2.1 or
    # the patchified Wan 2.2 layout). Its weights are fine-tuned, or re-initialised (from_scratch).
    vae_path: str = "???"
    # Train from random weights of vae_path's architecture instead of fine-tuning its weights.
    from_scratch: bool = False
    # With from_scratch: the posterior's initial log-variance (the logvar half of quant_conv starts
    # at this constant). Random init gives logvar ~0, i.e. posterior noise as large as the
    # encoder's signal: the decoder then learns to ignore z and paints only the mean colour (a
    # tiny demo VAE sat at that plateau for 400+ steps). Starting near-deterministic lets the
    # reconstruction shape z first and the KL term raise the variance. None keeps the random init.
    init_logvar: Optional[float] = -6.0
    # Run folder: resolved config, split.json, checkpoints/, metrics.jsonl, wandb.
    run_dir: str = "runs/vae"
    # Where the trained VAE is written as a diffusers folder (latents_mean/std measured on the
    # training clips); "" = run_dir/vae. Written to a temp folder and renamed into place.
    export_dir: str = ""
    # Bucket table as sora-encode: resolutions [H, W] (divisible by the VAE's spatial factor) and
    # frame counts (1 + temporal factor * k, e.g. 1, 5, 9, 17 for Wan).
    resolutions: list[list[int]] = field(default_factory=lambda: [[256, 256]])
    frames: list[int] = field(default_factory=lambda: [17])
    target_fps: float = 16.0
    max_side: int = 4096
    # Optimizer steps, and clips per step over all DP ranks (must divide by the DP size). Clips
    # of different buckets cannot share a tensor, so each rank runs its clips one at a time.
    steps: int = 1000
    batch_size: int = 8
    # Seed of the data order (a permutation per epoch) and of the posterior samples (per step and
    # clip): a resumed run continues the exact loss sequence.
    seed: int = 0
    # Loss = l1_weight * mean|x - x'| + mse_weight * mean (x - x')^2 + kl_weight * KL, the KL
    # summed over the latent per input pixel value (LDM's convention: 1e-6 is the usual weight).
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6
    # Held-out clips for reconstruction PSNR: an explicit list (paths or file names from the
    # input), else this fraction of the clips (a seeded choice; 0 = no evaluation).
    eval_clips: list[str] = field(default_factory=list)
    eval_fraction: float = 0.1
    # PSNR every N steps (0 = only at the end) and at the end.
    eval_every: int = 100
    # Latent statistics for the export over at most N training clips (0 = all).
    stats_max_clips: int = 0
    dp_mode: str = "ddp"
    # "auto" (cuda if visible), "cpu" or "cuda"; bf16 autocast on CUDA only (fp32 weights).
    device: str = "auto"
    mixed_precision: str = "bf16"
    backend: str = "auto"
    timeout_s: int = 600
    # Checkpoint every N steps (0 = only at the end); keep the newest N; resume from the newest.
    ckpt_every: int = 100
    ckpt_keep: int = 2
    resume: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, decay="constant"))
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def read_vae_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def validate_vae_train(cfg: VAETrainConfig, world_size: int = 1) -> None:
    """Every check that needs no process group, model or decoded video; errors name the field."""
    for name in ("input", "vae_path", "run_dir"):
        v = getattr(cfg, name)
        if not v or v == "???":
            raise ConfigError(f"vae_train.{name} is required (e.g. sora-train-vae {name}=/path)")
    if not os.path.exists(cfg.input):
        raise ConfigError(f"vae_train.input={cfg.input!r} does not exist; give a folder of clips or a "
                          ".jsonl/.csv manifest")
    if os.path.isfile(cfg.input) and not cfg.input.endswith((".jsonl", ".csv")):
        raise ConfigError(f"vae_train.input={cfg.input!r} is a file but not .jsonl or .csv")
    if not os.path.isfile(os.path.join(cfg.vae_path, "config.json")):
        raise ConfigError(f"vae_train.vae_path={cfg.vae_path!r} has no config.json; point it at a diffusers "
                          "save_pretrained() folder (sora_dist.models.vae.build_tiny_vae makes a tiny one)")
    vc = read_vae_config(cfg.vae_path)
    if vc.get("_class_name") not in TRAINABLE_VAES:
        raise ConfigError(f"vae_train.vae_path holds a {vc.get('_class_name')!r}; training supports "
                          f"{either(TRAINABLE_VAES)}")
    tc, sc = int(vc.get("scale_factor_temporal") or 4), int(vc.get("scale_factor_spatial") or 8)
    if not cfg.frames or any(t < 1 or (t - 1) % tc for t in cfg.frames):
        raise ConfigError(f"vae_train.frames={list(cfg.frames)}: this VAE encodes 1 + {tc}*k frames; use "
                          f"counts like {[1 + tc * k for k in range(4)]}")
    if not cfg.resolutions or any(len(r) != 2 or min(r) < 1 or r[0] % sc or r[1] % sc for r in cfg.resolutions):
        raise ConfigError(f"vae_train.resolutions={[list(r) for r in cfg.resolutions]}: give [H, W] pairs "
                          f"divisible by the VAE's spatial factor {sc}")
    for name in ("steps", "batch_size", "ckpt_keep"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"vae_train.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.batch_size % world_size:
        raise ConfigError(f"vae_train.batch_size={cfg.batch_size} must divide by the {world_size} DP ranks; "
                          f"use a multiple of {world_size}")
    for name in ("l1_weight", "mse_weight", "kl_weight"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"vae_train.{name}={getattr(cfg, name)} must be >= 0")
    if cfg.l1_weight + cfg.mse_weight == 0:
        raise ConfigError("vae_train.l1_weight and mse_weight are both 0: nothing to reconstruct; set one > 0")
    if not 0 <= cfg.eval_fraction < 1:
        raise ConfigError(f"vae_train.eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    for name in ("eval_every", "ckpt_every", "stats_max_clips"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"vae_train.{name}={getattr(cfg, name)} must be >= 0")
    if cfg.target_fps <= 0:
        raise ConfigError(f"vae_train.target_fps={cfg.target_fps} must be > 0")
    if cfg.dp_mode not in DP_MODES:
        raise ConfigError(f"vae_train.dp_mode={cfg.dp_mode!r}: use {either(DP_MODES)}")
    if cfg.dp_mode == "fsdp" and world_size > 1:
        raise ConfigError("vae_train.dp_mode=fsdp is not supported yet with more than one rank (FSDP2 "
                          "disagrees with one process on Wan's chunked causal forward); use dp_mode=ddp")
    if cfg.device not in DEVICES:
        raise ConfigError(f"vae_train.device={cfg.device!r}: use {either(DEVICES)}")
    if cfg.mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(f"vae_train.mixed_precision={cfg.mixed_precision!r}: use {either(MIXED_PRECISIONS)}")
    if cfg.optim.lr <= 0 or cfg.optim.decay not in ("cosine", "constant"):
        raise ConfigError(f"vae_train.optim: lr={cfg.optim.lr} must be > 0 and decay={cfg.optim.decay!r} "
                          "cosine or constant")

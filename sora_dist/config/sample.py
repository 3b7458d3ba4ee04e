"""Config of `sora-sample`: prompts -> text encoder -> diffusion sampler -> VAE decode -> mp4."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from sora_dist.config.parallel import ParallelConfig
from sora_dist.config.train import DEVICES
from sora_dist.config.validate import ConfigError, either


SAMPLE_MODES = ("generate", "edit", "connect", "loop")


@dataclass
class SampleConfig:
    # Training run folder (holds config.yaml and checkpoints/); model and diffusion settings
    # are read from its config.yaml so they always match the weights.
    run_dir: str = "???"
    # Checkpoint step folder; None = the newest complete one under run_dir/checkpoints.
    checkpoint: Optional[str] = None
    # Use the EMA weights when the run kept them (train.ema_decay > 0).
    use_ema: bool = True
    # Prompts to sample, one video each.
    prompts: list[str] = field(default_factory=lambda: ["a red square moving right on a black background"])
    # Optional text file with one prompt per line (appended to `prompts`).
    prompt_file: Optional[str] = None
    # VAE / text-encoder folders; None = the ones recorded in the run's shard manifest.
    # The text encoder may be T5 or umT5 (chosen from its config.json model_type).
    vae_path: Optional[str] = None
    text_encoder_path: Optional[str] = None
    # Caption tokens kept; None = the value the shards were encoded with (else the encoder's
    # default: 120 for t5, 512 for umt5). Zero-padding to it (umt5/Wan) also follows the shards.
    text_max_length: Optional[int] = None
    # Output video size in pixels; frames must be 1 + k * VAE temporal factor, H/W divisible
    # by the VAE spatial factor (and the latent size by the patch size).
    num_frames: int = 17
    height: int = 64
    width: int = 64
    # Frame rate written into the mp4 (and used to sample a conditioning video).
    fps: float = 12.0
    # Sampler settings; None = the run's diffusion config (diffusion.sampler/sample_steps/guidance_scale).
    sampler: Optional[str] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    # Flow-matching timestep shift; None = the run's diffusion.shift (Wan samples 720p at 5.0,
    # 480p at 3.0).
    shift: Optional[float] = None
    # Wan2.2-A14B's two experts: run_dir is the high-noise expert (trained with
    # diffusion.t_range=[boundary, 1]), this run the low-noise one ([0, boundary]). Steps whose
    # timestep is below boundary_ratio * 1000 use it, with guidance_scale_2 (None: guidance_scale).
    low_noise_run_dir: Optional[str] = None
    boundary_ratio: float = 0.875
    guidance_scale_2: Optional[float] = None
    # Seed of the initial noise (and stochastic sampler steps); the batch that starts at prompt i
    # uses seed + i (so a prompt's video depends on batch_size).
    seed: int = 0
    # Prompts per sampler call.
    batch_size: int = 4
    # "generate" (text-to-video; with cond_path image-to-video / extension), "edit" (SDEdit of
    # the cond_path clip under the prompts), "connect" (cond_path opens, cond_path_2 closes the
    # video), "loop" (a seamless loop). sora_dist/sample_modes.py says how each is enforced.
    mode: str = "generate"
    # Conditioning image or video for image-to-video / video extension / edit / connect.
    cond_path: Optional[str] = None
    # connect: the clip that closes the video.
    cond_path_2: Optional[str] = None
    # edit: how far the source is noised before denoising under the new prompt, in [0, 1].
    strength: float = 0.6
    # loop: latent frames of the tail tied to the head.
    loop_latent_frames: int = 1
    # "first": the condition opens the video (image-to-video, forward extension);
    # "last": it closes the video (backward extension).
    cond_position: str = "first"
    # Latent frames taken from the condition (1 for an image; k latent frames = 1 + 4(k-1) video frames).
    cond_latent_frames: int = 1
    # VAE spatial tiling for decoding large frames: tile side in pixels; 0 = off.
    vae_tile_size: int = 0
    # Latent frames decoded at a time, streamed into the mp4 (the causal cache carries over, so
    # the video equals a whole decode while memory stays that of one chunk).
    decode_chunk_frames: int = 4
    # Under torchrun: every rank of a prompt group decodes a share of each video's latent frames
    # and the writer muxes them in order (each share decodes the VAE's temporal receptive field
    # of earlier frames first, so it equals a whole decode; worth it for long videos).
    decode_parallel: bool = False
    # Where the mp4 files and samples.jsonl go (on every node: a shared folder under srun).
    output_dir: str = "samples"
    # A rerun skips batches whose videos are already in output_dir.
    skip_existing: bool = True
    # Launched with torchrun/srun: the denoiser's layout (parallel.tp, sequence_parallel, cp,
    # cp_mode, ulysses_degree, fsdp; pp must stay 1). The ranks left over form data-parallel
    # prompt groups that take whole batches in turn.
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(fsdp=False))
    # Classifier-free guidance in parallel: the conditional and unconditional passes of each
    # step run on two halves of the ranks, one exchange per step (needs guidance_scale != 1).
    cfg_parallel: bool = False
    # "auto", "cpu" or "cuda".
    device: str = "auto"
    # Show the sampler's progress bar.
    progress: bool = True
    # Also print other libraries' import-time warnings (filtered by default; sora_dist/console.py).
    verbose: bool = False


def validate_sample(cfg: SampleConfig) -> None:
    if not cfg.run_dir or cfg.run_dir == "???":
        raise ConfigError("sample.run_dir is required: the training run folder (sora-sample run_dir=runs/x)")
    if cfg.num_frames < 1 or cfg.height < 1 or cfg.width < 1:
        raise ConfigError(f"num_frames/height/width = {cfg.num_frames}/{cfg.height}/{cfg.width} must be >= 1")
    if cfg.fps <= 0:
        raise ConfigError(f"fps={cfg.fps} must be > 0")
    if cfg.decode_chunk_frames < 1:
        raise ConfigError(f"decode_chunk_frames={cfg.decode_chunk_frames} must be >= 1")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    if cfg.mode not in SAMPLE_MODES:
        raise ConfigError(f"mode={cfg.mode!r}: use {either(SAMPLE_MODES)}")
    if cfg.mode in ("edit", "connect") and not cfg.cond_path:
        raise ConfigError(f"mode={cfg.mode} needs cond_path=<clip>" + (" and cond_path_2=<clip>" if cfg.mode == "connect" else ""))
    if cfg.mode == "connect" and not cfg.cond_path_2:
        raise ConfigError("mode=connect needs cond_path_2=<the clip that closes the video>")
    if cfg.mode != "connect" and cfg.cond_path_2:
        raise ConfigError(f"cond_path_2 is for mode=connect (mode={cfg.mode})")
    if not 0.0 <= cfg.strength <= 1.0:
        raise ConfigError(f"strength={cfg.strength} must be in [0, 1] (0 returns the source, 1 ignores it)")
    if cfg.mode == "loop" and (cfg.loop_latent_frames < 1 or cfg.cond_path):
        raise ConfigError("mode=loop needs loop_latent_frames >= 1 and no cond_path")
    for f in ("cond_path", "cond_path_2"):
        path = getattr(cfg, f)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{f}={path!r} does not exist")
    if cfg.cond_position not in ("first", "last"):
        raise ConfigError(f"cond_position={cfg.cond_position!r}: use 'first' or 'last'")
    if cfg.cond_latent_frames < 1:
        raise ConfigError(f"cond_latent_frames={cfg.cond_latent_frames} must be >= 1")
    if cfg.shift is not None and cfg.shift <= 0:
        raise ConfigError(f"shift={cfg.shift} must be > 0 (1 = no shift)")
    if not 0.0 < cfg.boundary_ratio < 1.0:
        raise ConfigError(f"boundary_ratio={cfg.boundary_ratio} must be in (0, 1) (Wan2.2-A14B T2V: 0.875)")
    if cfg.guidance_scale_2 is not None and not cfg.low_noise_run_dir:
        raise ConfigError("guidance_scale_2 is the low-noise expert's; set low_noise_run_dir=<run> too")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device={cfg.device!r}: use {either(DEVICES)}")

"""sora-sample's modes: what each one fixes, starts from or ties together in latent space.

  generate  text-to-video (or image: num_frames=1); with cond_path, image-to-video / extension:
            the condition's latent frames are kept at the start (cond_position=first) or the
            end (last) while the rest is denoised.
  edit      SDEdit: the source clip's latents noised to `strength`, then denoised under the new
            prompt (0 returns the source, 1 is plain text-to-video).
  connect   cond_path opens the video, cond_path_2 closes it; the frames between are generated.
  loop      a seamless loop: `loop_latent_frames` extra latent frames are generated after the
            video and tied, before every model call and at the end, to the first ones; the
            video is the frames before that tail, so its last frame leads into its first as
            the model made frame T-1 lead into frame T (= frame 0).

A causal video VAE encodes a clip's first frame alone (an "image" latent) and every later latent
frame from tc pixel frames. A condition that opens the video is encoded as a clip start; one
that closes it (backward extension, the second clip of connect) is encoded as a continuation:
1 + tc*k frames are encoded and the leading image latent is dropped, so its k latent frames are
what they would be in the middle of a video.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sora_dist.config.validate import ConfigError
from sora_dist.data.video_io import BadInput, load_clip, parse_buckets, probe


@dataclass
class ModeInputs:
    cond_latent: Optional[torch.Tensor] = None   # (B, C, T, h, w) with the fixed frames
    cond_mask: Optional[torch.Tensor] = None      # (T,) bool: which latent frames are fixed
    init_latent: Optional[torch.Tensor] = None    # edit: the source latents
    strength: float = 1.0
    constrain: Optional[Callable] = None          # loop: ties the tail to the head
    keep_T: Optional[int] = None                  # loop: latent frames of the output


def encode_condition(cfg, vae, path: str, k: int, continuation: bool, field: str) -> torch.Tensor:
    """k latent frames of the clip/image at `path` (1, C, k, h, w): a clip start, or (continuation)
    the clip's last tc*k frames as they would sit inside a longer video."""
    tc = vae.temporal_compression
    need = 1 + tc * k if continuation else 1 + tc * (k - 1)
    try:
        is_image = probe(path).is_image
        if is_image and (k != 1 or continuation):
            raise ConfigError(f"{field}={path!r} is an image: it can only open the video with "
                              f"cond_latent_frames=1 (use a clip to close or extend it backwards)")
        # A clip's first frame alone (image-to-video from a video): the bucket rules want >= 2
        # frames from a video, so read 1 + tc and keep the first.
        read = need if need > 1 or is_image else 1 + tc
        frames, _, _, _ = load_clip(path, parse_buckets([[cfg.height, cfg.width]], [read]), cfg.fps)
        frames = frames[:need]  # (T, 3, H, W)
    except BadInput as e:
        raise ConfigError(f"{field}: {e} (it needs {need} frames at fps={cfg.fps:g} for "
                          f"cond_latent_frames={k})") from None
    except FileNotFoundError:
        raise ConfigError(f"{field}={path!r} does not exist") from None
    z = vae.encode(frames)
    return z[:, :, 1:] if continuation else z


def mode_inputs(cfg, vae, shape_BCTHW, device) -> ModeInputs:
    """The conditioning of cfg.mode for a batch of latents of shape_BCTHW (errors: ConfigError)."""
    B, C, T, h, w = shape_BCTHW
    k = cfg.cond_latent_frames
    if cfg.mode == "edit":
        z = encode_condition(cfg, vae, cfg.cond_path, T, False, "cond_path")
        return ModeInputs(init_latent=z.expand(B, -1, -1, -1, -1).to(device), strength=cfg.strength)
    if cfg.mode == "loop":
        n = cfg.loop_latent_frames

        def tie(x):
            x = x.clone()
            x[:, :, -n:] = x[:, :, :n]
            return x
        return ModeInputs(constrain=tie, keep_T=T - n)
    parts = []  # (latent frames, slice)
    if cfg.cond_path:
        first = cfg.mode == "connect" or cfg.cond_position == "first"
        z = encode_condition(cfg, vae, cfg.cond_path, k, not first, "cond_path")
        parts.append((z, slice(0, k) if first else slice(T - k, T)))
    if cfg.mode == "connect":
        parts.append((encode_condition(cfg, vae, cfg.cond_path_2, k, True, "cond_path_2"), slice(T - k, T)))
    if not parts:
        return ModeInputs()
    fixed = sum(sl.stop - sl.start for _, sl in parts)
    if fixed >= T:
        raise ConfigError(f"cond_latent_frames={k} x {len(parts)} condition(s) leave nothing to generate in "
                          f"{T} latent frames; raise num_frames or lower cond_latent_frames")
    cond = torch.zeros(shape_BCTHW, device=device)
    mask = torch.zeros(T, dtype=torch.bool)
    for z, sl in parts:
        cond[:, :, sl] = z.to(device)
        mask[sl] = True
    return ModeInputs(cond_latent=cond, cond_mask=mask)

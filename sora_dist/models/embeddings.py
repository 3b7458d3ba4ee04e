"""Timestep embedding, 3D rotary position embedding, spacetime patchify/unpatchify."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features then a 2-layer MLP (as in DiT)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoidal(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half
        )
        args = t_B.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoidal(t_B, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs per axis (t, h, w). Height and width get equal shares; time the rest,
    since videos are usually longer in latent frames than any spatial side is wide."""
    pairs = head_dim // 2
    hw = pairs // 3
    return pairs - 2 * hw, hw, hw


def build_rope_3d(
    grid: tuple[int, int, int], head_dim: int, device=None, theta: float = 10000.0
) -> torch.Tensor:
    """cos/sin tables for tokens in (t, h, w) raster order: returns (N, head_dim//2, 2) float32.

    Computed from integer grid positions so any T/H/W works without a max length, and any
    contiguous slice of the sequence (a CP or SP shard) takes the matching slice of the table.
    """
    T, H, W = grid
    axes = []
    for n_pairs, length in zip(rope_split(head_dim), (T, H, W)):
        freqs = 1.0 / (theta ** (torch.arange(n_pairs, dtype=torch.float64, device=device) / max(n_pairs, 1)))
        pos = torch.arange(length, dtype=torch.float64, device=device)
        axes.append(torch.outer(pos, freqs))  # (length, n_pairs)
    ang_t, ang_h, ang_w = axes
    ang = torch.cat(
        [
            ang_t[:, None, None, :].expand(T, H, W, -1),
            ang_h[None, :, None, :].expand(T, H, W, -1),
            ang_w[None, None, :, :].expand(T, H, W, -1),
        ],
        dim=-1,
    ).reshape(T * H * W, -1)
    return torch.stack([ang.cos(), ang.sin()], dim=-1).float()


def apply_rope(x_BHSD: torch.Tensor, rope_SP2: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the head dim by the per-token angles."""
    x = x_BHSD.float().unflatten(-1, (-1, 2))
    cos, sin = rope_SP2[..., 0], rope_SP2[..., 1]
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x_BHSD)


def pad_to_patch(x_BCTHW: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad T/H/W up to multiples of the patch so odd latent shapes work."""
    T, H, W = x_BCTHW.shape[-3:]
    pt, ph, pw = patch
    pad = (0, (-W) % pw, 0, (-H) % ph, 0, (-T) % pt)
    return F.pad(x_BCTHW, pad) if any(pad) else x_BCTHW


class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) latents -> (B, N, D) tokens, N = T/pt * H/ph * W/pw in (t, h, w) order."""

    def __init__(self, in_channels: int, hidden_size: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch, stride=self.patch)

    def forward(self, x_BCTHW: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if x_BCTHW.ndim == 3:
            # A packed sequence (1, S, C*P) of patches (models/packing.py): each patch is one
            # conv window, so the same conv (and whatever wraps it) embeds it. The patches go side
            # by side along W, one conv over one input: as S inputs of one window each, the CPU
            # conv cost 13x more (0.9 vs 0.07 ms fwd+bwd for 576 patches, bench_pack's model).
            # Contiguous: a transposed view here made compiled blocks under op-level recompute
            # give gradients 5e-4 off (tests/unit/test_packing_model.py), as VideoDiTBlock notes.
            B, S, _ = x_BCTHW.shape
            pt, ph, pw = self.patch
            x = rearrange(x_BCTHW, "b s (c pt ph pw) -> b c pt ph (s pw)", pt=pt, ph=ph, pw=pw)
            return rearrange(self.proj(x), "b d 1 1 s -> b s d").contiguous(), (1, 1, S)
        x = self.proj(pad_to_patch(x_BCTHW, self.patch))
        grid = tuple(x.shape[-3:])
        return rearrange(x, "b d t h w -> b (t h w) d"), grid


def unpatchify(
    x_BNP: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int],
    channels: int, shape_THW: tuple[int, int, int],
) -> torch.Tensor:
    """Inverse of PatchEmbed3D's layout, cropped back to the unpadded (T, H, W)."""
    T, H, W = grid
    pt, ph, pw = patch
    x = rearrange(
        x_BNP, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
        t=T, h=H, w=W, pt=pt, ph=ph, pw=pw, c=channels,
    )
    t, h, w = shape_THW
    if x.shape[2:] != (t, h, w):
        x = x[:, :, :t, :h, :w]
    # Return a tensor that owns its storage: FSDP2 hooks the model's output for its
    # pre-backward, and an in-place op on a view (the crop, or a reshape that did not copy)
    # would rebase the graph past that hook. The reshape above usually copied already, so
    # only a crop (a few latents) pays a second copy.
    return x if x._base is None else x.clone()

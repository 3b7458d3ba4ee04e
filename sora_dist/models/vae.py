"""Video VAE wrapper around a real diffusers class, loaded from a local folder.

Preferred class: diffusers.AutoencoderKLWan (causal 3D VAE, 4x temporal and 8x spatial
compression - 16x for the patchified Wan 2.2 layout - encodes 1 + 4k frames into 1 + k
latent frames). AutoencoderKLCogVideoX is the
fallback. Latents are returned *normalised* - that is what the DiT trains on:
  Wan:       z = (mu - latents_mean) / latents_std   (per channel, from the config)
  CogVideoX: z = mu * scaling_factor
The posterior mean (not a sample) is used so encoding is deterministic: pre-encoded shards and
a direct encode of the same clip give identical tensors, and the round-trip test relies on it.

Memory: Wan's encoder is causal in time and keeps a per-conv feature cache, so we drive it
ourselves, one chunk (1 frame, then 4 frames) at a time, converting uint8 frames to float only
per chunk. Peak activation memory is then that of one chunk, independent of clip length.
Decoding streams one latent frame at a time the same way.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterator, NamedTuple, Optional

import torch

from sora_dist.fsutil import replace_dir

SUPPORTED = ("AutoencoderKLWan", "AutoencoderKLCogVideoX")


def _class_name(local_dir: str) -> str:
    cfg_path = os.path.join(local_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"VAE folder {local_dir!r} has no config.json; point vae_path at a diffusers "
            "save_pretrained() folder (build one with sora_dist.models.vae.build_tiny_vae)")
    with open(cfg_path) as f:
        name = json.load(f).get("_class_name", "")
    if name not in SUPPORTED:
        raise ValueError(f"VAE folder {local_dir!r} holds a {name!r}; supported: {SUPPORTED}")
    return name


class VideoVAE:
    """Encode uint8/float video to normalised latents and decode back to [-1, 1] frames."""

    def __init__(self, model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        # Cast only when needed: diffusers warns (rightly) about casting loaded models with .to().
        if next(model.parameters()).dtype != dtype:
            model = model.to(dtype=dtype)
        self.model = model.to(device=device).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.kind = type(model).__name__
        cfg = model.config
        if self.kind == "AutoencoderKLWan":
            self.latent_channels = int(cfg.z_dim)
            self.temporal_compression = int(cfg.scale_factor_temporal or 4)
            self.spatial_compression = int(cfg.scale_factor_spatial or 8)
            mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
            std = torch.tensor(cfg.latents_std, dtype=torch.float32)
            if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
                raise ValueError(f"VAE config latents_mean/std have {mean.numel()}/{std.numel()} entries; "
                                 f"z_dim={self.latent_channels} needs that many")
            self._mean = mean.view(1, -1, 1, 1, 1).to(device)
            self._std = std.view(1, -1, 1, 1, 1).to(device)
        else:
            self.latent_channels = int(cfg.latent_channels)
            self.temporal_compression = int(cfg.temporal_compression_ratio)
            self.spatial_compression = 2 ** (len(cfg.block_out_channels) - 1)
            self._scale = float(cfg.scaling_factor)

    @classmethod
    def load(cls, local_dir: str, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "VideoVAE":
        import diffusers

        name = _class_name(local_dir)
        model = getattr(diffusers, name).from_pretrained(local_dir, torch_dtype=dtype)
        return cls(model, device, dtype)

    # ---- shapes -------------------------------------------------------------------------
    def check_frames(self, T: int) -> None:
        """Causal temporal compression encodes 1 + k*tc frames; anything else is an error."""
        if (T - 1) % self.temporal_compression != 0:
            raise ValueError(f"{self.kind} encodes 1 + {self.temporal_compression}*k frames; got T={T}. "
                             f"Use bucket frame counts like 1, {1 + self.temporal_compression}, "
                             f"{1 + 2 * self.temporal_compression}, ...")

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        self.check_frames(T)
        s = self.spatial_compression
        if H % s or W % s:
            raise ValueError(f"frame size {H}x{W} must divide by the VAE's spatial factor {s}")
        return (self.latent_channels, 1 + (T - 1) // self.temporal_compression, H // s, W // s)

    # ---- encode -------------------------------------------------------------------------
    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 (T, 3, H, W) -> float (1, 3, T, H, W) in [-1, 1]; float BCTHW passes through.
        if x.dtype == torch.uint8:
            x = x.permute(1, 0, 2, 3).unsqueeze(0).float().div(127.5).sub(1.0)
        return x.to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video: uint8 (T, 3, H, W) [0, 255] or float (B, 3, T, H, W) [-1, 1].
        Returns normalised latents float32 (B, C, t, h, w) (B=1 for uint8 input)."""
        T = video.shape[0] if video.dtype == torch.uint8 else video.shape[2]
        H, W = video.shape[-2:]
        self.latent_shape(T, H, W)  # validate before any compute
        if self.kind == "AutoencoderKLWan" and not self._tiled(H, W):
            return self._encode_wan(video)
        # diffusers' own path: CogVideoX, or spatial tiling for frames larger than a tile
        # (tiled_encode runs the same temporal chunks per tile and blends the seams).
        mu = self.model.encode(self._to_input(video)).latent_dist.mode().float()
        return (mu - self._mean) / self._std if self.kind == "AutoencoderKLWan" else mu * self._scale

    def enable_tiling(self, tile: int = 256, stride: int = 192) -> None:
        """Spatial tiling for large frames: bounds activation memory by the tile, not the frame."""
        if stride >= tile or tile % self.spatial_compression or stride % self.spatial_compression:
            raise ValueError(f"VAE tiling needs stride < tile and both divisible by {self.spatial_compression}; "
                             f"got tile={tile}, stride={stride}")
        self.model.enable_tiling(tile, tile, stride, stride)

    def enable_tiling_from_size(self, tile: int) -> None:
        """tile > 0: tiles of that many pixels overlapping by a quarter; 0: off."""
        if tile > 0:
            s = self.spatial_compression
            self.enable_tiling(tile, max(s, (tile * 3 // 4) // s * s))

    def _tiled(self, H: int, W: int) -> bool:
        m = self.model
        return bool(getattr(m, "use_tiling", False)) and (
            H > m.tile_sample_min_height or W > m.tile_sample_min_width)

    def _encode_wan(self, video: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

        m = self.model
        patch = m.config.patch_size  # Wan 2.2: pixels are folded into channels before the encoder
        uint8 = video.dtype == torch.uint8
        T = video.shape[0] if uint8 else video.shape[2]
        tc = self.temporal_compression
        # chunk boundaries exactly as diffusers' _encode: [0:1], [1:1+tc], [1+tc:1+2tc], ...
        bounds = [(0, 1)] + [(s, s + tc) for s in range(1, T, tc)]
        m.clear_cache()
        outs = []
        try:
            for s, e in bounds:
                chunk = video[s:e] if uint8 else video[:, :, s:e]
                m._enc_conv_idx = [0]
                x = self._to_input(chunk)
                if patch is not None:
                    x = patchify(x, patch_size=patch)
                h = m.encoder(x, feat_cache=m._enc_feat_map, feat_idx=m._enc_conv_idx)
                # quant_conv is a 1x1x1 conv: applying it per chunk is exact. Keep only mu.
                outs.append(m.quant_conv(h)[:, : self.latent_channels].float())
        finally:
            m.clear_cache()
        mu = torch.cat(outs, dim=2)
        return (mu - self._mean) / self._std

    # ---- decode -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w) -> float32 frames (B, 3, T, H, W) in [-1, 1]."""
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"decode wants (B, {self.latent_channels}, t, h, w); got {tuple(latent.shape)}")
        z = latent.to(self.device, torch.float32)
        if self.kind != "AutoencoderKLWan":
            return self.model.decode((z / self._scale).to(self.dtype)).sample.float().clamp(-1, 1)
        m = self.model
        z = (z * self._std + self._mean).to(self.dtype)
        s = self.spatial_compression
        if self._tiled(z.shape[-2] * s, z.shape[-1] * s):
            return m.decode(z).sample.float().clamp(-1, 1)
        m.clear_cache()
        outs = []
        try:
            x = m.post_quant_conv(z)  # 1x1x1 conv, exact on the whole tensor
            for i in range(x.shape[2]):
                m._conv_idx = [0]
                outs.append(m.decoder(x[:, :, i:i + 1], feat_cache=m._feat_map, feat_idx=m._conv_idx,
                                      first_chunk=(i == 0)).float())
        finally:
            m.clear_cache()
        out = torch.cat(outs, dim=2)
        if m.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=m.config.patch_size)
        return out.clamp(-1, 1)

    # ---- streaming / sharded decode ------------------------------------------------------
    def pixel_frames(self, t0: int, t1: int) -> tuple[int, int]:
        """Global pixel-frame range [p0, p1) that latent frames [t0, t1) decode to.
        Latent frame 0 gives 1 frame, every later one gives temporal_compression frames."""
        tc = self.temporal_compression
        return (0 if t0 == 0 else 1 + (t0 - 1) * tc), (0 if t1 == 0 else 1 + (t1 - 1) * tc)

    def _check_stream_args(self, latent: torch.Tensor, frames_per_chunk: int,
                           tile: Optional[int], overlap: Optional[int]) -> Optional[tuple[int, int]]:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"decode_stream wants (B, {self.latent_channels}, t, h, w); got {tuple(latent.shape)}")
        if not isinstance(frames_per_chunk, int) or frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk={frames_per_chunk!r} must be an int >= 1 (latent frames per chunk)")
        if tile is None:
            if overlap is not None:
                raise ValueError("overlap is given but tile is None; pass tile=<pixels> to tile spatially")
            return None
        s = self.spatial_compression
        if overlap is None:  # a quarter of the tile, on the latent grid
            overlap = max(s, (tile // 4) // s * s)
        if tile <= 0 or tile % s or overlap % s or not 0 < overlap < tile:
            raise ValueError(f"tile={tile}, overlap={overlap}: both must divide by the spatial factor {s} "
                             "and satisfy 0 < overlap < tile")
        return tile, overlap

    @torch.no_grad()
    def decode_stream(self, latent: torch.Tensor, frames_per_chunk: int = 1, tile: Optional[int] = None,
                      overlap: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Yield float32 frames (B, 3, T_chunk, H, W) in [-1, 1], frames_per_chunk latent frames
        at a time, in order. torch.cat(list(...), dim=2) == decode(latent) (bit for bit untiled).

        Wan only holds the causal feature cache (2 frames per conv) plus one chunk, so peak memory
        does not grow with video length. tile/overlap (pixels) also bound it by the tile: tiles on
        diffusers' grid, each with its own cache, blended linearly in the overlap exactly like
        diffusers' tiled_decode. CogVideoX falls back to decode() then slicing (not bounded)."""
        grid = self._check_stream_args(latent, frames_per_chunk, tile, overlap)
        if self.kind != "AutoencoderKLWan":
            out = self.decode(latent)
            for t0 in range(0, latent.shape[2], frames_per_chunk):
                p0, p1 = self.pixel_frames(t0, min(t0 + frames_per_chunk, latent.shape[2]))
                yield out[:, :, p0:p1]
            return
        for _, frames in self._stream_wan(latent, 0, latent.shape[2], frames_per_chunk, grid):
            yield frames

    def _stream_wan(self, latent, start: int, stop: int, k: int, grid) -> Iterator[tuple[int, torch.Tensor]]:
        """Decode latent frames [start, stop) with a fresh cache (start is treated as a first
        frame); yields (index of the first latent frame in the chunk, frames)."""
        m = self.model
        z = (latent[:, :, start:stop].to(self.device, torch.float32) * self._std + self._mean).to(self.dtype)
        n_conv = m._cached_conv_counts["decoder"]
        h, w = z.shape[-2:]
        s, patch = self.spatial_compression, m.config.patch_size
        if grid is None:  # one "tile": the whole frame
            tiles, tl, sl, blend = [(0, 0)], max(h, w), max(h, w), 0
        else:
            tl, sl = grid[0] // s, (grid[0] - grid[1]) // s
            tiles = [(i, j) for i in range(0, h, sl) for j in range(0, w, sl)]
            blend = grid[1] // (patch or 1)  # blend extent in the decoder's (patched) output pixels
        caches = [[None] * n_conv for _ in tiles]  # each tile keeps its own causal cache
        for c0 in range(0, z.shape[2], k):
            outs = []
            for (i, j), cache in zip(tiles, caches):
                x = m.post_quant_conv(z[:, :, c0:c0 + k, i:i + tl, j:j + tl])  # 1x1x1: exact per tile
                seq = []
                for f in range(x.shape[2]):
                    seq.append(m.decoder(x[:, :, f:f + 1], feat_cache=cache, feat_idx=[0],
                                         first_chunk=(c0 + f == 0)).float())
                outs.append(torch.cat(seq, dim=2))
            out = outs[0] if grid is None else self._blend_tiles(outs, tiles, sl, blend, h, w)
            if patch is not None:
                from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                out = unpatchify(out, patch_size=patch)
            yield start + c0, out.clamp(-1, 1)

    def _blend_tiles(self, outs, tiles, sl: int, blend: int, h: int, w: int) -> torch.Tensor:
        # Same order and in-place semantics as diffusers' tiled_decode, so results match it.
        m, stride = self.model, sl * self.spatial_compression // (self.model.config.patch_size or 1)
        rows_i = sorted({i for i, _ in tiles})
        rows = [[o for (i, _), o in zip(tiles, outs) if i == r] for r in rows_i]
        result = []
        for a, row in enumerate(rows):
            cropped = []
            for b, t in enumerate(row):
                if a > 0:
                    t = m.blend_v(rows[a - 1][b], t, blend)
                if b > 0:
                    t = m.blend_h(row[b - 1], t, blend)
                cropped.append(t[:, :, :, :stride, :stride])
            result.append(torch.cat(cropped, dim=-1))
        full = h * self.spatial_compression // (m.config.patch_size or 1), w * self.spatial_compression // (
            m.config.patch_size or 1)
        return torch.cat(result, dim=3)[:, :, :, :full[0], :full[1]]

    @torch.no_grad()
    def decoder_receptive_field(self, probe_frames: int = 40) -> int:
        """Latent frames of history the causal decoder's output depends on (measured, cached).

        Every causal conv looks 2 frames back, so the dependence is finite (~30 latent frames for
        build_tiny_vae's Wan, more for the full model's 2 res blocks). Measured, not derived: perturb
        latent frame 0 of a 2x2-latent probe and find the last latent frame whose pixels change."""
        if getattr(self, "_rf", None) is None:
            if self.kind != "AutoencoderKLWan":
                self._rf = 0  # decode_shard decodes all for CogVideoX; no cache carried
                return self._rf
            g = torch.Generator().manual_seed(0)
            n = probe_frames
            while True:
                z = torch.randn(1, self.latent_channels, n, 2, 2, generator=g)
                z2 = z.clone()
                z2[:, :, 0] += 3.0
                d = (self.decode(z) - self.decode(z2)).abs().amax(dim=(0, 1, 3, 4))
                last = int(d.nonzero().max()) if d.any() else 0
                lat = (last + self.temporal_compression - 1) // self.temporal_compression  # latent index
                if lat < n - 1:
                    self._rf = lat
                    break
                n *= 2
        return self._rf

    @torch.no_grad()
    def decode_shard(self, latent: torch.Tensor, rank: int, world: int, warmup: Optional[int] = None,
                     frames_per_chunk: int = 1, tile: Optional[int] = None,
                     overlap: Optional[int] = None) -> "ShardFrames":
        """Decode this rank's contiguous share of latent frames (DP/CP ranks decode one video in
        parallel). The causal decoder needs history, so `warmup` latent frames before the share
        are decoded with a fresh cache and their outputs dropped. The decoder's temporal receptive
        field is finite: warmup >= decoder_receptive_field() (the default) gives the whole decode
        bit for bit; a shorter warm-up is cheaper but only approximate near the share's start.
        Returns frames (B, 3, n, H, W) and their global pixel-frame range [start, stop)."""
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"decode_shard: need 0 <= rank < world; got rank={rank!r}, world={world!r}")
        if warmup is None:
            warmup = max(1, self.decoder_receptive_field())
        if not isinstance(warmup, int) or warmup < 1:
            # a fresh causal cache decodes its first latent frame to 1 pixel frame, not
            # temporal_compression: at least that one frame must be a dropped warm-up frame
            raise ValueError(f"decode_shard: warmup={warmup!r} must be an int >= 1 (latent frames)")
        grid = self._check_stream_args(latent, frames_per_chunk, tile, overlap)
        t = latent.shape[2]
        t0, t1 = rank * t // world, (rank + 1) * t // world
        p0, p1 = self.pixel_frames(t0, t1)
        if t0 == t1:  # more ranks than latent frames: this rank has nothing to do
            H, W = (d * self.spatial_compression for d in latent.shape[-2:])
            return ShardFrames(torch.empty(latent.shape[0], 3, 0, H, W), p0, p1)
        if self.kind != "AutoencoderKLWan":  # no causal cache to carry: decode all, keep the share
            return ShardFrames(self.decode(latent)[:, :, p0:p1], p0, p1)
        w0 = max(0, t0 - warmup)
        local = lambda n: self.pixel_frames(0, n)[1]  # pixel frames of n latent frames from a fresh cache
        drop = local(t0 - w0)  # the warm-up's outputs
        keep = []
        for c0, frames in self._stream_wan(latent, w0, t1, frames_per_chunk, grid):
            lo = max(0, drop - local(c0 - w0))
            if lo < frames.shape[2]:
                keep.append(frames[:, :, lo:])
        return ShardFrames(torch.cat(keep, dim=2), p0, p1)


class ShardFrames(NamedTuple):
    """One rank's decoded frames and their global pixel-frame indices [start, stop)."""
    frames: torch.Tensor
    start: int
    stop: int



def build_tiny_vae(save_dir: str, latent_channels: int = 4, kind: str = "wan", seed: int = 0,
                   base_dim: int = 8) -> str:
    """Create a tiny random-weight VAE of the real class and save it (tests, demos).

    Same compression as the full models (4x time, 8x space) so shapes and bucket rules match
    production; only the widths are small. latents_mean/std are non-trivial so the
    normalisation path is exercised. Written to a temp folder, then renamed into place.
    """
    import diffusers

    torch.manual_seed(seed)
    C = latent_channels
    stats = dict(latents_mean=[round(0.1 * (i - C / 2), 3) for i in range(C)],
                 latents_std=[round(0.5 + 0.1 * i, 3) for i in range(C)])
    if kind == "wan":
        model = diffusers.AutoencoderKLWan(
            base_dim=base_dim, z_dim=C, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True, True], **stats)
    elif kind == "wan-4x":
        # One spatial level fewer (4x space, 4x time): the demo's VAE, whose 64x64 clips become
        # 16x16 latents, so a moving object spans a few latent pixels instead of one or two.
        model = diffusers.AutoencoderKLWan(
            base_dim=base_dim, z_dim=C, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[True, True], scale_factor_spatial=4, **stats)
    elif kind == "wan2.2":
        # Wan 2.2 layout: 2x2 pixel patches folded into channels, residual blocks, 16x spatial.
        model = diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=C, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
            in_channels=12, out_channels=12, scale_factor_spatial=16, **stats)
    elif kind == "cogvideox":
        model = diffusers.AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 16, 16), latent_channels=C, layers_per_block=1,
            norm_num_groups=4, temporal_compression_ratio=4,
            sample_height=64, sample_width=64,
        )
    else:
        raise ValueError(f"build_tiny_vae kind={kind!r}: use 'wan', 'wan-4x', 'wan2.2' or 'cogvideox'")
    save_dir = os.path.abspath(save_dir)
    tmp = f"{save_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    replace_dir(tmp, save_dir)
    return save_dir

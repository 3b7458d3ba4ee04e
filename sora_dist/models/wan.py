"""WanDiT: the Wan2.x video transformer (diffusers' `WanTransformer3DModel`) behind sora_dist's seams.

Same architecture as diffusers (and so the same weights, see models/wan_weights.py), written
like models/dit.py so that everything parallel/ does to a VideoDiT applies unchanged:
`embed()` -> tokens + `Conditioning`, `blocks` (a ModuleDict), `head()`; attention through
`CoreAttention`; the submodules the TP plan, FP8 and pipeline stages address by name are called
as in VideoDiT (`attn.wq`, `cross_attn.wk`, `mlp.fc1`, `norm_cross`, `x_embedder`,
`t_embedder`, `y_embedder`, `final_layer`).

What differs from VideoDiT (all of it Wan's):
  * Modulation: one time projection shared by every block (time_proj, D -> 6D) plus a
    learned per-block `scale_shift_table` added to it; the head has its own 2-row table added
    to the raw time embedding. So `Conditioning.c_BD` here is (B, 7, D): the six modulation
    vectors and, last, the time embedding the head reads.
  * q/k RMSNorm over all heads together (before the split into heads), not per head.
  * Cross-attention sees every caption token, padding included: Wan's captions are umT5
    outputs zeroed past their length and padded to 512, and the model was trained attending
    to the zero rows' projections. The mask is applied by zeroing, not by attention.
  * No learned null caption: a dropped caption (CFG training) is the all-zero caption.
  * Norms and modulation in fp32 (diffusers' FP32LayerNorm and `.float()` adds).
The 3D RoPE split of the head dim (t gets head_dim - 4*(head_dim//6), h and w head_dim//6 pairs
each... in rotary pairs: models/embeddings.py:rope_split) and the sinusoidal time features are
VideoDiT's own, which are Wan's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sora_dist.config.model import DiTArgs
from sora_dist.models.attention import CoreAttention
from sora_dist.models.dit import (MLP, Conditioning, DiTSeams, RMSNorm, cross_attention, cross_attention_per_sample,
                                  packed_conditioning, self_attention)
from sora_dist.models.embeddings import PatchEmbed3D, TimestepEmbedder, apply_rope, build_rope_3d
from sora_dist.models.modulation import gated_add, modulate

EPS = 1e-6  # every Wan norm


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and weight dtypes (diffusers' FP32LayerNorm);
    returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class WanSelfAttention(nn.Module):
    """Self-attention with RMSNorm of q and k across all heads, then 3D RoPE per head."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, backend: str, sdpa_kernel: str = "auto"):
        super().__init__()
        self.head_dim = dim // num_heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        # Across heads: under TP each rank holds a slice of the heads, and the norm's statistic
        # then spans ranks (parallel/tensor_parallel.py shards it as one).
        self.q_norm = RMSNorm(dim, EPS) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim, EPS) if qk_norm else nn.Identity()
        self.core_attention = CoreAttention(backend, sdpa_kernel)
        self.wo = nn.Linear(dim, dim)

    def _heads(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # (B, heads, S, hd)

    def forward(self, x_BSD, rope_SP2, token_mask_BS=None, doc_S=None, doc_runs=None):
        B, S, _ = x_BSD.shape
        q = apply_rope(self._heads(self.q_norm(self.wq(x_BSD))), rope_SP2)
        k = apply_rope(self._heads(self.k_norm(self.wk(x_BSD))), rope_SP2)
        v = self._heads(self.wv(x_BSD))
        o = (self.core_attention(q, k, v, token_mask_BS) if doc_S is None
             else self.core_attention(q, k, v, token_mask_BS, doc_S, doc_runs))
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class WanCrossAttention(WanSelfAttention):
    """Video tokens attend to every caption token (Wan masks captions by zeroing them)."""

    def forward(self, x_BSD, text_BLD, text_mask_BL=None, doc_S=None, doc_runs=None):
        B, S, _ = x_BSD.shape
        q = self._heads(self.q_norm(self.wq(x_BSD)))
        k = self._heads(self.k_norm(self.wk(text_BLD)))
        v = self._heads(self.wv(text_BLD))
        o = (self.core_attention(q, k, v, None) if doc_S is None
             else cross_attention_per_sample(self.core_attention, q, k, v, None, doc_S, doc_runs))
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class Modulation(nn.Module):
    """A block's learned table added to the shared time projection: (B, 6, D) fp32 rows
    (shift, scale, gate for attention; shift, scale, gate for the MLP)."""

    def __init__(self, dim: int, rows: int = 6):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(1, rows, dim) / dim**0.5)

    def forward(self, e_BRD: torch.Tensor) -> torch.Tensor:
        """(B, rows, D) or per frame (B, K, rows, D) -> the same shape, fp32."""
        return self.scale_shift_table.float() + e_BRD.float()


class WanBlock(nn.Module):
    def __init__(self, a: DiTArgs):
        super().__init__()
        D = a.hidden_size
        self.norm1 = FP32LayerNorm(D, elementwise_affine=False, eps=EPS)
        self.attn = WanSelfAttention(D, a.num_heads, a.qk_norm, a.attention_backend, a.sdpa_kernel)
        self.norm_cross = FP32LayerNorm(D, eps=EPS)  # Wan's cross_attn_norm (always on in releases)
        self.cross_attn = WanCrossAttention(D, a.num_heads, a.qk_norm, a.attention_backend, a.sdpa_kernel)
        self.norm2 = FP32LayerNorm(D, elementwise_affine=False, eps=EPS)
        self.mlp = MLP(D, a.mlp_width, a.dropout)
        self.modulation = Modulation(D)

    def forward(self, x_BSD: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x_BSD = x_BSD.contiguous()  # see DiTBlock.forward: the first block gets a strided view
        # Each (B, D) fp32, or (B, K, D) with cond.rows_S naming each token's row (per frame).
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation(cond.c_BD[..., :6, :]).unbind(-2))
        rows = cond.rows_S
        h = modulate(self.norm1(x_BSD.float()), shift_msa, scale_msa, rows).type_as(x_BSD)
        a = self_attention(self.attn, h, cond)
        x_BSD = gated_add(x_BSD.float(), a.float(), gate_msa, rows).type_as(x_BSD)
        h = self.norm_cross(x_BSD)
        x_BSD = x_BSD + cross_attention(self.cross_attn, h, cond)
        h = modulate(self.norm2(x_BSD.float()), shift_mlp, scale_mlp, rows).type_as(x_BSD)
        return gated_add(x_BSD.float(), self.mlp(h).float(), gate_mlp, rows).type_as(x_BSD)


class WanTimeEmbedder(TimestepEmbedder):
    """Sinusoidal features -> MLP (the time embedding, which the head reads), then Wan's shared
    projection to six modulation vectors for the blocks. Returns them stacked: (B, 7, D)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__(hidden_size, freq_dim)
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        temb_BD = super().forward(t_B)
        e_B6D = self.proj(temb_BD).unflatten(1, (6, -1))
        return torch.cat([e_B6D, temb_BD[:, None]], dim=1)


class WanHead(nn.Module):
    def __init__(self, a: DiTArgs):
        super().__init__()
        D = a.hidden_size
        self.norm = FP32LayerNorm(D, elementwise_affine=False, eps=EPS)
        self.linear = nn.Linear(D, a.patch_volume * a.in_channels)
        self.modulation = Modulation(D, rows=2)

    def forward(self, x_BSD: torch.Tensor, c_B7D: torch.Tensor, rows_S: Optional[torch.Tensor] = None):
        # table (1, 2, D) + temb (B, 1, D) [or per frame (B, K, 1, D)] -> shift, scale
        shift, scale = self.modulation(c_B7D[..., 6:7, :]).unbind(-2)
        h = modulate(self.norm(x_BSD.float()), shift, scale, rows_S).type_as(x_BSD)
        return self.linear(h)


def init_wan_weights(module: nn.Module, zero_init: bool = True) -> None:
    """Wan's from-scratch init (its reference code: xavier linears and patch embedding, zero
    biases, N(0, .02) time and caption embedders, tables N(0, 1/D)), on the whole model or a
    pipeline stage. zero_init zeroes the output layer, so the first prediction is 0. Loading a
    released checkpoint (model.init_from) replaces all of it."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, RMSNorm)) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Modulation):
            nn.init.normal_(m.scale_shift_table, std=m.scale_shift_table.shape[-1] ** -0.5)
    for emb in ("t_embedder", "y_embedder"):
        if getattr(module, emb, None) is not None:
            for lin in getattr(module, emb).modules():
                if isinstance(lin, nn.Linear):
                    nn.init.normal_(lin.weight, std=0.02)
    if zero_init and getattr(module, "final_layer", None) is not None:
        nn.init.zeros_(module.final_layer.linear.weight)
        nn.init.zeros_(module.final_layer.linear.bias)


def frame_rows(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Latent frame of each token in (t, h, w) raster order: its row in a per-frame table."""
    T, H, W = grid
    return torch.arange(T, device=device).repeat_interleave(H * W)


class WanDiT(DiTSeams):
    """Predicts the flow velocity (noise - x0) for latents x (B, C, T, H, W) at time t (Wan feeds
    sigma * 1000), from umT5 caption embeddings (B, L, text_dim) and their mask."""

    def __init__(self, args: DiTArgs):
        super().__init__()
        self.args = args
        D = args.hidden_size
        self.x_embedder = PatchEmbed3D(args.in_channels, D, args.patch_size)
        self.t_embedder = WanTimeEmbedder(D)
        self.y_embedder = nn.Sequential(
            nn.Linear(args.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D)
        )
        self.register_parameter("null_text", None)  # the seam VideoDiT has; Wan zeroes instead
        self.blocks = nn.ModuleDict({str(i): WanBlock(args) for i in range(args.depth)})
        self.final_layer = WanHead(args)
        self.init_weights()

    init_part = staticmethod(init_wan_weights)

    @torch.no_grad()
    def init_weights(self, zero_init: Optional[bool] = None) -> None:
        init_wan_weights(self, self.args.zero_init if zero_init is None else zero_init)

    def embed(
        self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text_BLD: torch.Tensor,
        text_mask_BL: torch.Tensor, drop_text_B: Optional[torch.Tensor] = None,
        grids_K3: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Conditioning]:
        """Patchify and build the conditioning (with grids_K3: a packed sequence of K samples,
        models/packing.py; t and the captions per sample). Caption rows past the mask, and the whole
        caption of samples in drop_text_B, are zeroed (Wan's padding and empty caption).
        t_B is one timestep per sample (B,), or one per latent frame (B, T): Wan2.2 TI2V gives
        the clean conditioning frame t=0 (diffusers' per-token `timestep` of shape (B, S), which
        is constant over each frame's tokens)."""
        # Contiguous here, not only in the block: a compiled block handed the patch embedding's
        # transposed view got wrong per-frame table grads (torch 2.13 inductor, measured 20%).
        tokens_BSD, grid = self.x_embedder(x_BCTHW)
        tokens_BSD = tokens_BSD.contiguous()
        rows_S = None
        if t_B.ndim == 2:
            if grids_K3 is not None:
                raise NotImplementedError("per-frame timesteps in a packed sequence are not supported")
            if t_B.shape[1] != x_BCTHW.shape[2] or self.args.patch_size[0] != 1:
                raise ValueError(f"per-frame timesteps {tuple(t_B.shape)} need one per latent frame "
                                 f"(T={x_BCTHW.shape[2]}) and a temporal patch of 1 "
                                 f"(model.patch_size={list(self.args.patch_size)})")
            rows_S = frame_rows(grid, tokens_BSD.device)
        keep_BL = text_mask_BL.bool()
        if drop_text_B is not None:
            keep_BL = keep_BL & ~drop_text_B.bool()[:, None]
        text_BLD = text_BLD * keep_BL[..., None].to(text_BLD.dtype)
        c = self.t_embedder(t_B.reshape(-1)).unflatten(0, t_B.shape)  # (B, 7, D) or (B, T, 7, D)
        if grids_K3 is not None:
            cond = packed_conditioning(c, self.y_embedder(text_BLD), torch.ones_like(keep_BL), grids_K3,
                                       self.args.head_dim, tokens_BSD.shape[1])
            return tokens_BSD, cond
        cond = Conditioning(
            c_BD=c,
            text_BLD=self.y_embedder(text_BLD),
            text_mask_BL=torch.ones_like(keep_BL),  # every row is attended (see module docstring)
            rope_SP2=build_rope_3d(grid, self.args.head_dim, tokens_BSD.device),
            grid=grid,
            shape_THW=tuple(x_BCTHW.shape[-3:]),
            rows_S=rows_S,
            head_rows_S=rows_S,
        )
        return tokens_BSD, cond

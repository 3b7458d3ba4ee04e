"""VideoDiT: a diffusion transformer over spacetime patches of video latents.

Single-device code, readable like facebookresearch/DiT. Parallelism is applied from outside
(parallel/parallelize.py); the model only keeps the seams it needs:
  * `embed()` -> tokens + conditioning, `blocks` (a ModuleDict, so pipeline stages can drop
    blocks and FQNs stay stable), `head()` -> output latents;
  * attention goes through `CoreAttention` modules that context parallelism swaps out;
  * `Conditioning` carries what every block needs (timestep vector, text, masks, RoPE table).
The dimensions come in as `DiTArgs` (sora_dist/config/model.py, torch-free: it also counts
parameters and FLOPs for the trainer's MFU and the layout planner).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sora_dist.config.model import DiTArgs
from sora_dist.models.attention import CoreAttention, Runs
from sora_dist.models.embeddings import (
    PatchEmbed3D, TimestepEmbedder, apply_rope, build_rope_3d, unpatchify,
)
from sora_dist.models.modulation import gated_add, modulate


@dataclass
class Conditioning:
    """Per-batch inputs every block needs. Parallel wrappers shard `rope`/`token_mask` by
    sequence alongside the tokens; `c`, `text` and `text_mask` stay whole."""
    c_BD: torch.Tensor            # timestep embedding
    text_BLD: torch.Tensor        # projected caption tokens
    text_mask_BL: torch.Tensor    # True = real caption token
    rope_SP2: torch.Tensor        # RoPE cos/sin for this rank's tokens
    token_mask_BS: Optional[torch.Tensor] = None  # True = real video token (None: all real)
    grid: tuple[int, int, int] = (1, 1, 1)       # patch grid (T', H', W') before any padding
    shape_THW: tuple[int, int, int] = (1, 1, 1)  # latent T/H/W before patch padding
    # When c_BD is a table of rows per sample (B, K, ...) rather than one vector (WanDiT with
    # per-frame timesteps): each token's row, for the residual-stream tokens this rank holds
    # (`rows_S`) and for the tokens the head sees (`head_rows_S`: under SP the head runs on the
    # whole CP chunk). None: c_BD is per sample (models/modulation.py).
    rows_S: Optional[torch.Tensor] = None
    head_rows_S: Optional[torch.Tensor] = None
    # Packed sequences (B = 1, samples of any size one after another; models/packing.py): the
    # sample of each token (this rank's CP chunk, like token_mask; CP padding gets id -1) and
    # the real sequence length (the head crops to it). Self-attention stays within a sample,
    # cross-attention reads the token's own caption (text_BLD then holds one per sample).
    doc_S: Optional[torch.Tensor] = None
    seq_len: Optional[int] = None
    # The runs of those ids ((start, end, id) each, models/attention.py Runs), worked out on the
    # host when the pack is built (from its grids), so attention never reads doc_S back from the
    # device: `doc_runs` are doc_S's (cross-attention, on this rank's tokens), `cp_doc_runs`
    # those of the whole sequence over the CP group (self-attention's keys; = doc_runs without CP).
    doc_runs: Optional[Runs] = None
    cp_doc_runs: Optional[Runs] = None

    def with_(self, **kw) -> "Conditioning":
        return replace(self, **kw)


def packed_conditioning(c_KX, text_KLD, text_mask_KL, grids_K3, head_dim: int,
                        length: Optional[int] = None) -> Conditioning:
    """The Conditioning of a packed sequence (batch 1): per-sample conditioning vectors become
    a table (1, K, ...) whose rows the tokens select by sample; RoPE restarts per sample.
    length > the samples' tokens: the sequence ends in padding tokens (a pipeline microbatch's
    pack padded to the schedule's shape, models/packing.py:split_pack) that belong to no sample
    (id -1: no attention to or from them, no caption) and read table row 0; the head keeps them
    (their loss weight is 0)."""
    from sora_dist.models.attention import pack_runs
    from sora_dist.models.packing import packed_layout

    if c_KX.shape[0] != grids_K3.shape[0]:
        raise ValueError(f"a pack of {grids_K3.shape[0]} samples got {c_KX.shape[0]} timesteps")
    ids, rope, counts = packed_layout(grids_K3, head_dim, c_KX.device)
    S = sum(counts)
    rows, L = ids, S if length is None else length
    if L < S:
        raise ValueError(f"a pack of {S} tokens cannot be {L} long")
    if L > S:
        rows, ids = F.pad(ids, (0, L - S)), F.pad(ids, (0, L - S), value=-1)
        rope = F.pad(rope, (0, 0, 0, 0, 0, L - S))
    runs = pack_runs(counts, L)
    return Conditioning(c_BD=c_KX[None], text_BLD=text_KLD, text_mask_BL=text_mask_KL, rope_SP2=rope,
                        grid=(1, 1, L), shape_THW=(1, 1, L), rows_S=rows, head_rows_S=rows, doc_S=ids,
                        seq_len=L, doc_runs=runs, cp_doc_runs=runs)


def self_attention(attn: nn.Module, x_BSD: torch.Tensor, cond: "Conditioning") -> torch.Tensor:
    """A block's self-attention module on its tokens: inside a compiled block for a batch, and
    for a pack outside it (_packed_self_attention)."""
    if cond.doc_S is None:  # all five inputs: tensor parallel's input plan counts them
        return attn(x_BSD, cond.rope_SP2, cond.token_mask_BS, None, None)
    return _packed_self_attention(attn, x_BSD, cond)


def cross_attention(attn: nn.Module, x_BSD: torch.Tensor, cond: "Conditioning") -> torch.Tensor:
    if cond.doc_S is None:
        return attn(x_BSD, cond.text_BLD, cond.text_mask_BL, None, None)
    return _packed_cross_attention(attn, x_BSD, cond)


# A pack's attention sub-modules (projections, the kernel calls, CP's communication inside
# them) run outside torch.compile's graphs, handed the Conditioning whole. The kernel calls
# follow the pack's layout (its Runs, Python ints): traced inside a compiled block they were
# constants, one ~30 s compile per new layout on this CPU and eager for good after dynamo's
# recompile limit (8); passed across a graph break, their length was guarded (one compile per
# sample count). Read only out here, they are no guard: the compiled rest of the block settles on
# dynamic sizes after at most 3 compiles (tests/unit/test_packing_model.py).
@torch.compiler.disable
def _packed_self_attention(attn, x_BSD, cond):
    return attn(x_BSD, cond.rope_SP2, cond.token_mask_BS, cond.doc_S, cond.cp_doc_runs)


@torch.compiler.disable
def _packed_cross_attention(attn, x_BSD, cond):
    return attn(x_BSD, cond.text_BLD, cond.text_mask_BL, cond.doc_S, cond.doc_runs)


def cross_attention_per_sample(attn, q_BHSD, k_KHLD, v_KHLD, text_mask_KL, doc_S, runs=None):
    """Cross-attention of a packed sequence: each run of a sample's tokens attends to that
    sample's caption only (k/v hold one caption per sample). Padding tokens (id < 0) get 0.
    runs: doc_S's (Conditioning.doc_runs); read from doc_S when None."""
    from sora_dist.models.attention import _from_batch, _group_pieces, sample_groups

    groups = sample_groups(runs, doc_S)
    outs = []
    for (a, n, c, i), q in zip(groups, _group_pieces(q_BHSD, groups)):
        if i < 0:
            outs.append(q_BHSD.new_zeros(*q_BHSD.shape[:2], n * c, v_KHLD.shape[-1]))
        else:  # c neighbouring samples of n tokens each, batched with their c captions
            m = None if text_mask_KL is None else text_mask_KL[i:i + c]
            outs.append(_from_batch(attn(q, k_KHLD[i:i + c], v_KHLD[i:i + c], m)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class _Attention(nn.Module):
    """Projections shared by self- and cross-attention. Separate q/k/v (not one fused qkv) so
    tensor parallel can split each by heads (column-wise); qk RMSNorm per head."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, backend: str, sdpa_kernel: str = "auto"):
        super().__init__()
        self.head_dim = dim // num_heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.core_attention = CoreAttention(backend, sdpa_kernel)
        self.wo = nn.Linear(dim, dim)

    def _heads(self, x_BSD, proj, norm=None):
        # -1 heads: under TP each rank holds num_heads/tp of them.
        h = proj(x_BSD).view(x_BSD.shape[0], x_BSD.shape[1], -1, self.head_dim)
        return (norm(h) if norm is not None else h).transpose(1, 2)


class SelfAttention(_Attention):
    """Multi-head self-attention over video tokens with 3D RoPE."""

    def forward(self, x_BSD, rope_SP2, token_mask_BS=None, doc_S=None, doc_runs=None):
        B, S, _ = x_BSD.shape
        q = apply_rope(self._heads(x_BSD, self.wq, self.q_norm), rope_SP2)
        k = apply_rope(self._heads(x_BSD, self.wk, self.k_norm), rope_SP2)
        v = self._heads(x_BSD, self.wv)
        o = (self.core_attention(q, k, v, token_mask_BS) if doc_S is None
             else self.core_attention(q, k, v, token_mask_BS, doc_S, doc_runs))
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class CrossAttention(_Attention):
    """Video tokens attend to caption tokens (masked). Sequence-local: no CP communication."""

    def forward(self, x_BSD, text_BLD, text_mask_BL, doc_S=None, doc_runs=None):
        B, S, _ = x_BSD.shape
        q = self._heads(x_BSD, self.wq, self.q_norm)
        k = self._heads(text_BLD, self.wk, self.k_norm)
        v = self._heads(text_BLD, self.wv)
        o = (self.core_attention(q, k, v, text_mask_BL) if doc_S is None
             else cross_attention_per_sample(self.core_attention, q, k, v, text_mask_BL, doc_S, doc_runs))
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulated self-attn and MLP (gates start at 0, so each block starts
    as the identity), with un-modulated cross-attention to the caption in between (PixArt)."""

    def __init__(self, a: DiTArgs):
        super().__init__()
        D = a.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, a.num_heads, a.qk_norm, a.attention_backend, a.sdpa_kernel)
        self.norm_cross = nn.LayerNorm(D, eps=1e-6)
        self.cross_attn = CrossAttention(D, a.num_heads, a.qk_norm, a.attention_backend, a.sdpa_kernel)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(D, a.mlp_width, a.dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x_BSD: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # Patch embedding hands the first block a transposed view. A no-op for every later block;
        # for the first it also keeps torch.compile + op-level selective checkpointing exact
        # (measured on torch 2.13: a strided input gave compiled SAC gradients 1e-2 off).
        x_BSD = x_BSD.contiguous()
        # (B, D) each, or (B, K, D) per packed sample with cond.rows_S naming each token's row.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(cond.c_BD).chunk(6, dim=-1)
        )
        rows = cond.rows_S
        h = modulate(self.norm1(x_BSD), shift_msa, scale_msa, rows)
        a = self_attention(self.attn, h, cond)
        x_BSD = gated_add(x_BSD, a, gate_msa, rows)
        x_BSD = x_BSD + cross_attention(self.cross_attn, self.norm_cross(x_BSD), cond)
        h = modulate(self.norm2(x_BSD), shift_mlp, scale_mlp, rows)
        return gated_add(x_BSD, self.mlp(h), gate_mlp, rows)


class FinalLayer(nn.Module):
    def __init__(self, a: DiTArgs):
        super().__init__()
        D = a.hidden_size
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, a.patch_size[0] * a.patch_size[1] * a.patch_size[2] * a.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x_BSD, c_BD, rows_S=None):
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x_BSD), shift, scale, rows_S))


def init_dit_weights(module: nn.Module, zero_init: bool = True) -> None:
    """VideoDiT's init on the whole model or any part holding its submodules under the same
    names (a pipeline stage: some blocks, with or without the embedders / final layer)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, RMSNorm)) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    if hasattr(module, "t_embedder"):
        for lin in (module.t_embedder.mlp[0], module.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
    if getattr(module, "null_text", None) is not None:
        nn.init.normal_(module.null_text, std=0.02)
    if zero_init:
        for blk in module.blocks.values():
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        if hasattr(module, "final_layer"):
            fl = module.final_layer
            for t in (fl.adaLN_modulation[-1].weight, fl.adaLN_modulation[-1].bias,
                      fl.linear.weight, fl.linear.bias):
                nn.init.zeros_(t)


class DiTSeams(nn.Module):
    """What VideoDiT and WanDiT share after their own embed(): the blocks in order, then the
    final layer and unpatchify. These are the seams parallel/ wraps (sequence sharding replaces
    embed/head on the instance, pipeline stages bind them to a part of the model)."""

    def final(self, tokens_BSD: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The final layer on tokens (the sequence seam runs it on this rank's CP chunk)."""
        return self.final_layer(tokens_BSD, cond.c_BD, cond.head_rows_S)

    def head(self, tokens_BSD: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.to_latents(self.final(tokens_BSD, cond), cond)

    def to_latents(self, out_BSP: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Final-layer tokens (B, S, pt*ph*pw*C) -> latents (B, C, T, H, W), padding cropped.
        A packed sequence stays in token layout (models/packing.py unpacks it)."""
        if cond.seq_len is not None:
            return out_BSP[:, :cond.seq_len]
        return unpatchify(out_BSP, cond.grid, self.args.patch_size, self.args.in_channels, cond.shape_THW)

    def forward(self, x_BCTHW, t_B, text_BLD, text_mask_BL, drop_text_B=None, grids_K3=None):
        tokens, cond = self.embed(x_BCTHW, t_B, text_BLD, text_mask_BL, drop_text_B, grids_K3)
        for blk in self.blocks.values():
            tokens = blk(tokens, cond)
        return self.head(tokens, cond)


class VideoDiT(DiTSeams):
    """Predicts epsilon (DDPM) or velocity (flow) for latents x (B, C, T, H, W) at time t,
    conditioned on caption embeddings (B, L, text_dim) with a mask. T/H/W may differ between
    batches and need not divide by the patch (they are padded then cropped)."""

    def __init__(self, args: DiTArgs):
        super().__init__()
        self.args = args
        D = args.hidden_size
        self.x_embedder = PatchEmbed3D(args.in_channels, D, args.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        # Caption projection (PixArt's y_embedder) and the learned "empty caption" for CFG.
        self.y_embedder = nn.Sequential(
            nn.Linear(args.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D)
        )
        self.null_text = nn.Parameter(torch.zeros(args.text_dim))
        self.blocks = nn.ModuleDict({str(i): DiTBlock(args) for i in range(args.depth)})
        self.final_layer = FinalLayer(args)
        self.init_weights()

    init_part = staticmethod(init_dit_weights)  # the init of a part (a pipeline stage)

    @torch.no_grad()
    def init_weights(self, zero_init: Optional[bool] = None) -> None:
        """DiT init: xavier linears, N(0, .02) embedders; adaLN and output zeroed (adaLN-Zero)
        unless zero_init (default: args.zero_init) is False, which keeps every weight random."""
        init_dit_weights(self, self.args.zero_init if zero_init is None else zero_init)

    def embed(
        self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text_BLD: torch.Tensor,
        text_mask_BL: torch.Tensor, drop_text_B: Optional[torch.Tensor] = None,
        grids_K3: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Conditioning]:
        """Patchify and build the conditioning. drop_text_B (bool) swaps those captions for the
        learned null caption: one valid token, so masked attention never sees an empty row.
        With grids_K3, x is a packed sequence of K samples (models/packing.py) and t, text,
        text_mask, drop_text hold one entry per sample; tokens past the samples' are padding."""
        tokens_BSD, grid = self.x_embedder(x_BCTHW)
        text_mask_BL = text_mask_BL.bool()
        if drop_text_B is not None:
            null_BLD = torch.zeros_like(text_BLD)
            null_BLD[:, 0] = self.null_text.to(text_BLD.dtype)
            null_mask = torch.zeros_like(text_mask_BL)
            null_mask[:, 0] = True
            d = drop_text_B.bool()
            text_BLD = torch.where(d[:, None, None], null_BLD, text_BLD)
            text_mask_BL = torch.where(d[:, None], null_mask, text_mask_BL)
        c, text = self.t_embedder(t_B), self.y_embedder(text_BLD)
        if grids_K3 is not None:
            return tokens_BSD, packed_conditioning(c, text, text_mask_BL, grids_K3, self.args.head_dim,
                                                   tokens_BSD.shape[1])
        cond = Conditioning(
            c_BD=c,
            text_BLD=text,
            text_mask_BL=text_mask_BL,
            rope_SP2=build_rope_3d(grid, self.args.hidden_size // self.args.num_heads, tokens_BSD.device),
            grid=grid,
            shape_THW=tuple(x_BCTHW.shape[-3:]),
        )
        return tokens_BSD, cond



def build_dit(model_cfg) -> VideoDiT:
    return VideoDiT(DiTArgs.from_config(model_cfg))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

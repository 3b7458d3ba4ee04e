"""Packed sequences (NaViT's Patch n' Pack): samples of any T/H/W one after another in a single
token sequence (batch 1), so mixed images and videos train without padding.

Layout, shared by the data side, the models and the loss:
  * input  x (1, S, C*pt*ph*pw): each sample's latent cut into patches, tokens in (t, h, w)
    raster order, each patch flattened (c, pt, ph, pw) (the patch embedding's conv weight order);
  * grids  (K, 3) int64: each sample's patch grid (T', H', W'), in pack order;
  * per sample: t (K,), caption (K, L, E) with its mask (K, L), caption drop (K,);
  * output and target (1, S, pt*ph*pw*C): the final layer's token layout (pt, ph, pw, c); the
    target carries one more column, each token's loss weight (`pack_targets`).
Sample dims must divide by the patch (the loader checks): a pack holds no padding inside a
sample. Pipeline parallelism deals a pack's samples to microbatches of one shape (`split_pack`):
those end in padding tokens that belong to no sample and weigh nothing in the loss.

Loss weighting: every sample weighs the same, as in an unpacked batch (the mean over a batch
of equal-size samples is the mean of their per-sample means): loss = mean over the pack's
samples of each sample's mean squared error. A token's weight is 1 / (K * tokens_i * P*C).
"""
from __future__ import annotations

import math
import random

import torch
from einops import rearrange

from sora_dist.models.embeddings import build_rope_3d


def check_divisible(shape_CTHW, patch) -> None:
    if any(n % p for n, p in zip(shape_CTHW[-3:], patch)):
        raise ValueError(f"a packed sample's latent T/H/W {tuple(shape_CTHW[-3:])} must divide by the "
                         f"patch {tuple(patch)} (packs hold no padding)")


def pack_latents(latents: list[torch.Tensor], patch) -> tuple[torch.Tensor, torch.Tensor]:
    """K latents (C, T_i, H_i, W_i) -> (x (1, S, C*P) in (c pt ph pw) order, grids (K, 3))."""
    pt, ph, pw = patch
    parts, grids = [], []
    for x in latents:
        check_divisible(x.shape, patch)
        parts.append(rearrange(x, "c (t pt) (h ph) (w pw) -> (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw))
        grids.append([x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw])
    return torch.cat(parts)[None], torch.tensor(grids, dtype=torch.long)


def token_counts(grids_K3: torch.Tensor) -> list[int]:
    return grids_K3.prod(1).tolist()


def unpack_tokens(out_1SP: torch.Tensor, grids_K3: torch.Tensor, patch, channels: int) -> list[torch.Tensor]:
    """Model output (1, S, pt*ph*pw*C) -> K latents (C, T_i, H_i, W_i)."""
    pt, ph, pw = patch
    outs, start = [], 0
    for (T, H, W) in grids_K3.tolist():
        n = T * H * W
        outs.append(rearrange(out_1SP[0, start:start + n], "(t h w) (pt ph pw c) -> c (t pt) (h ph) (w pw)",
                              t=T, h=H, w=W, pt=pt, ph=ph, pw=pw, c=channels))
        start += n
    return outs


def pack_targets(targets: list[torch.Tensor], patch) -> torch.Tensor:
    """K per-sample targets (C, T, H, W) -> (1, S, P*C + 1): the output layout plus each token's
    loss weight 1 / (K * tokens_i * P*C) (every sample weighs the same)."""
    pt, ph, pw = patch
    K = len(targets)
    parts = []
    for y in targets:
        tok = rearrange(y, "c (t pt) (h ph) (w pw) -> (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
        w = torch.full((tok.shape[0], 1), 1.0 / (K * tok.numel()), dtype=tok.dtype, device=tok.device)
        parts.append(torch.cat([tok, w], dim=1))
    return torch.cat(parts)[None]


def packed_loss(out_1SP: torch.Tensor, target_1SP1: torch.Tensor) -> torch.Tensor:
    """Per-sample-mean MSE of a pack (see the module docstring), in fp32."""
    y, w = target_1SP1[..., :-1].float(), target_1SP1[..., -1:].float()
    return ((out_1SP.float() - y).square() * w).sum()


def uniform_batch(xs: list[torch.Tensor], targets: list[torch.Tensor]):
    """A pack whose samples all have one shape is a batch: (x (K, C, T, H, W), target) to run
    through the batched path, or None. Same inputs, and the same loss: the batch's MSE averages
    equal-size samples with equal weights, as packed_loss does. The batched path skips the
    per-token modulation rows and per-sample embedding/unpatchify work (a one-sample pack of a
    9x16x16 clip: 6.6% of its CPU step); a quarter to a third of packs are one long clip alone."""
    if len({tuple(x.shape) for x in xs}) != 1:
        return None
    return torch.stack(xs), torch.stack(targets)


def packed_layout(grids_K3: torch.Tensor, head_dim: int, device=None):
    """(sample id of each token (S,), RoPE table restarting per sample (S, head_dim/2, 2), each
    sample's token count (a list: the host-side layout, models/attention.py pack_runs)).
    A (0, 0, 0) grid is a padding sample (split_pack) and owns no token."""
    grids = grids_K3.tolist()  # the one host read of a pack's layout
    counts = [T * H * W for T, H, W in grids]
    # output_size: the length is known here, so a GPU need not report it back (a sync).
    ids = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                  torch.tensor(counts, device=device, dtype=torch.long), output_size=sum(counts))
    ropes = [build_rope_3d(tuple(g), head_dim, device) for g, n in zip(grids, counts) if n]
    rope = torch.cat(ropes) if ropes else torch.zeros(0, head_dim // 2, 2, device=device)
    return ids, rope, counts


def coarse_ceil(n: int, bits: int = 4) -> int:
    """n rounded up to `bits` significant binary digits: at most 2^(1-bits) more (1/8 for 4 bits),
    and only 2^(bits-1) values per octave, so padded lengths recur from step to step."""
    q = 1 << max(int(n).bit_length() - bits, 0)
    return max(-(-int(n) // q) * q, 1)


def deal_samples(tokens: list[int], parts: int) -> list[list[int]]:
    """Samples (token counts, pack order) dealt to `parts` groups: largest first, each to the
    least-filled group (ties: the lower group, then pack order), which keeps the largest group
    close to sum/parts unless one sample is longer than that. Each group lists its samples in
    pack order; a group is empty when the pack has fewer samples than parts."""
    loads, groups = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        g = min(range(parts), key=lambda j: (loads[j], j))
        groups[g].append(i)
        loads[g] += tokens[i]
    return [sorted(g) for g in groups]


def microbatch_tokens_bound(budget: int, longest: int, parts: int) -> int:
    """The most tokens split_pack pads a pipeline microbatch to, for any pack of <= budget tokens
    whose samples hold <= longest each. deal_samples gives each sample to the least-filled group,
    so when the largest group took its last sample s it held at most (total - s) / parts: it
    ends at <= budget / parts + longest * (parts - 1) / parts, and never above the budget;
    split_pack then rounds up with coarse_ceil (monotone). The planner plans packs under PP as
    `parts` microbatches of this length (tools/plan.py)."""
    raw = min(budget, math.ceil((budget + longest * (parts - 1)) / parts))
    return coarse_ceil(raw)


def split_pack(parts: int, x_1SP, t_K, text_KLE, text_mask_KL, drop_K, grids_K3, target_1SP1):
    """A pack as `parts` pipeline microbatches of one shape (a schedule's P2P buffers are fixed):
    whole samples dealt by `deal_samples`, each microbatch padded to L tokens (its largest,
    rounded up by `coarse_ceil`) and Kp samples (a power of two). Padding tokens are zero with
    loss weight 0 and belong to no sample (the model gives them id -1, packed_conditioning);
    padding samples have grid (0, 0, 0), t 0 and an empty caption mask. The targets keep the
    pack's weights, so the microbatches' packed_loss values sum to the pack's.

    Returns (x (parts, L, C*P), t (parts*Kp,), text (parts*Kp, L_text, E), text_mask, drop,
    grids (parts*Kp, 3), target (parts, L, P*C+1)): stacked on dim 0, which torch's schedule
    chunks into the microbatches (one pack (1, L, ...) and its Kp samples each)."""
    counts = token_counts(grids_K3)
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    groups = deal_samples(counts, parts)
    L = coarse_ceil(max(sum(counts[i] for i in g) for g in groups))
    Kp = 1 << max(max(len(g) for g in groups) - 1, 0).bit_length()

    def tokens(src_1SX, g):  # this group's tokens, zero-padded to L
        rows = [src_1SX[0, starts[i]:starts[i + 1]] for i in g]
        out = src_1SX.new_zeros(L, src_1SX.shape[-1])
        if rows:
            cat = torch.cat(rows)
            out[:cat.shape[0]] = cat
        return out

    def samples(src_K, g):  # this group's per-sample rows, zero-padded to Kp
        out = src_K.new_zeros(Kp, *src_K.shape[1:])
        out[:len(g)] = src_K[g]
        return out

    x = torch.stack([tokens(x_1SP, g) for g in groups])
    target = torch.stack([tokens(target_1SP1, g) for g in groups])
    per_sample = [torch.cat([samples(v, g) for g in groups]) for v in (t_K, text_KLE, text_mask_KL, drop_K, grids_K3)]
    return (x, *per_sample, target)


def cp_attention_work(tokens: list[int], cp: int) -> list[int]:
    """Self-attention work of each CP rank for samples of these token counts, in this order,
    cut into cp contiguous equal chunks (padding to a multiple of cp counts for nothing): a query
    attends to every key of its own sample, so each token costs its sample's length."""
    S = sum(tokens)
    chunk = -(-S // cp)
    work, start = [0] * cp, 0
    for n in tokens:
        a, b = start, start + n
        for r in range(a // chunk, min(cp - 1, (b - 1) // chunk) + 1):
            work[r] += n * (min(b, (r + 1) * chunk) - max(a, r * chunk))
        start = b
    return work


def cp_balanced_order(tokens: list[int], cp: int, sweeps: int = 4) -> list[int]:
    """An order of the samples whose contiguous CP chunks carry nearly equal attention work
    (cp_attention_work), not just equal tokens: long samples cost quadratically, so a pack in
    the loader's largest-first order gives the first CP ranks most of the work. Deterministic:
    start from alternating large and small samples, then swap pairs while the busiest rank's
    work drops. Ring CP gains (each rank computes its own queries); Ulysses is balanced anyway."""
    K = len(tokens)
    if cp <= 1 or K <= 1:
        return list(range(K))
    by_size = sorted(range(K), key=lambda i: (-tokens[i], i))
    order, lo, hi = [], 0, K - 1
    while lo <= hi:  # large, small, large, small, ...
        order.append(by_size[lo])
        lo += 1
        if lo <= hi:
            order.append(by_size[hi])
            hi -= 1

    def cost(o):
        w = cp_attention_work([tokens[i] for i in o], cp)
        return (max(w), sorted(w, reverse=True))

    best = cost(order)
    if K > 32:
        # All pair swaps would be O(K^2) evaluations per sweep: try a fixed budget of seeded
        # random swaps instead (a few tens of ms), keeping those that help.
        rng = random.Random(K * 1000003 + cp)
        for _ in range(1500):
            i, j = rng.randrange(K), rng.randrange(K)
            order[i], order[j] = order[j], order[i]
            c = cost(order)
            if c < best:
                best = c
            else:
                order[i], order[j] = order[j], order[i]
        return order
    for _ in range(sweeps):
        improved = False
        for i in range(K):
            for j in range(i + 1, K):
                order[i], order[j] = order[j], order[i]
                c = cost(order)
                if c < best:
                    best, improved = c, True
                else:
                    order[i], order[j] = order[j], order[i]
        if not improved:
            break
    return order

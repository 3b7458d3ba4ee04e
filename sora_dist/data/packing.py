"""Patch n' Pack: per-DP-rank token-budget packs of mixed-size samples.

Why packing balances DP ranks without communication. With bucket batches, one DP rank may draw
a batch of 21-frame clips while another draws images; every step waits for the slowest rank.
Here every rank fills its own pack to (nearly) the same budget, data.tokens_per_rank, from its
own stream, so per-step token counts differ only by each pack's unfilled tail. The packer keeps
that tail small by choosing from a look-ahead window: each pack is the subset of the waiting
samples whose tokens fill the budget best (an exact subset sum), so no rank has to know what the
others drew. Attention cost is quadratic in a sample's length, so packs of one long clip and of
many images still differ in attention FLOPs; tokens (linear layers, the bulk at video sizes) are
what the budget equalises.

Why an exact fill and not first-fit-decreasing. FFD (largest fitting sample first, until none
fits) stops at a gap smaller than every waiting sample; the best subset fills it. Simulated over
4 ranks x 300 packs, window 64, as test_packing.py's test_fill_and_dp_balance does: padding
0.80% (FFD) -> 0.30% at Wan-480p sizes (budget 36288 tokens); 3.61% -> 1.46% on the bench_pack
set (budget 576; worst-step imbalance 1.053 -> 1.049); 1.48% -> 0.00% at budget 1152. Among
equally full subsets the packer prefers one with the window's oldest sample, then larger
samples (FFD's order); a sample no full pack takes is forced in after `window` packs at the
head of the window (FFD, largest first, would starve small samples instead).

Determinism. The packer is a pure function of its input stream and of the window it starts
with; its whole state is that window, in stream order. The loaders save the window's sample
identities and re-create it on resume, so a resumed run draws exactly the same packs.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch


def sample_tokens(shape_THW: Sequence[int], patch: Sequence[int]) -> int:
    """Tokens of a latent of (T, H, W) under a (pt, ph, pw) patch: prod(ceil(dim / p))."""
    return math.prod(-(-int(d) // int(p)) for d, p in zip(shape_THW, patch))


def check_sample(shape_THW: Sequence[int], patch: Sequence[int], budget: int, name: str) -> int:
    """Token count of a sample that packing can take, or a ValueError naming it and the fix."""
    bad = [f"{a}={d}" for a, d, p in zip("THW", shape_THW, patch) if int(d) % int(p)]
    if bad:
        raise ValueError(f"{name}: latent T x H x W = {'x'.join(map(str, shape_THW))} does not divide by "
                         f"model.patch_size={list(patch)} ({', '.join(bad)}); packing cannot pad inside a "
                         "pack: re-encode the sample to a divisible size (sora-encode buckets), or set "
                         "data.packing=false")
    n = sample_tokens(shape_THW, patch)
    if n > budget:
        raise ValueError(f"{name}: {n} tokens (latent {'x'.join(map(str, shape_THW))}, patch "
                         f"{list(patch)}) do not fit one pack of data.tokens_per_rank={budget}; raise "
                         f"data.tokens_per_rank to >= {n} or shard the sequence with parallel.cp")
    return n


def resolve_packing(data_cfg, shapes: Sequence[Sequence[int]], patch: Sequence[int], what: str) -> tuple[int, str]:
    """(token budget, or 0 for bucket batches; a line for the log) of a loader whose samples
    come in `shapes` (latent T, H, W; `what` names where they come from). data.packing null
    packs when there is more than one shape and every one divides by the patch (bucket
    batches pad the others); data.tokens_per_rank 0 is the most tokens one bucket batch holds
    (data.bucket_batch_size, else data.batch_size, x the bucket's tokens): memory the bucket
    batches already needed."""
    shapes = sorted({tuple(int(v) for v in s) for s in shapes})
    packing = getattr(data_cfg, "packing", None)
    auto = packing is None
    odd = [s for s in shapes if any(d % p for d, p in zip(s, patch))]
    if auto:  # packs hold no padding inside a sample: sizes off the patch grid go in batches
        packing = len(shapes) > 1 and not odd
    if not packing:
        why = ("data.packing=false" if not auto else f"{what} holds one latent size" if len(shapes) <= 1 else
               f"{what} has sizes that do not divide by the patch {list(patch)}, e.g. {'x'.join(map(str, odd[0]))}; "
               "bucket batches pad them")
        return 0, f"data: bucket batches of data.batch_size={data_cfg.batch_size} ({why})"
    budget = int(getattr(data_cfg, "tokens_per_rank", 0) or 0)
    if budget <= 0:
        if not shapes:
            raise ValueError(f"data.packing=true with data.tokens_per_rank=0 needs the sample sizes to size the "
                             f"budget, and {what} lists none; set data.tokens_per_rank (at least the longest "
                             "sample's tokens)")
        table = {str(k): int(v) for k, v in (getattr(data_cfg, "bucket_batch_size", None) or {}).items()}
        bs = lambda s: table.get("x".join(map(str, s)), int(data_cfg.batch_size))  # noqa: E731
        big = max(shapes, key=lambda s: (bs(s) * sample_tokens(s, patch), sample_tokens(s, patch)))
        budget = bs(big) * sample_tokens(big, patch)
        src = "data.bucket_batch_size" if "x".join(map(str, big)) in table else "data.batch_size"
        size = (f"data.tokens_per_rank={budget} (the largest bucket batch: {src}={bs(big)} x "
                f"{sample_tokens(big, patch)} tokens of {'x'.join(map(str, big))})")
    else:
        size = f"data.tokens_per_rank={budget}"
    why = f"{what} mixes {len(shapes)} latent sizes" if auto else "data.packing=true"
    return budget, f"data: packs of {size} ({why})"


class Packer:
    """Deterministic best-fill packer over a look-ahead window.

    Items are dicts with an int "tokens" (<= budget; the loaders check that with check_sample).
    pack(pull) fills the window from pull() to `window` items (stream order), then takes the
    subset whose tokens come closest to the budget without passing it (exact, `best_fill`); of
    the equally full subsets, the one with the oldest item if any has it, then the one taking
    larger items (compared largest first, stream order between equal sizes). An oldest item
    that no full pack takes (say a 7 among 6s under a budget of 12) goes in by force once it has
    waited `window` packs at the head: every sample leaves within window x window packs. The pack lists its
    items largest first (stream order between equal sizes), so equal-size samples sit next to
    each other and attention batches them (models/attention.py same_length_groups). pull()
    returns None when a finite stream ends; the window then drains and pack() returns [] once it
    is empty.
    """

    def __init__(self, budget: int, window: int):
        if budget < 1 or window < 1:
            raise ValueError(f"packing needs tokens_per_rank >= 1 and pack_window >= 1 (got {budget}, {window})")
        self.budget, self.window_size = int(budget), int(window)
        self.window: list[dict] = []  # pending items, stream order
        # Packs made while window[0] waited at the head; at `window` it goes in by force. With
        # the window, the packer's whole state (the loaders save both).
        self.head_waits = 0

    def _fill(self, pull: Callable[[], Optional[dict]]) -> None:
        while len(self.window) < self.window_size:
            item = pull()
            if item is None:
                return
            self.window.append(item)

    def pack(self, pull: Callable[[], Optional[dict]]) -> list[dict]:
        self._fill(pull)
        w = self.window
        if not w:
            return []
        order = [0] + sorted(range(1, len(w)), key=lambda i: (-int(w[i]["tokens"]), i))
        if self.head_waits >= self.window_size:  # the oldest sample goes in, whatever the fill
            take = [0] + [order[1 + j] for j in best_fill([int(w[i]["tokens"]) for i in order[1:]],
                                                          self.budget - int(w[0]["tokens"]))]
        else:
            take = [order[j] for j in best_fill([int(w[i]["tokens"]) for i in order], self.budget)]
        out = [w[i] for i in sorted(take, key=lambda i: (-int(w[i]["tokens"]), i))]
        taken = set(take)
        self.window = [it for i, it in enumerate(w) if i not in taken]
        self.head_waits = 0 if 0 in taken else self.head_waits + 1
        return out


def best_fill(sizes: Sequence[int], capacity: int) -> list[int]:
    """Indices of the subset of `sizes` with the largest sum <= capacity (exact subset sum); of
    the subsets with that sum, the one that takes earlier items (index 0 first, lexicographic).

    Bitset dynamic programme on Python ints: reach[i] has bit s set when some subset of
    sizes[i:] sums to s (s <= capacity); O(len(sizes) x capacity / 64) word operations, after
    dividing sizes and capacity by their common divisor (token counts share the latent grid's
    factors). 64 items of odd sizes: 0.1 ms at a 36k-token budget, 2.4 ms at 460k (this CPU)."""
    if capacity <= 0 or not sizes:
        return []
    g = math.gcd(*sizes) or 1  # all zero: gcd 0
    cap, w = capacity // g, [s // g for s in sizes]
    mask = (1 << (cap + 1)) - 1
    reach = [0] * len(w) + [1]
    for i in range(len(w) - 1, -1, -1):
        reach[i] = (reach[i + 1] | (reach[i + 1] << w[i])) & mask
    left, out = reach[0].bit_length() - 1, []
    for i, wi in enumerate(w):
        if wi <= left and (reach[i + 1] >> (left - wi)) & 1:
            out.append(i)
            left -= wi
    return out


def fill_stats(packs_tokens: Sequence[int], budget: int) -> dict:
    """Fill figures of a list of pack sizes: mean fill and mean/worst padding (budget - tokens)."""
    pad = [(budget - t) / budget for t in packs_tokens]
    return {"packs": len(pad), "mean_fill": 1 - sum(pad) / len(pad), "mean_padding": sum(pad) / len(pad),
            "max_padding": max(pad)}


def dp_imbalance(tokens_per_rank_per_step: Sequence[Sequence[int]]) -> dict:
    """max/mean tokens over DP ranks, per step: the mean and the worst step."""
    r = [max(s) / (sum(s) / len(s)) for s in tokens_per_rank_per_step]
    return {"steps": len(r), "mean": sum(r) / len(r), "max": max(r)}


def collate_pack(samples: list[dict], pad_text_to: int = 0) -> dict:
    """One pack as the model takes it. Samples: dicts with latent (C, T, H, W), text (L_i, E),
    mask (L_i,) bool, tokens, key. Captions are padded to the pack's longest (or pad_text_to)."""
    L = max(max(s["text"].shape[0] for s in samples), pad_text_to)
    E = samples[0]["text"].shape[1]
    text = torch.zeros(len(samples), L, E)
    mask = torch.zeros(len(samples), L, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = s["text"].shape[0]
        text[i, :n] = s["text"].float() * s["mask"][:, None]  # zero past the mask, always
        mask[i, :n] = s["mask"]
    return {"packed": True, "latent": [s["latent"].float() for s in samples], "text": text,
            "text_mask": mask, "tokens": sum(int(s["tokens"]) for s in samples),
            "sample_tokens": [int(s["tokens"]) for s in samples], "keys": [s["key"] for s in samples]}

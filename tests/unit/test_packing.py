"""Patch n' Pack: the best-fill packer, its fill/balance figures, and the packing sources."""
import json
import random

import pytest
import torch

from sora_dist.config.data import DataConfig
from sora_dist.data.packing import Packer, best_fill, check_sample, dp_imbalance, fill_stats, sample_tokens
from sora_dist.data.synthetic import SyntheticLatents


def _puller(tokens):
    it = iter([{"tokens": t, "key": i} for i, t in enumerate(tokens)])
    return lambda: next(it, None)


def _all_packs(packer, pull):
    out = []
    while True:
        p = packer.pack(pull)
        if not p:
            return out
        out.append(p)


def test_token_count_and_sample_checks():
    assert sample_tokens((21, 60, 104), (1, 2, 2)) == 21 * 30 * 52
    assert sample_tokens((3, 7, 9), (1, 2, 2)) == 3 * 4 * 5  # ceil, as the model pads
    assert check_sample((2, 4, 6), (1, 2, 2), 12, "x") == 12
    with pytest.raises(ValueError) as e:
        check_sample((2, 4, 6), (1, 2, 2), 11, "shard-1.tar: sample 'k7'")
    msg = str(e.value)
    assert msg.startswith("shard-1.tar: sample 'k7': 12 tokens")
    assert "raise data.tokens_per_rank to >= 12 or shard the sequence with parallel.cp" in msg
    with pytest.raises(ValueError, match=r"s9: latent T x H x W = 3x4x5 does not divide by "
                                         r"model.patch_size=\[1, 2, 2\] \(W=5\).*data.packing=false"):
        check_sample((3, 4, 5), (1, 2, 2), 100, "s9")


def test_packer_fills_best_prefers_the_oldest_then_larger_samples_and_refills_the_window():
    # window [3,7,2,5,4]: 3+7 = 10 holds the oldest -> [7,3]; window [2,5,4,6,1]: no full pack holds
    # the oldest (2), 6+4 before 5+4+1 (larger first) -> [6,4]; then the rest -> [5,2,1]
    packs = _all_packs(Packer(10, 5), _puller([3, 7, 2, 5, 4, 6, 1]))
    assert [[it["tokens"] for it in p] for p in packs] == [[7, 3], [6, 4], [5, 2, 1]]
    # first-fit-decreasing would take 6 and stop at a gap of 4; the best fill is 5+5
    packs = _all_packs(Packer(10, 3), _puller([6, 5, 5]))
    assert [[it["tokens"] for it in p] for p in packs] == [[5, 5], [6]]
    # ties go to the earlier sample in the stream
    packs = _all_packs(Packer(4, 8), _puller([2, 2, 2, 2, 2]))
    assert [[it["key"] for it in p] for p in packs] == [[0, 1], [2, 3], [4]]


def test_a_sample_no_full_pack_takes_leaves_within_window_packs_at_the_head():
    # budget 12, a 7 among endless 6s: every best fill is 6+6; the 7 waits at the head for
    # `window` packs, then goes in by force (with nothing: no 6 fits beside it)
    it = iter([7] + [6] * 100)
    pull = (lambda c=iter(range(10**6)): {"tokens": next(it), "key": next(c)})
    packer = Packer(12, 4)
    packs = [[x["tokens"] for x in packer.pack(pull)] for _ in range(6)]
    assert packs == [[6, 6]] * 4 + [[7], [6, 6]] and packer.head_waits == 0
    assert best_fill([0, 0], 5) == [0, 1] and best_fill([3], 0) == []  # zero sizes, zero capacity


@pytest.mark.parametrize("seed", range(20))
def test_best_fill_is_the_exact_subset_sum_and_lexicographically_first(seed):
    import itertools
    rng = random.Random(seed)
    sizes = [rng.choice([3, 6, 9, 12, 21, 30]) * rng.choice([1, 1, 2]) for _ in range(rng.randint(1, 10))]
    cap = rng.randint(1, 120)
    got = best_fill(sizes, cap)
    subsets = [c for k in range(len(sizes) + 1) for c in itertools.combinations(range(len(sizes)), k)
               if sum(sizes[i] for i in c) <= cap]
    best = max(sum(sizes[i] for i in c) for c in subsets)
    first = min((c for c in subsets if sum(sizes[i] for i in c) == best),
                key=lambda c: [0 if i in c else 1 for i in range(len(sizes))])
    assert sum(sizes[i] for i in got) == best and tuple(got) == first


@pytest.mark.parametrize("seed", range(4))
def test_packs_are_deterministic_within_budget_and_emit_every_sample_once(seed):
    rng = random.Random(seed)
    tokens = [rng.choice([1, 3, 8, 20, 64, 100]) for _ in range(500)]
    packs = _all_packs(Packer(100, 16), _puller(tokens))
    assert all(0 < sum(it["tokens"] for it in p) <= 100 for p in packs)
    keys = [it["key"] for p in packs for it in p]
    assert sorted(keys) == list(range(len(tokens)))  # every sample exactly once
    again = _all_packs(Packer(100, 16), _puller(tokens))
    assert [[it["key"] for it in p] for p in again] == [[it["key"] for it in p] for p in packs]


# A realistic mixed set at Wan2.1 480p latent sizes (VAE 4x8x8, patch 1x2x2): images and clips
# of 1..21 latent frames (81 video frames) in five aspect ratios; budget = the longest sample.
ASPECTS = [(60, 104), (104, 60), (64, 64), (72, 96), (96, 72)]
BUDGET = 21 * 36 * 48


def _mixed_stream(seed):
    rng, i = random.Random(seed), 0
    while True:
        H, W = rng.choice(ASPECTS)
        T = 1 if rng.random() < 0.3 else rng.randint(1, 21)
        yield {"tokens": sample_tokens((T, H, W), (1, 2, 2)), "key": i}
        i += 1


def _simulate(dp, window, steps=200):
    per_rank = []
    for r in range(dp):
        stream, packer = _mixed_stream(1000 + r), Packer(BUDGET, window)
        per_rank.append([sum(it["tokens"] for it in packer.pack(lambda: next(stream))) for _ in range(steps)])
    return fill_stats([t for p in per_rank for t in p], BUDGET), dp_imbalance(list(zip(*per_rank)))


@pytest.mark.parametrize("dp", [2, 4])
def test_fill_and_dp_balance_on_a_mixed_set(dp):
    fill, imb = _simulate(dp, window=64)
    print(f"dp={dp}: padding mean {fill['mean_padding']:.2%} max {fill['max_padding']:.2%}, "
          f"imbalance mean {imb['mean']:.4f} worst step {imb['max']:.4f}")
    assert fill["mean_padding"] <= 0.02
    assert imb["mean"] <= 1.05 and imb["max"] <= 1.05
    # The bounds discriminate: without look-ahead (window 1: stream-order greedy) they fail.
    fill1, imb1 = _simulate(dp, window=1)
    assert fill1["mean_padding"] > 0.02 and imb1["max"] > 1.05


# ---- synthetic source ---------------------------------------------------------------------------
MIXED = [[1, 8, 8], [1, 6, 10], [1, 10, 6], [3, 8, 8], [2, 6, 10], [4, 4, 12], [5, 8, 8]]


def _syn_cfg(**kw):
    kw = {"source": "synthetic", "synthetic_buckets": MIXED, "synthetic_samples": 100_000, "packing": True,
          "tokens_per_rank": 96, "pack_window": 8, **kw}
    return DataConfig(**kw)


def test_synthetic_packs_mix_images_and_clips_in_the_batch_format():
    ld = SyntheticLatents(_syn_cfg(), 4, 8, 0, 1)
    shapes, keys = set(), []
    for _ in range(20):
        b = next(ld)
        K = len(b["latent"])
        assert b["packed"] is True and b["text"].shape == (K, 8, 8) and b["text_mask"].shape == (K, 8)
        assert b["text"].dtype == torch.float32 and b["text_mask"].dtype == torch.bool
        assert b["tokens"] == sum(b["sample_tokens"]) <= 96 and len(b["keys"]) == K
        for x, n in zip(b["latent"], b["sample_tokens"]):
            assert x.dtype == torch.float32 and x.shape[0] == 4 and n == sample_tokens(x.shape[1:], (1, 2, 2))
            shapes.add(tuple(x.shape[1:]))
        keys += b["keys"]
    assert {s[0] for s in shapes} >= {1, 5} and len({s[1] / s[2] for s in shapes}) >= 3  # mixed
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("stop", [1, 5])
def test_synthetic_resume_draws_the_same_packs(stop):
    ref = SyntheticLatents(_syn_cfg(), 4, 8, 1, 2)
    full = [next(ref) for _ in range(stop + 6)]
    ld = SyntheticLatents(_syn_cfg(), 4, 8, 1, 2)
    for _ in range(stop):
        next(ld)
    sd = json.loads(json.dumps(ld.state_dict()))
    assert sd["window"]  # the window really is restored
    resumed = SyntheticLatents(_syn_cfg(), 4, 8, 1, 2)
    resumed.load_state_dict(sd)
    for want in full[stop:]:
        got = next(resumed)
        assert got["keys"] == want["keys"] and torch.equal(got["text"], want["text"])
        assert all(torch.equal(a, b) for a, b in zip(got["latent"], want["latent"]))


def test_synthetic_dp_resize_with_packing_loses_and_repeats_nothing():
    old = [SyntheticLatents(_syn_cfg(), 4, 8, r, 3) for r in range(3)]
    emitted = [k for _ in range(9) for ld in old for k in next(ld)["keys"]]
    states = [json.loads(json.dumps(ld.state_dict())) for ld in old]
    waiting = {k for sd in states for k in sd["window"]}
    assert waiting and len({sd["read"] for sd in states}) > 1  # ranks read unevenly: gaps to fill
    new = [SyntheticLatents(_syn_cfg(), 4, 8, r, 2) for r in range(2)]
    for ld in new:
        assert "dp_size 3 -> 2" in ld.load_elastic_state(states)
    for _ in range(30):
        for ld in new:
            emitted += next(ld)["keys"]
    assert len(emitted) == len(set(emitted))                   # nothing repeats
    assert waiting <= set(emitted)                             # the old windows' samples come out
    held = {s["key"] for ld in new for s in ld.packer.window} | {ld._position(k) for ld in new
                                                                 for k in range(ld.read, len(ld.carry))}
    assert set(range(new[0].base_samples)) <= set(emitted) | held  # and nothing below the frontier is skipped


def test_synthetic_oversize_or_indivisible_bucket_is_named():
    with pytest.raises(ValueError, match=r"data.synthetic_buckets entry \[5, 8, 8\]: 80 tokens .* >= 80"):
        SyntheticLatents(_syn_cfg(tokens_per_rank=64), 4, 8, 0, 1)
    with pytest.raises(ValueError, match=r"data.synthetic_buckets entry \[3, 7, 9\].*does not divide"):
        SyntheticLatents(_syn_cfg(synthetic_buckets=[[3, 7, 9]]), 4, 8, 0, 1)
    SyntheticLatents(_syn_cfg(packing=False, synthetic_buckets=[[3, 7, 9]]), 4, 8, 0, 1)  # only when packing


def test_validate_names_the_token_budget():
    from sora_dist.config import ConfigError, JobConfig, validate
    cfg = JobConfig()
    cfg.data.packing = True
    validate(cfg)  # tokens_per_rank 0: sized by the loader from the longest sample
    cfg.data.tokens_per_rank = -1
    with pytest.raises(ConfigError, match=r"data.tokens_per_rank=-1 must be >= 0 \(0: data.batch_size x"):
        validate(cfg)
    cfg.data.tokens_per_rank = 4096
    validate(cfg)
    cfg.data.pack_window = 0
    with pytest.raises(ConfigError, match="data.pack_window=0"):
        validate(cfg)


def test_packing_by_default_on_mixed_sizes_with_a_budget_from_the_longest_sample():
    """data.packing null: packs when the samples come in more than one latent size, bucket
    batches when in one; data.tokens_per_rank 0: the largest bucket batch's tokens.
    The loaders' log line says which and why; explicit settings win."""
    from sora_dist.data.packing import resolve_packing

    mixed, one = [[1, 8, 8], [5, 8, 8], [3, 6, 10]], [[5, 8, 8]] * 3
    assert resolve_packing(DataConfig(batch_size=3), mixed, (1, 2, 2), "x") == (
        3 * 80, "data: packs of data.tokens_per_rank=240 (the largest bucket batch: data.batch_size=3 x 80 tokens "
                "of 5x8x8) (x mixes 3 latent sizes)")
    assert resolve_packing(DataConfig(), one, (1, 2, 2), "x") == (
        0, "data: bucket batches of data.batch_size=2 (x holds one latent size)")
    assert resolve_packing(DataConfig(packing=False), mixed, (1, 2, 2), "x")[0] == 0
    assert resolve_packing(DataConfig(), mixed + [[3, 7, 9]], (1, 2, 2), "x") == (
        0, "data: bucket batches of data.batch_size=2 (x has sizes that do not divide by the patch [1, 2, 2], "
           "e.g. 3x7x9; bucket batches pad them)")
    assert resolve_packing(DataConfig(packing=True), one, (1, 2, 2), "x")[0] == 2 * 80
    assert resolve_packing(DataConfig(tokens_per_rank=500), mixed, (1, 2, 2), "x")[0] == 500
    # a per-bucket batch table sets the budget: the most tokens one of its batches holds
    table = {"5x8x8": 1, "1x8x8": 16, "3x6x10": 2}
    assert resolve_packing(DataConfig(batch_size=8, bucket_batch_size=table), mixed, (1, 2, 2), "x") == (
        16 * 16, "data: packs of data.tokens_per_rank=256 (the largest bucket batch: data.bucket_batch_size=16 x "
                 "16 tokens of 1x8x8) (x mixes 3 latent sizes)")
    assert resolve_packing(DataConfig(batch_size=8, bucket_batch_size={"5x8x8": 1}), mixed, (1, 2, 2), "x")[0] == 8 * 45
    with pytest.raises(ValueError, match="lists none; set data.tokens_per_rank"):
        resolve_packing(DataConfig(packing=True), [], (1, 2, 2), "the manifest of /d")
    # the sources: the default synthetic config mixes two sizes, so it packs
    ld = SyntheticLatents(DataConfig(), 4, 8, 0, 1)
    assert ld.packer is not None and ld.packer.budget == 2 * 48 and next(ld)["packed"]
    assert SyntheticLatents(DataConfig(synthetic_buckets=[[3, 8, 8]]), 4, 8, 0, 1).packer is None


def test_ring_block_visibility_from_runs_equals_the_ids():
    """The ring's skip list from the Conditioning's host runs equals the one read from the sample
    ids (packs with padding, samples cut by the CP chunks, ring sizes 2-4)."""
    import random

    from sora_dist.models.attention import pack_runs
    from sora_dist.parallel.context_parallel.ring import _doc_blocks, block_visibility

    rng = random.Random(0)
    for _ in range(200):
        R = rng.choice([2, 3, 4])
        counts = [rng.choice([0, 1, 3, 8, 17, 40]) for _ in range(rng.randint(1, 6))]
        S = -(-max(sum(counts), 1) // R) + rng.randint(0, 5)
        runs = pack_runs(counts, R * S)
        doc = torch.cat([torch.full((b - a,), i) for a, b, i in runs])
        for r in range(R):
            assert block_visibility(runs, R, r, S) == _doc_blocks(doc, R, r, S)[2], (counts, R, S, r)

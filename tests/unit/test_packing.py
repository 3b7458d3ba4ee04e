"""Patch n' Pack: the best-fill packer, its fill/balance figures, and the packing sources."""
import itertools
import json
import random

import pytest
import torch

from sora_dist.config.data import DataConfig
from sora_dist.config.model import DiTArgs
from sora_dist.data.packing import (Packer, best_fill, check_sample, dp_imbalance, fill_cost,
                                    fill_stats, pack_ranks, sample_flops, sample_tokens)
from sora_dist.data.synthetic import SyntheticLatents
from sora_dist.testing import ThreadAllGather, run_threads


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


# ---- packs balanced by modelled cost over DP ranks (data.pack_balance=flops) ----------------------
@pytest.mark.parametrize("seed", range(20))
def test_fill_cost_is_the_costliest_subset_within_the_cost_and_the_budget(seed):
    # integer costs and levels = T: the rounding is exact, so brute force is the reference
    rng = random.Random(seed)
    tokens = [rng.choice([2, 4, 6, 10, 14]) for _ in range(rng.randint(1, 9))]
    costs = [float(t + t * t // rng.choice([4, 16])) for t in tokens]
    budget, forced = rng.randint(max(tokens), 40), rng.random() < 0.3
    subsets = [c for k in range(len(tokens) + 1) for c in itertools.combinations(range(len(tokens)), k)
               if sum(tokens[i] for i in c) <= budget and (0 in c or not forced)]
    for T in sorted({int(sum(costs[i] for i in c)) for c in subsets if c})[::2] + [int(min(costs)) - 1]:
        if T < 1:
            continue
        cost, take = fill_cost(tokens, costs, budget, float(T), forced, levels=T)
        fit = [c for c in subsets if sum(costs[i] for i in c) <= T]
        if forced and costs[0] > T:
            assert (cost, take) == (0.0, [])
            continue
        best = max(sum(costs[i] for i in c) for c in fit)
        fewest = min(sum(tokens[i] for i in c) for c in fit if sum(costs[i] for i in c) == best)
        assert cost == best == sum(costs[i] for i in take) and len(set(take)) == len(take)
        assert sum(tokens[i] for i in take) == fewest <= budget and (0 in take or not forced)
    # with the default levels the rounding only ever gives up cost, never passes T
    cost, take = fill_cost(tokens, costs, budget, 0.7 * sum(costs), False)
    assert cost <= 0.7 * sum(costs) and sum(tokens[i] for i in take) <= budget


WAN13 = DiTArgs.from_flavor("wan2.1-1.3b")


def _balanced_run(dp, cost, settle=200, steps=200, window=64):
    """DP steps of the Wan-480p mixed set, measured after `settle` steps (the windows' mix settles:
    balanced packs take cheap samples first until the costly ones must go): tokens per modelled
    second, DP wait and unfilled token budget of the modelled step, the T=1 share of the tokens."""
    streams = [_mixed_stream(1000 + r) for r in range(dp)]
    packers = [Packer(BUDGET, window) for _ in range(dp)]
    pulls = [lambda s=s: next(s) for s in streams]
    flops = sample_flops(WAN13, 512)
    tok = slow = mean = t1 = 0.0
    keys = []
    for step in range(settle + steps):
        packs = pack_ranks(packers, pulls, cost)
        assert all(0 < sum(it["tokens"] for it in p) <= BUDGET for p in packs)
        keys += [(r, it["key"]) for r, p in enumerate(packs) for it in p]
        if step >= settle:
            c = [sum(flops(it["tokens"]) for it in p) for p in packs]
            tok, slow, mean = tok + sum(it["tokens"] for p in packs for it in p), slow + max(c), mean + sum(c) / dp
            t1 += sum(it["tokens"] for p in packs for it in p if it["tokens"] <= 52 * 30)
    assert len(keys) == len(set(keys))
    return tok / slow, 1 - mean / slow, 1 - tok / (BUDGET * dp * steps), t1 / tok


@pytest.mark.parametrize("dp", [2, 8])
def test_flops_balanced_packs_cut_the_dp_wait_of_token_packs_at_wan_sizes(dp):
    """Token-equal packs at Wan2.1-1.3B sizes leave DP ranks waiting for the one with the long clip
    (attention ~ n^2); the balanced packs (every rank's arithmetic in one process, as the
    all-gathers give it) keep every rank busy within the same token budget, and train the same mix."""
    rate_t, wait_t, pad_t, t1_t = _balanced_run(dp, None)
    rate_f, wait_f, pad_f, t1_f = _balanced_run(dp, sample_flops(WAN13, 512))
    print(f"dp={dp}: DP wait tokens {wait_t:.1%} flops {wait_f:.1%}; unfilled budget {pad_t:.1%} / {pad_f:.1%}; "
          f"one-frame token share {t1_t:.1%} / {t1_f:.1%}; tokens per modelled second x{rate_f / rate_t:.3f}")
    assert wait_t > 0.08 and wait_f < 0.03 and rate_f > (1.05 if dp == 2 else 1.2) * rate_t
    assert pad_t < 0.01 and pad_f < 0.08  # the price: costly windows pack fewer tokens
    assert abs(t1_f - t1_t) < 0.02


def test_balanced_packs_emit_every_sample_once_and_drain_finite_streams():
    rng = random.Random(3)
    R, streams = 3, []
    for r in range(R):
        streams.append([{"tokens": rng.choice([1, 3, 8, 20, 64, 100]), "key": (r, i)} for i in range(200)])
    packers = [Packer(100, 16) for _ in range(R)]
    pulls = [(lambda it=iter(s): next(it, None)) for s in streams]
    cost = lambda n: n + n * n / 30  # noqa: E731
    out = [[] for _ in range(R)]
    for _ in range(1000):
        packs = pack_ranks(packers, pulls, cost)
        if not any(packs):
            break
        for r, p in enumerate(packs):
            assert sum(it["tokens"] for it in p) <= 100
            out[r] += [it["key"] for it in p]
    for r in range(R):  # each rank emits exactly its own samples, all of them
        assert sorted(out[r]) == [(r, i) for i in range(200)]


def test_synthetic_balanced_packs_resume_exactly_and_match_the_in_process_arithmetic():
    """Two DP ranks' SyntheticLatents with data.pack_balance=flops exchanging through a real
    all-gather (threads): the packs equal pack_ranks' on the same windows, and a resume from
    saved states continues them exactly."""
    from sora_dist.config.model import ModelConfig
    mcfg = ModelConfig(in_channels=4, text_dim=8)
    cfg = _syn_cfg(tokens_per_rank=120, pack_window=8)

    def loaders(ex):
        return [SyntheticLatents(cfg, 4, 8, r, 2, model_cfg=mcfg, exchange=ex.rank(r)) for r in range(2)]

    def steps(lds, n):
        return run_threads([lambda ld=ld: [next(ld)["keys"] for _ in range(n)] for ld in lds])

    lds = loaders(ThreadAllGather(2))
    assert "data.pack_balance=flops" in lds[0].layout_note
    full = steps(lds, 12)
    # the same packs from the packers alone, in one process
    solo = [SyntheticLatents(cfg, 4, 8, r, 2) for r in range(2)]
    cost = lds[0].balance.cost
    keys = [[[it["key"] for it in p] for p in pack_ranks([ld.packer for ld in solo], [ld._pull for ld in solo], cost)]
            for _ in range(12)]
    assert [[k[r] for k in keys] for r in range(2)] == full
    plain = [SyntheticLatents(cfg, 4, 8, r, 2) for r in range(2)]
    assert keys != [[[it["key"] for it in p] for p in pack_ranks([ld.packer for ld in plain],
                                                                [ld._pull for ld in plain], None)]
                    for _ in range(12)]
    # stop at 5, resume from the saved states
    lds = loaders(ThreadAllGather(2))
    first = steps(lds, 5)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in lds]
    lds = loaders(ThreadAllGather(2))
    for ld, sd in zip(lds, states):
        ld.load_state_dict(sd)
    second = steps(lds, 7)
    assert [a + b for a, b in zip(first, second)] == full


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


def test_the_balance_cost_model_weighs_attention_by_the_precisions():
    from sora_dist.config import ConfigError, JobConfig, validate
    from sora_dist.config.model import ModelConfig
    from sora_dist.data.packing import default_attention_cost, pack_balance
    assert default_attention_cost(ModelConfig()) == 1.0
    assert default_attention_cost(ModelConfig(fp8_attention=True, attention_backend="te")) == 0.5
    assert default_attention_cost(ModelConfig(fp8_linears="torchao")) == 2.0
    n = 21 * 30 * 52
    assert sample_flops(WAN13, 512)(n) == pytest.approx(WAN13.flops_per_sample(n, 512), rel=1e-12)
    f = WAN13.forward_flops(n, 512)
    assert sample_flops(WAN13, 512, 0.5)(n) == pytest.approx(3 * (f.linear + 0.5 * f.attention), rel=1e-12)
    mcfg = ModelConfig(in_channels=4, text_dim=8)
    ex = (lambda row: row[None])  # noqa: E731
    args = DiTArgs.from_config(mcfg)
    got = pack_balance(DataConfig(pack_attention_cost=0.25), mcfg, ex, 8).cost(300)
    assert got == pytest.approx(sample_flops(args, 8, 0.25)(300), rel=1e-12)
    assert pack_balance(DataConfig(pack_balance="tokens"), mcfg, ex, 8) is None
    assert pack_balance(DataConfig(), mcfg, None, 8) is None  # one DP rank: nothing to agree on
    cfg = JobConfig()
    cfg.data.pack_attention_cost = 0.0
    with pytest.raises(ConfigError, match="data.pack_attention_cost=0.0 must be > 0"):
        validate(cfg)

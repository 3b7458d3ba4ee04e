"""A packed sequence (models/packing.py) against the same samples run one at a time: outputs,
the per-sample-mean loss and every gradient (fp32, CPU), for VideoDiT and WanDiT; no sample
sees another."""
import pytest
import torch
import torch.nn.functional as F

from sora_dist.config.model import DiTArgs
from sora_dist.models import model_class
from sora_dist.models.packing import pack_latents, pack_targets, packed_loss, uniform_batch, unpack_tokens

ARGS = {
    "dit": DiTArgs(hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0, in_channels=4, text_dim=16),
    "wan": DiTArgs(arch="wan", hidden_size=32, depth=2, num_heads=4, ffn_dim=48, in_channels=4, text_dim=16),
}
# Images, short and long clips, three aspect ratios (latent T, H, W; patch 1x2x2); equal-size
# neighbours run as one batched attention call (models/attention.py same_length_groups).
SHAPES = [(1, 8, 8), (1, 8, 8), (3, 4, 6), (2, 6, 4), (2, 6, 4), (5, 2, 2), (1, 4, 10)]


def build(arch):
    torch.manual_seed(0)
    m = model_class(ARGS[arch])(ARGS[arch])
    m.init_weights(zero_init=False)
    return m


def samples(a, seed=1):
    g = torch.Generator().manual_seed(seed)
    K, L = len(SHAPES), 6
    xs = [torch.randn(a.in_channels, *s, generator=g) for s in SHAPES]
    ys = [torch.randn(a.in_channels, *s, generator=g) for s in SHAPES]
    t = torch.rand(K, generator=g) * 1000
    text = torch.randn(K, L, a.text_dim, generator=g)
    mask = torch.arange(L)[None] < torch.tensor([6, 3, 1, 5, 2, 4, 6])[:, None]
    drop = torch.tensor([False, False, True, False, False, True, False])
    return xs, ys, t, text, mask, drop


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["dit", "wan"])
def test_packed_equals_unpacked_outputs_loss_and_grads(arch):
    a = ARGS[arch]
    xs, ys, t, text, mask, drop = samples(a)
    ref = build(arch)
    outs, losses = [], []
    for i, x in enumerate(xs):
        o = ref(x[None], t[i:i + 1], text[i:i + 1], mask[i:i + 1], drop[i:i + 1])
        outs.append(o[0].detach())
        losses.append(F.mse_loss(o[0], ys[i]))
    ref_loss = torch.stack(losses).mean()  # each sample its own batch, equal weights
    ref_loss.backward()

    m = build(arch)
    x, grids = pack_latents(xs, a.patch_size)
    out = m(x, t, text, mask, drop, grids)
    assert out.shape == (1, x.shape[1], a.patch_volume * a.in_channels)
    for got, want in zip(unpack_tokens(out.detach(), grids, a.patch_size, a.in_channels), outs):
        assert got.shape == want.shape and rel(got, want) < 1e-5
    loss = packed_loss(out, pack_targets(ys, a.patch_size))
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    loss.backward()
    ref_grads = dict(ref.named_parameters())
    bad = {n: rel(p.grad, ref_grads[n].grad) for n, p in m.named_parameters()
           if not rel(p.grad, ref_grads[n].grad) < 1e-5}
    assert not bad, bad


@pytest.mark.parametrize("arch", ["dit", "wan"])
def test_a_pack_of_one_size_runs_as_the_batch_it_equals(arch):
    """uniform_batch (the trainer's shortcut for packs of one latent size): the batched path's
    loss and gradients equal the packed path's; mixed packs are not batches."""
    from sora_dist.diffusion.base import Objective
    a = ARGS[arch]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(a.in_channels, 2, 6, 4, generator=g) for _ in range(3)]
    ys = [torch.randn(a.in_channels, 2, 6, 4, generator=g) for _ in range(3)]
    t, text = torch.rand(3, generator=g) * 1000, torch.randn(3, 5, a.text_dim, generator=g)
    mask, drop = torch.arange(5)[None] < torch.tensor([5, 2, 4])[:, None], torch.tensor([False, True, False])
    packed = build(arch)
    x, grids = pack_latents(xs, a.patch_size)
    ref = packed_loss(packed(x, t, text, mask, drop, grids), pack_targets(ys, a.patch_size))
    ref.backward()
    batched = build(arch)
    xb, yb = uniform_batch(xs, ys)
    assert xb.shape == (3, a.in_channels, 2, 6, 4) and torch.equal(yb[1], ys[1])
    loss = Objective.loss(batched(xb, t, text, mask, drop), yb)
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    grads = dict(packed.named_parameters())
    bad = {n: rel(p.grad, grads[n].grad) for n, p in batched.named_parameters()
           if not rel(p.grad, grads[n].grad) < 1e-5}
    assert not bad, bad
    assert uniform_batch(xs + [torch.randn(a.in_channels, 1, 6, 4)], ys + [ys[0][:, :1]]) is None


@pytest.mark.parametrize("arch", ["dit", "wan"])
def test_no_sample_sees_another(arch):
    """Perturb one sample's latent, timestep and caption: every other sample's output is
    bit-for-bit unchanged, its own changes."""
    a = ARGS[arch]
    xs, _, t, text, mask, drop = samples(a)
    m = build(arch)
    with torch.no_grad():
        base = unpack_tokens(m(*_pack(a, xs, t, text, mask, drop)), pack_latents(xs, a.patch_size)[1],
                             a.patch_size, a.in_channels)
        j = 2
        xs2 = [x.clone() for x in xs]
        xs2[j] += 1.0
        t2, text2 = t.clone(), text.clone()
        t2[j] += 100
        text2[j] += 1.0
        got = unpack_tokens(m(*_pack(a, xs2, t2, text2, mask, drop)), pack_latents(xs, a.patch_size)[1],
                            a.patch_size, a.in_channels)
    for i in range(len(xs)):
        if i == j:
            assert not torch.equal(got[i], base[i])
        else:
            assert torch.equal(got[i], base[i]), i


def _pack(a, xs, t, text, mask, drop):
    x, grids = pack_latents(xs, a.patch_size)
    return x, t, text, mask, drop, grids


def test_pack_layout_round_trip_and_weights():
    a = ARGS["dit"]
    xs, ys, *_ = samples(a)
    x, grids = pack_latents(xs, a.patch_size)
    assert grids.tolist() == [[T, H // 2, W // 2] for T, H, W in SHAPES]
    # The packed targets unpack to the samples (output layout), weights sum to 1 over elements.
    tgt = pack_targets(ys, a.patch_size)
    back = unpack_tokens(tgt[..., :-1], grids, a.patch_size, a.in_channels)
    assert all(torch.equal(b, y) for b, y in zip(back, ys))
    assert abs(float((tgt[..., -1:] * a.patch_volume * a.in_channels).sum()) - 1.0) < 1e-6
    with pytest.raises(ValueError, match="must divide by the patch"):
        pack_latents([torch.zeros(4, 1, 3, 4)], a.patch_size)


def test_cp_balanced_order_evens_attention_work():
    """A pack in the loader's largest-first order loads the first ring CP ranks with most of the
    attention work (quadratic per sample); the balanced order evens it out."""
    import random

    from sora_dist.models.packing import cp_attention_work, cp_balanced_order

    rng = random.Random(1)
    sizes = [1560, 3120, 6240, 12480, 18720, 1040, 780, 256]  # Wan-480p images and clips
    for K, cp in [(10, 2), (32, 4), (64, 8), (100, 4)]:
        tokens = sorted((rng.choice(sizes) for _ in range(K)), reverse=True)
        before = cp_attention_work(tokens, cp)
        order = cp_balanced_order(tokens, cp)
        assert sorted(order) == list(range(K)) and order == cp_balanced_order(tokens, cp)
        after = cp_attention_work([tokens[i] for i in order], cp)
        assert sum(after) == sum(before) == sum(n * n for n in tokens)
        mean = sum(before) / cp
        assert max(before) / mean > 1.1 and max(after) / mean < 1.06, (K, cp, max(before) / mean, max(after) / mean)
    # chunk 0: 3 tokens of the 4-token sample (3*4); chunk 1: its last token (4) + the 2-token sample (2*2)
    assert cp_attention_work([4, 2], 2) == [12, 8]


def test_equal_size_neighbours_are_grouped():
    from sora_dist.models.attention import same_length_groups

    runs = [(0, 4, 0), (4, 8, 1), (8, 12, 2), (12, 15, 3), (15, 18, 4), (18, 20, -1)]
    assert same_length_groups(runs) == [(0, 4, 3, 0), (12, 3, 2, 3), (18, 2, 1, -1)]


def test_deal_samples_and_coarse_ceil():
    from sora_dist.models.packing import coarse_ceil, deal_samples

    assert deal_samples([16, 18, 12, 5, 5, 7], 2) == [[1, 3, 5], [0, 2, 4]]  # loads 30, 33
    assert deal_samples([9, 1], 3) == [[0], [1], []]  # fewer samples than microbatches
    for n in range(1, 5000):
        c = coarse_ceil(n)
        assert n <= c <= n * 1.125 and coarse_ceil(c) == c
    assert len({coarse_ceil(n) for n in range(1025, 2049)}) == 8  # 8 lengths per octave


def test_microbatch_tokens_bound_holds_for_any_pack():
    """split_pack's microbatch length (coarse_ceil of deal_samples' largest group) never exceeds
    microbatch_tokens_bound, over random packs; the bound is reached (one longest sample)."""
    import random

    from sora_dist.models.packing import coarse_ceil, deal_samples, microbatch_tokens_bound

    rng = random.Random(0)
    for _ in range(2000):
        budget, parts = rng.randint(50, 5000), rng.randint(2, 8)
        longest = rng.randint(1, budget)
        tokens, left = [], budget
        while left > 0 and rng.random() < 0.95:
            n = rng.randint(1, min(longest, left))
            tokens.append(n)
            left -= n
        if not tokens:
            continue
        L = coarse_ceil(max(sum(tokens[i] for i in g) for g in deal_samples(tokens, parts)))
        assert L <= microbatch_tokens_bound(budget, longest, parts), (tokens, parts, longest)
    assert microbatch_tokens_bound(1000, 1000, 4) == coarse_ceil(1000)  # one sample fills the pack
    assert microbatch_tokens_bound(1024, 64, 4) == coarse_ceil(256 + 48)


@pytest.mark.parametrize("arch, parts", [("dit", 2), ("dit", 3), ("wan", 2), ("dit", 9)])
def test_split_pack_microbatches_sum_to_the_pack(arch, parts):
    """split_pack's microbatches (one shape, padded with tokens of no sample and with (0, 0, 0)
    samples; 9 parts for 7 samples leaves two all padding), run one by one: their packed losses
    sum to the pack's, and so do the gradients; every sample sits in exactly one microbatch."""
    from sora_dist.models.packing import split_pack, token_counts

    a = ARGS[arch]
    xs, ys, t, text, mask, drop = samples(a)
    x, grids = pack_latents(xs, a.patch_size)
    target = pack_targets(ys, a.patch_size)
    ref = build(arch)
    ref_loss = packed_loss(ref(x, t, text, mask, drop, grids), target)
    ref_loss.backward()

    xm, tm, textm, maskm, dropm, gridsm, targetm = split_pack(parts, x, t, text, mask, drop, grids, target)
    Kp = tm.shape[0] // parts
    assert xm.shape[0] == targetm.shape[0] == parts and Kp & (Kp - 1) == 0
    assert sorted(g for g in gridsm.tolist() if g != [0, 0, 0]) == sorted(grids.tolist())
    per_mb = [sum(token_counts(gridsm[m * Kp:(m + 1) * Kp])) for m in range(parts)]
    assert sum(per_mb) == x.shape[1] and max(per_mb) <= xm.shape[1] < x.shape[1]
    assert (per_mb.count(0) == 2) == (parts == 9)
    m_ = build(arch)
    loss = 0
    for m in range(parts):
        s = slice(m * Kp, (m + 1) * Kp)
        out = m_(xm[m:m + 1], tm[s], textm[s], maskm[s], dropm[s], gridsm[s])
        loss = loss + packed_loss(out, targetm[m:m + 1])
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    loss.backward()
    ref_grads = dict(ref.named_parameters())
    bad = {n: rel(p.grad, ref_grads[n].grad) for n, p in m_.named_parameters()
           if not rel(p.grad, ref_grads[n].grad) < 1e-5}
    assert not bad, bad


# ---- a pack's runs, worked out on the host (no device read per attention call) -------------------

def test_pack_runs_equal_the_ids_runs_with_padding_and_cp_shards():
    """The runs packed_conditioning works out from the grids equal doc_runs of the ids it builds,
    with padding samples (grid 0, 0, 0) and padding tokens (a microbatch's length); padded like
    SequenceSharding (to a multiple of cp, or cp x tp) and cut into CP chunks, each chunk's
    window_runs equal doc_runs of that chunk's ids (chunk boundaries cut samples and padding)."""
    from sora_dist.models.attention import doc_runs, pack_runs, window_runs
    from sora_dist.models.dit import packed_conditioning

    assert pack_runs([16, 16, 0, 12], 50) == ((0, 16, 0), (16, 32, 1), (32, 44, 3), (44, 50, -1))
    grids = torch.tensor([[1, 4, 4], [1, 4, 4], [0, 0, 0], [2, 3, 2], [1, 4, 4], [2, 3, 2], [1, 1, 3], [0, 0, 0]])
    K, S = len(grids), 75
    for length in (None, S, 80, 91):
        cond = packed_conditioning(torch.zeros(K, 8), torch.zeros(K, 3, 8), torch.ones(K, 3, dtype=torch.bool),
                                   grids, head_dim=8, length=length)
        assert cond.doc_runs == cond.cp_doc_runs == doc_runs(cond.doc_S)
        assert cond.with_(seq_len=1).doc_runs == cond.doc_runs  # a field with_() keeps
        L = cond.doc_S.shape[0]
        for cp, multiple in [(1, 1), (1, 2), (2, 2), (2, 4), (3, 3), (4, 4), (4, 8), (8, 8)]:
            total = -(-L // multiple) * multiple
            padded = F.pad(cond.doc_S, (0, total - L), value=-1)
            assert window_runs(cond.doc_runs, 0, total) == doc_runs(padded)
            chunk = total // cp
            for r in range(cp):
                got = window_runs(cond.doc_runs, r * chunk, (r + 1) * chunk)
                assert got == doc_runs(padded[r * chunk:(r + 1) * chunk]), (length, cp, multiple, r)


def _blocks_and_head(m, inputs, cond_fn=lambda c: c):
    tokens, cond = m.embed(*inputs)
    cond = cond_fn(cond)
    for blk in m.blocks.values():
        tokens = blk(tokens, cond)
    return m.head(tokens, cond)


@pytest.mark.parametrize("arch, mode", [("dit", "eager"), ("wan", "eager"), ("dit", "compiled_op_ac")])
def test_packed_attention_reads_no_sample_ids_back(arch, mode, monkeypatch):
    """Packed attention takes the runs its Conditioning carries: the tensor doc_runs (a device
    read, a host sync per call on GPU) is never called in a packed forward and backward (a
    microbatch with padding tokens; also compiled blocks under op-level recompute, which replays
    attention), and output and gradients are those of reading the runs from the ids."""
    import copy

    import sora_dist.models.attention as attention
    from sora_dist.models.packing import split_pack

    a = ARGS[arch]
    xs, ys, t, text, mask, drop = samples(a)
    x, grids = pack_latents(xs, a.patch_size)
    target = pack_targets(ys, a.patch_size)
    xm, tm, textm, maskm, dropm, gridsm, targetm = split_pack(2, x, t, text, mask, drop, grids, target)
    Kp = tm.shape[0] // 2
    inputs = (xm[:1], tm[:Kp], textm[:Kp], maskm[:Kp], dropm[:Kp], gridsm[:Kp])
    ref = build(arch)
    m = copy.deepcopy(ref)
    if mode == "compiled_op_ac":
        from sora_dist.parallel.activation_checkpoint import apply_activation_checkpointing
        from sora_dist.parallel.rng import build_rng_tracker

        apply_activation_checkpointing(m, "op", build_rng_tracker(0, 0, 0, "cpu"))
        for blk in m.blocks.values():
            blk.compile()

    # The reference reads the runs back from the ids (a Conditioning without them).
    want = _blocks_and_head(ref, inputs, lambda c: c.with_(doc_runs=None, cp_doc_runs=None))
    packed_loss(want, targetm[:1]).backward()

    def no_device_read(doc_S):
        raise AssertionError("doc_runs(doc_S) called in a packed forward/backward")

    monkeypatch.setattr(attention, "doc_runs", no_device_read)
    got = _blocks_and_head(m, inputs)
    packed_loss(got, targetm[:1]).backward()
    if mode == "eager":
        assert torch.equal(got, want)
    assert rel(got.detach(), want.detach()) < 1e-6
    ref_grads = dict(ref.named_parameters())
    bad = {n: rel(p.grad, ref_grads[n.replace("_checkpoint_wrapped_module.", "")].grad)
           for n, p in m.named_parameters()}
    assert all(e < 1e-5 for e in bad.values()), bad


def test_varlen_bounds_tile_the_runs():
    from sora_dist.models.attention import pack_runs, varlen_bounds

    assert varlen_bounds(pack_runs([5, 3, 0, 4], 14), 14) == ([0, 5, 8, 12, 14], 5)  # last run: padding
    with pytest.raises(ValueError, match="do not tile"):
        varlen_bounds(((0, 4, 0), (5, 8, 1)), 8)
    with pytest.raises(ValueError, match="cover 12 tokens of a sequence of 14"):
        varlen_bounds(pack_runs([5, 3, 0, 4], 12), 14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn (flash) runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_pack_attention_equals_per_sample_sdpa_on_cuda(dtype):
    """On CUDA a pack's self-attention is one varlen_attn call (CoreAttention picks it for
    fp16/bf16); it equals one SDPA call per sample (document_attention) in output and in the
    q/k/v gradients, within half-precision rounding (both compute in fp32 inside, round once)."""
    from sora_dist.models.attention import CoreAttention, document_attention, pack_runs, sdpa_attention

    torch.manual_seed(0)
    runs = pack_runs([300, 128, 128, 77, 1], 640)  # two equal neighbours (one batched group), padding
    q, k, v = (torch.randn(1, 8, 640, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    got = CoreAttention("sdpa", "auto")(q, k, v, runs=runs)
    g = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    want = document_attention(sdpa_attention, q, k, v, None, runs=runs)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


@pytest.mark.parametrize("arch", ["dit", "wan"])
def test_compiled_blocks_do_not_recompile_per_pack_layout(arch):
    """Compiled blocks on packs of changing layouts (sample counts and sizes, total lengths):
    torch.compile compiles each frame at most three times (see below), never per layout, and
    every pack's output and gradients equal eager blocks'.
    Before, the layout was a constant of the graph: one ~30 s compile per new pack, and after 8
    eager for good."""
    import copy

    from torch._dynamo.utils import counters

    a = ARGS[arch]
    ref = build(arch)
    m = copy.deepcopy(ref)
    for blk in m.blocks.values():
        blk.compile()
    torch._dynamo.reset()
    counters.clear()
    # compiles: the first pack, a one-sample pack (torch specialises sizes of 1), the first pack
    # of another length and sample count (sizes turn dynamic); then none
    layouts = [SHAPES, [(1, 8, 8)], [(1, 8, 8)] * 4 + [(3, 4, 6)], SHAPES[::-1], [(5, 2, 2), (2, 6, 4)],
               [(1, 4, 10), (3, 4, 6), (1, 8, 8), (2, 6, 4), (2, 6, 4)], [(3, 4, 6)], [(2, 6, 4)] * 6]
    graphs = []
    for n, shapes in enumerate(layouts):
        g = torch.Generator().manual_seed(n)
        xs = [torch.randn(a.in_channels, *s, generator=g) for s in shapes]
        x, grids = pack_latents(xs, a.patch_size)
        K = len(shapes)
        inputs = (x, torch.rand(K, generator=g) * 1000, torch.randn(K, 6, a.text_dim, generator=g),
                  torch.arange(6)[None] < torch.randint(1, 7, (K, 1), generator=g), torch.zeros(K, dtype=torch.bool),
                  grids)
        outs = []
        for model in (ref, m):
            model.zero_grad(set_to_none=True)
            out = _blocks_and_head(model, inputs)
            out.square().mean().backward()
            outs.append((out.detach(), {k: p.grad for k, p in model.named_parameters()}))
        assert rel(outs[1][0], outs[0][0]) < 1e-5, n
        bad = {k: ((outs[1][1][k] - g0).norm() / g0.norm().clamp_min(1e-30)).item()  # null_text: 0 (no drops)
               for k, g0 in outs[0][1].items() if g0 is not None}
        assert all(e < 1e-4 for e in bad.values()), (n, bad)
        graphs.append(counters["stats"]["unique_graphs"])
    assert 0 < graphs[0] < graphs[2] and graphs[-1] == graphs[2], graphs  # nothing compiled after the 3rd pack

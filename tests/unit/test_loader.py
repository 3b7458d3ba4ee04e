"""ShardLoader: DP split, bucket batching, padding, determinism and exact resume."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from sora_dist.config.data import DataConfig
from sora_dist.data.loader import ShardLoader
from sora_dist.data.shards import ShardWriter, write_manifest

BUCKET_SHAPES = [(2, 4, 4), (1, 4, 6), (3, 2, 2)]


def _write_shards(folder, n=23, per_shard=3, C=4, D=8):
    w = ShardWriter(str(folder), rank=0, samples_per_shard=per_shard)
    for i in range(n):
        T, H, W = BUCKET_SHAPES[i % 3 if i % 5 else 0]
        L = 1 + i % 5
        latent = np.full((C, T, H, W), i, np.float32)
        text = np.full((L, D), i + 0.5, np.float32)
        w.write(latent, text, np.ones(L, bool), {"source": f"/src/{i}.mp4", "caption": f"cap {i}"})
    w.close()
    write_manifest(str(folder), {"latent_channels": C, "text_dim": D})
    return n


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return str(d), _write_shards(d)


def _cfg(folder, **kw):
    # Bucket batching, forced: these shards mix sizes, which data.packing=null would pack.
    return DataConfig(source="shards", shards=folder, **{"packing": False, **kw})


def _ids(batch):
    return [int(v) for v in batch["latent"][:, 0, 0, 0, 0]]


def test_dp_split_disjoint_and_complete(shards):
    folder, _ = shards
    for dp in (1, 2, 3):
        loaders = [ShardLoader(_cfg(folder), r, dp) for r in range(dp)]
        for epoch in range(3):
            parts = [{n for n, _ in ld.rank_shards(epoch)} for ld in loaders]
            assert sum(len(p) for p in parts) == len(set().union(*parts)) == 8  # 23 samples / 3 = 8 shards
    a, b = ShardLoader(_cfg(folder), 0, 2), ShardLoader(_cfg(folder), 0, 2)
    assert a.rank_shards(0) == b.rank_shards(0) and a.rank_shards(0) != a.rank_shards(1)


def test_epoch_sees_every_sample_once_and_batches_one_bucket(shards):
    folder, n = shards
    ld = ShardLoader(_cfg(folder, batch_size=1, shuffle_buffer=7), 0, 1)
    seen = [_ids(next(ld))[0] for _ in range(n)]
    assert sorted(seen) == list(range(n)) and seen != list(range(n))  # complete, shuffled
    ld = ShardLoader(_cfg(folder, batch_size=3), 0, 1)
    for _ in range(10):
        b = next(ld)
        T, H, W = map(int, b["bucket"].split("x"))
        assert b["latent"].shape == (3, 4, T, H, W) and b["latent"].dtype == torch.float32
        # text padded to the longest caption; zeros and False past each sample's length
        lens = [1 + i % 5 for i in _ids(b)]
        assert b["text"].shape == (3, max(lens), 8) and b["text_mask"].dtype == torch.bool
        assert b["text_mask"].sum(1).tolist() == lens
        for j, i in enumerate(_ids(b)):
            assert torch.all(b["text"][j, : lens[j]] == i + 0.5) and torch.all(b["text"][j, lens[j]:] == 0)
            assert b["captions"][j] == f"cap {i}"


def test_two_ranks_cover_epoch_without_overlap(shards):
    folder, n = shards
    cfg = _cfg(folder, batch_size=1)
    got = []
    for r in range(2):
        ld = ShardLoader(cfg, r, 2)
        count = sum(c for _, c in ld.rank_shards(0))
        got.append([_ids(next(ld))[0] for _ in range(count)])
    assert not set(got[0]) & set(got[1]) and sorted(got[0] + got[1]) == list(range(n))


def test_order_is_deterministic_in_seed_and_prefetch_free(shards):
    folder, _ = shards

    def seq(seed, prefetch=True):
        ld = ShardLoader(_cfg(folder, seed=seed, shuffle_buffer=4, prefetch_next_block=prefetch), 0, 1)
        return [_ids(next(ld)) for _ in range(20)]

    assert seq(1) == seq(1) == seq(1, prefetch=False) and seq(1) != seq(2)


@pytest.mark.parametrize("stop", [1, 4, 9, 17])
def test_resume_continues_at_next_unseen_sample(shards, stop):
    folder, n = shards
    cfg = _cfg(folder, batch_size=3, shuffle_buffer=5)
    ref = ShardLoader(cfg, 1, 2)
    full = [_ids(next(ref)) for _ in range(stop + 8)]  # crosses epoch boundaries
    ld = ShardLoader(cfg, 1, 2)
    for _ in range(stop):
        next(ld)
    sd = json.loads(json.dumps(ld.state_dict()))  # must survive a plain JSON round trip
    assert any(sd["pending"].values())  # the restore of waiting samples is exercised
    resumed = ShardLoader(cfg, 1, 2)
    resumed.load_state_dict(sd)
    assert [_ids(next(resumed)) for _ in range(8)] == full[stop:]
    assert resumed.batches_done == stop + 8


def test_no_sample_dropped_across_epochs(shards):
    folder, n = shards
    ld = ShardLoader(_cfg(folder, batch_size=4), 0, 1)
    counts = Counter(i for _ in range(3 * n // 4) for i in _ids(next(ld)))
    # ~3 epochs of samples: everything seen 2-3 times (leftovers wait in accumulators)
    assert set(counts) == set(range(n)) and min(counts.values()) >= 2


def test_errors_are_clear(shards, tmp_path):
    folder, _ = shards
    with pytest.raises(ValueError, match="dp_size=9"):
        ShardLoader(_cfg(folder), 0, 9)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardLoader(_cfg(str(tmp_path)), 0, 1)
    sd = ShardLoader(_cfg(folder), 0, 2).state_dict()
    with pytest.raises(ValueError, match="dp_size=2"):
        ShardLoader(_cfg(folder), 0, 1).load_state_dict(sd)


def test_per_bucket_batch_sizes(shards):
    folder, _ = shards
    ld = ShardLoader(_cfg(folder, batch_size=3, bucket_batch_size={"1x4x6": 1, "3x2x2": 2}), 0, 1)
    want = {"1x4x6": 1, "3x2x2": 2, "2x4x4": 3}
    for _ in range(12):
        b = next(ld)
        assert b["latent"].shape[0] == want[b["bucket"]]
    with pytest.raises(ValueError, match="bucket_batch_size"):
        ShardLoader(_cfg(folder, bucket_batch_size={"1x4x6": 0}), 0, 1)


def test_resume_refuses_changed_shards(shards, tmp_path):
    folder, _ = shards
    sd = ShardLoader(_cfg(folder), 0, 1).state_dict()
    _write_shards(tmp_path, n=10)
    with pytest.raises(ValueError, match="shard set"):
        ShardLoader(_cfg(str(tmp_path)), 0, 1).load_state_dict(sd)


def test_model_config_mismatch_is_named(shards):
    from sora_dist.config.model import ModelConfig

    folder, _ = shards
    ShardLoader(_cfg(folder), 0, 1, model_cfg=ModelConfig(in_channels=4, text_dim=8))
    with pytest.raises(ValueError, match="model.in_channels=4"):
        ShardLoader(_cfg(folder), 0, 1, model_cfg=ModelConfig(in_channels=16, text_dim=8))
    with pytest.raises(ValueError, match="model.text_dim=8"):
        ShardLoader(_cfg(folder), 0, 1, model_cfg=ModelConfig(in_channels=4, text_dim=32))


def _recorded_shards(folder, **extra):
    """Shards whose manifest records the models that made them, as sora-encode writes it."""
    _write_shards(folder, n=3)
    made_by = {"text_encoder": {"model_type": "umt5", "class": "UMT5EncoderModel", "name": "text_encoder",
                                "path": "/m/Wan/text_encoder", "text_dim": 8, "max_length": 6, "pad_to_max": True},
               "vae": {"class": "AutoencoderKLWan", "name": "vae", "latent_channels": 4}}
    write_manifest(str(folder), {"latent_channels": 4, "text_dim": 8, **made_by, "text_max_length": 6,
                                 "text_pad_to_max": True, **extra})
    return str(folder)


def test_mismatch_errors_name_the_folder_the_recorded_models_and_the_fix(tmp_path):
    from sora_dist.config.model import ModelConfig

    folder = _recorded_shards(tmp_path)
    with pytest.raises(ValueError) as e:
        ShardLoader(_cfg(folder), 0, 1, model_cfg=ModelConfig(in_channels=4, text_dim=32))
    msg = str(e.value)
    assert f"shards in {folder} were made by the umt5 text encoder 'text_encoder' (text_dim 8)" in msg
    assert "model.text_dim=32; set model.text_dim=8" in msg and "re-encode" in msg
    with pytest.raises(ValueError) as e:
        ShardLoader(_cfg(folder), 0, 1, model_cfg=ModelConfig(in_channels=16, text_dim=8))
    msg = str(e.value)
    assert f"shards in {folder} were made by the AutoencoderKLWan 'vae' (4 latent channels)" in msg
    assert "model.in_channels=16; set model.in_channels=4" in msg and "re-encode" in msg


def test_old_manifests_without_recorded_models_still_load_and_explain(shards, tmp_path):
    from sora_dist.config.model import ModelConfig

    folder, _ = shards  # written with only latent_channels/text_dim, as before models were recorded
    ld = ShardLoader(_cfg(folder, batch_size=1), 0, 1, model_cfg=ModelConfig(in_channels=4, text_dim=8))
    assert ld.pad_text_to == 0 and next(ld)["text"].shape[1] <= 5
    with pytest.raises(ValueError, match=r"made by the text encoder \(text_dim 8; type not recorded\)"):
        ShardLoader(_cfg(folder), 0, 1, model_cfg=ModelConfig(in_channels=4, text_dim=32))
    # a manifest that recorded only the encoder's path (the format before made_by)
    _write_shards(tmp_path, n=3)
    write_manifest(str(tmp_path), {"latent_channels": 4, "text_dim": 8, "text_encoder": "/m/t5-v1_1-xxl",
                                   "text_max_length": 120, "vae": {"class": "AutoencoderKLWan"}})
    with pytest.raises(ValueError, match=r"text encoder 't5-v1_1-xxl' \(text_dim 8; type not recorded\)"):
        ShardLoader(_cfg(str(tmp_path)), 0, 1, model_cfg=ModelConfig(in_channels=4, text_dim=32))
    assert ShardLoader(_cfg(str(tmp_path)), 0, 1).pad_text_to == 0


def test_wan_layout_shards_pad_every_batch_to_max_length(tmp_path):
    folder = _recorded_shards(tmp_path)  # captions of 1..3 tokens stored unpadded, max_length 6
    ld = ShardLoader(_cfg(folder, batch_size=1, shuffle_buffer=0), 0, 1)
    for _ in range(3):
        b = next(ld)
        n = int(b["text_mask"].sum())
        assert b["text"].shape == (1, 6, 8) and b["text_mask"][0, :n].all() and not b["text_mask"][0, n:].any()
        assert torch.all(b["text"][0, n:] == 0) and torch.all(b["text"][0, :n] != 0)


def test_damaged_sample_names_the_shard(tmp_path):
    import io
    import tarfile

    _write_shards(tmp_path, n=3, per_shard=3)
    path = tmp_path / "shard-r000-000000.tar"
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    first_latent = next(m.name for m, _ in members if m.name.endswith(".latent.npy"))
    with tarfile.open(path, "w") as tf:  # same tar, one latent replaced by garbage bytes
        for m, data in members:
            if m.name == first_latent:
                data = b"\x93NUMPY garbage"
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    ld = ShardLoader(_cfg(str(tmp_path), batch_size=1, shuffle_buffer=0), 0, 1)
    with pytest.raises(ValueError, match="shard-r000-000000.tar: sample .* damaged"):
        for _ in range(3):
            next(ld)


def _shard_ids(ld, names):
    from sora_dist.data.loader import _decode
    return {int(_decode(raw, sh)["latent"].flatten()[0]) for sh, raw in ld._read(sorted(names))}


def _epoch_ids(ld, epoch):
    """Sample ids the loader delivers (before batching) until it leaves `epoch`."""
    out = []
    while True:
        s = ld._next_sample()
        if ld.epoch != epoch:
            return out
        out.append(int(s["latent"].flatten()[0]))


@pytest.mark.parametrize("steps", [(3, 3), (12, 2)])  # equal progress / one old rank a whole epoch ahead
def test_dp_resize_carries_the_epoch_over_at_shard_granularity(shards, steps):
    folder, n = shards
    cfg = _cfg(folder, batch_size=2, shuffle_buffer=4)
    old = [ShardLoader(cfg, r, 2) for r in range(2)]
    for ld, k in zip(old, steps):
        for _ in range(k):
            next(ld)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in old]
    epoch = min(ld.epoch for ld in old)
    done = set()  # shards of `epoch` in blocks an old rank read completely
    for ld in old:
        blocks = ld.blocks(epoch)
        done.update(name for b in (blocks if ld.epoch > epoch else blocks[:ld.block]) for name in b)
    done -= {s["shard"] for ld in old for acc in ld.pending.values() for s in acc}  # re-read
    assert done, "the test must resume with part of the epoch consumed"

    new = [ShardLoader(cfg, r, 3) for r in range(3)]
    for ld in new:
        assert "dp_size=2 to 3" in ld.load_elastic_state(states)
    parts = [set(_epoch_ids(ld, epoch)) for ld in new]
    got = set().union(*parts)
    assert sum(map(len, parts)) == len(got)                    # new ranks are disjoint
    assert not got & _shard_ids(new[0], done)                  # nothing finished is read again
    assert got | _shard_ids(new[0], done) == set(range(n))     # and nothing is skipped
    fresh = [ShardLoader(cfg, r, 3) for r in range(3)]
    assert [ld.rank_shards(epoch + 1) for ld in new] == [ld.rank_shards(epoch + 1) for ld in fresh]


def _dp2_after_3_batches(folder):
    """A config and two DP ranks that each read 3 batches (part of epoch 0)."""
    cfg = _cfg(folder, batch_size=2, shuffle_buffer=4)
    old = [ShardLoader(cfg, r, 2) for r in range(2)]
    for ld in old:
        for _ in range(3):
            next(ld)
    return cfg, old


def test_resume_inside_a_resized_epoch_is_exact(shards):
    cfg, old = _dp2_after_3_batches(shards[0])
    states = [ld.state_dict() for ld in old]
    a = ShardLoader(cfg, 0, 1)
    a.load_elastic_state(states)
    next(a), next(a)
    sd = json.loads(json.dumps(a.state_dict()))
    assert sd["epoch_override"] is not None
    b = ShardLoader(cfg, 0, 1)
    b.load_state_dict(sd)
    assert [_ids(next(b)) for _ in range(15)] == [_ids(next(a)) for _ in range(15)]  # into the next epoch
    assert b.state_dict()["epoch_override"] is None  # dropped once its epoch is over
    with pytest.raises(ValueError, match="DP ranks \\[0\\]"):
        ShardLoader(cfg, 0, 3).load_elastic_state(states[:1])


def test_synthetic_dp_resize_continues_the_global_stream_exactly():
    from sora_dist.data.synthetic import SyntheticLatents
    cfg = DataConfig(source="synthetic", batch_size=2, synthetic_samples=10_000, packing=False)
    ref = SyntheticLatents(cfg, 4, 8, 0, 1)  # one rank sees the global order
    glob = [i for _ in range(12) for i in next(ref)["ids"]]
    old = [SyntheticLatents(cfg, 4, 8, r, 3) for r in range(3)]
    seen = [i for _ in range(2) for ld in old for i in next(ld)["ids"]]
    states = [ld.state_dict() for ld in old]
    new = [SyntheticLatents(cfg, 4, 8, r, 2) for r in range(2)]
    for ld in new:
        ld.load_elastic_state(states)
    seen += [i for _ in range(3) for ld in new for i in next(ld)["ids"]]
    assert len(seen) == len(glob) and sorted(seen) == sorted(glob)  # no gap, no repeat


def test_second_resize_takes_the_override_from_ranks_still_in_that_epoch(shards):
    """dp2 -> dp3 -> dp2: a dp3 rank that finished the resized epoch saves no override any more;
    the next resize takes it from the others, and only that rank's share counts as read."""
    cfg, old = _dp2_after_3_batches(shards[0])
    mid = [ShardLoader(cfg, r, 3) for r in range(3)]
    for ld in mid:
        ld.load_elastic_state([o.state_dict() for o in old])
    epoch, remaining = mid[0].epoch_override
    while mid[0].epoch == epoch:
        next(mid[0])
    states = [json.loads(json.dumps(ld.state_dict())) for ld in mid]
    assert states[0]["epoch_override"] is None and states[1]["epoch_override"] is not None
    last = ShardLoader(cfg, 0, 2)
    last.load_elastic_state(states)
    again = set(last.epoch_override[1])
    finished = {n for n, _ in mid[0].rank_shards(epoch)} - {s["shard"] for acc in mid[0].pending.values() for s in acc}
    assert last.epoch_override[0] == epoch and again <= set(remaining)
    assert again == set(remaining) - finished
    states[1]["epoch_override"][1] = states[1]["epoch_override"][1][:-1]
    with pytest.raises(ValueError, match="disagree"):
        ShardLoader(cfg, 0, 2).load_elastic_state(states)


# ---- packing (data.packing): token-budget packs from the shards -------------------------------
TOKENS = {(2, 4, 4): 8, (1, 4, 6): 6, (3, 2, 2): 3}  # under the default patch (1, 2, 2)


def _packed(folder, **kw):
    return _cfg(folder, **{"packing": True, "tokens_per_rank": 16, "pack_window": 4, "shuffle_buffer": 5, **kw})


def _pack_ids(pack):
    return [int(x[0, 0, 0, 0]) for x in pack["latent"]]


def test_packed_batches_fill_the_budget_in_the_batch_format(shards):
    folder, n = shards
    ld = ShardLoader(_packed(folder), 0, 1)
    names = {name for name, _ in ld.shards}
    seen = []
    for _ in range(6):
        b = next(ld)
        ids, K = _pack_ids(b), len(b["latent"])
        assert b["packed"] is True and len(b["keys"]) == K and b["text_mask"].shape[0] == K
        toks = [TOKENS[tuple(x.shape[1:])] for x in b["latent"]]
        assert b["sample_tokens"] == toks and b["tokens"] == sum(toks) <= 16
        assert toks == sorted(toks, reverse=True)  # first-fit decreasing
        lens = [1 + i % 5 for i in ids]
        assert b["text"].shape == (K, max(lens), 8) and b["text_mask"].sum(1).tolist() == lens
        for j, i in enumerate(ids):
            assert b["latent"][j].dtype == torch.float32 and b["latent"][j].shape[0] == 4
            assert torch.all(b["text"][j, :lens[j]] == i + 0.5) and torch.all(b["text"][j, lens[j]:] == 0)
            assert b["keys"][j].split("/")[0] in names and b["captions"][j] == f"cap {i}"
        seen += ids
    assert len(seen) == len(set(seen))  # 6 packs of one 23-sample epoch: no sample twice


@pytest.mark.parametrize("stop", [1, 3, 7])
def test_packed_resume_yields_the_same_packs(shards, stop):
    folder, _ = shards
    cfg = _packed(folder)
    ref = ShardLoader(cfg, 1, 2)
    full = [next(ref)["keys"] for _ in range(stop + 8)]  # crosses epoch boundaries
    ld = ShardLoader(cfg, 1, 2)
    for _ in range(stop):
        next(ld)
    sd = json.loads(json.dumps(ld.state_dict()))
    assert sd["pending"]["window"]  # the window is saved and re-read
    resumed = ShardLoader(cfg, 1, 2)
    resumed.load_state_dict(sd)
    assert [next(resumed)["keys"] for _ in range(8)] == full[stop:]


def test_balanced_packs_over_two_ranks_resume_exactly(shards):
    """Two DP ranks with data.pack_balance=flops (the default), exchanging through an all-gather
    of threads: no sample twice in the epoch, and a resume from both ranks' states continues
    the same packs."""
    from sora_dist.config.model import ModelConfig
    from sora_dist.testing import ThreadAllGather, run_threads
    folder, n = shards
    cfg, mcfg = _packed(folder, shuffle_buffer=0), ModelConfig(in_channels=4, text_dim=8)

    def loaders():
        ex = ThreadAllGather(2)
        return [ShardLoader(cfg, r, 2, model_cfg=mcfg, exchange=ex.rank(r)) for r in range(2)]

    def steps(lds, k):
        return run_threads([lambda ld=ld: [_pack_ids(next(ld)) for _ in range(k)] for ld in lds])

    lds = loaders()
    assert all(ld.balance is not None for ld in lds)
    full = steps(lds, 4)  # within the first epoch (about 10 of each rank's ~12 samples)
    ids = [i for rank in full for pack in rank for i in pack]
    assert len(ids) == len(set(ids)) and all(len(p) for rank in full for p in rank)
    lds = loaders()
    first = steps(lds, 2)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in lds]
    lds = loaders()
    for ld, sd in zip(lds, states):
        ld.load_state_dict(sd)
    assert [a + b for a, b in zip(first, steps(lds, 2))] == full


def test_packed_dp_resize_reads_the_window_samples_again(shards):
    folder, n = shards
    cfg = _packed(folder)
    old = [ShardLoader(cfg, r, 2) for r in range(2)]
    emitted = {i for ld in old for _ in range(2) for i in _pack_ids(next(ld))}
    assert all(ld.epoch == 0 for ld in old)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in old]
    waiting = {int(s["latent"].flatten()[0]) for ld in old for s in ld.packer.window}
    assert waiting and not waiting & emitted
    new = [ShardLoader(cfg, r, 3) for r in range(3)]
    for ld in new:
        assert "dp_size=2 to 3" in ld.load_elastic_state(states)
        assert ld.packer.window == []
    parts = [_epoch_ids(ld, 0) for ld in new]
    again = set().union(*parts)
    assert sum(map(len, parts)) == len(again)      # new ranks are disjoint
    assert waiting <= again                        # the old windows' samples are not lost
    assert emitted | again == set(range(n))        # nor anything else of the epoch
    b = next(new[0])
    assert b["packed"] and b["tokens"] <= 16


def test_unpackable_samples_are_named_at_load_time(shards):
    from sora_dist.config.model import ModelConfig

    folder, _ = shards
    ld = ShardLoader(_packed(folder, tokens_per_rank=7), 0, 1)  # (2, 4, 4) latents have 8 tokens
    with pytest.raises(ValueError, match=r"shard-r000-\d+\.tar: sample '[^']+': 8 tokens .*raise "
                                         r"data.tokens_per_rank to >= 8 or shard the sequence with parallel.cp"):
        for _ in range(10):
            next(ld)
    ld = ShardLoader(_packed(folder, tokens_per_rank=64), 0, 1,
                     model_cfg=ModelConfig(in_channels=4, text_dim=8, patch_size=[2, 2, 2]))
    with pytest.raises(ValueError, match=r"shard-r000-\d+\.tar: sample '[^']+': latent T x H x W = \dx\dx\d "
                                         r"does not divide by model.patch_size=\[2, 2, 2\] \(T="):
        for _ in range(10):
            next(ld)


def test_packed_wan_layout_pads_captions_to_max_length(tmp_path):
    folder = _recorded_shards(tmp_path)  # 3 samples, captions of 1..3 tokens, max_length 6
    ld = ShardLoader(_packed(folder, shuffle_buffer=0), 0, 1)
    for _ in range(3):
        b = next(ld)
        assert b["text"].shape == (len(b["latent"]), 6, 8)
        for j, i in enumerate(_pack_ids(b)):
            assert b["text_mask"][j].tolist() == [k < 1 + i % 5 for k in range(6)]

"""ShardWriter / DoneList / manifest without any model: atomic shards, locks, recovery."""
import json
import os

import numpy as np
import pytest

from sora_dist.data.shards import DoneList, ShardWriter, list_shards, read_shard_meta, write_manifest


def _write(w, i, T=2):
    w.write(np.zeros((4, T, 2, 2), np.float32), np.ones((3, 8), np.float32), np.ones(3, bool),
            {"source": f"/s/{i}.mp4", "caption": f"c{i}"})


def test_fixed_samples_per_shard_rank_names_and_no_temp_left(tmp_path):
    w = ShardWriter(str(tmp_path), rank=3, samples_per_shard=2)
    for i in range(5):
        _write(w, i, T=1 + i % 2)
    # two full shards are final; the fifth sample sits in a temp shard until close()
    assert [os.path.basename(p) for p in list_shards(str(tmp_path))] == [
        "shard-r003-000000.tar", "shard-r003-000001.tar"]
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".tar.tmp")]) == 1
    w.close()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert [len(read_shard_meta(p)) for p in list_shards(str(tmp_path))] == [2, 2, 1]
    m = write_manifest(str(tmp_path), {"latent_channels": 4, "text_dim": 8})
    assert m["num_samples"] == 5 and m["buckets"] == {"1x2x2": 3, "2x2x2": 2}
    assert (m["storage_dtype"], m["storage_dtypes"]) == ("fp32", {"fp32": 5})  # the writer's default
    assert json.load(open(tmp_path / "manifest.json")) == m
    # a rerun continues the index instead of overwriting
    w2 = ShardWriter(str(tmp_path), rank=3, samples_per_shard=2)
    _write(w2, 9)
    w2.close()
    assert os.path.basename(list_shards(str(tmp_path))[-1]) == "shard-r003-000003.tar"


def test_one_live_writer_per_rank(tmp_path):
    w = ShardWriter(str(tmp_path), rank=0, samples_per_shard=2)
    with pytest.raises(RuntimeError, match="another sora-encode process"):
        ShardWriter(str(tmp_path), rank=0, samples_per_shard=2)
    ShardWriter(str(tmp_path), rank=1, samples_per_shard=2).close()  # other ranks are free
    w.close()
    ShardWriter(str(tmp_path), rank=0, samples_per_shard=2).close()  # released on close


def test_donelist_recovers_shard_missing_from_its_list(tmp_path):
    w = ShardWriter(str(tmp_path), rank=0, samples_per_shard=2)
    for i in range(4):
        _write(w, i)
    w.reject("/s/bad.mp4", "corrupt", "noise")
    w.close()
    os.remove(tmp_path / "done-r000.jsonl")  # as if killed right after the renames
    assert len(DoneList(str(tmp_path), rank=1).shards) == 2  # another rank: recovered in memory
    assert not os.path.exists(tmp_path / "done-r000.jsonl")  # ... and never writes rank 0's list
    done = DoneList(str(tmp_path), rank=0)
    assert all(done.is_done(f"/s/{i}.mp4") for i in range(4)) and done.is_done("/s/bad.mp4")
    assert not done.is_done("/s/other.mp4")
    assert len(open(tmp_path / "done-r000.jsonl").readlines()) == 2  # the owner wrote it back
    assert len(DoneList(str(tmp_path), rank=0).shards) == 2  # and does not duplicate it


def test_failed_write_discards_the_open_shard(tmp_path):
    w = ShardWriter(str(tmp_path), rank=0, samples_per_shard=3)
    _write(w, 0)
    with pytest.raises(TypeError):
        w.write(np.zeros((4, 1, 2, 2), np.float32), np.ones((3, 8), np.float32), np.ones(3, bool),
                {"source": "/s/x.mp4", "caption": object()})  # not JSON-serialisable
    w.close()
    assert list_shards(str(tmp_path)) == [] and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert not DoneList(str(tmp_path)).is_done("/s/0.mp4")  # redone by the rerun, not lost


def _made_by(model_type="umt5", text_dim=8, channels=4):
    return {"text_encoder": {"model_type": model_type, "name": model_type, "text_dim": text_dim, "max_length": 512},
            "vae": {"class": "AutoencoderKLWan", "name": "vae", "latent_channels": channels}}


def test_made_by_recorded_and_other_models_refused_once_shards_exist(tmp_path):
    from sora_dist.data.shards import check_made_by

    check_made_by(str(tmp_path), _made_by("t5", 16), record=False)  # ranks > 0 only check
    assert not (tmp_path / "made_by.json").exists()
    check_made_by(str(tmp_path), _made_by("t5", 16))
    check_made_by(str(tmp_path), _made_by("umt5", 8))  # no shards yet: nothing to mix, re-recorded
    assert json.load(open(tmp_path / "made_by.json")) == _made_by("umt5", 8)
    w = ShardWriter(str(tmp_path), rank=0, samples_per_shard=1)
    _write(w, 0)
    w.close()
    check_made_by(str(tmp_path), dict(_made_by(), vae=dict(_made_by()["vae"], path="/moved")))  # paths may move
    with pytest.raises(ValueError, match=r"made by the umt5 text encoder 'umt5' \(text_dim 8\).*"
                                         r"t5 text encoder 't5' \(text_dim 16\).*new output folder"):
        check_made_by(str(tmp_path), _made_by("t5", 16))
    with pytest.raises(ValueError, match=r"vae.latent_channels 4 -> 16"):
        check_made_by(str(tmp_path), _made_by(channels=16))
    # a folder from before made_by.json: its manifest's widths still guard it
    os.remove(tmp_path / "made_by.json")
    write_manifest(str(tmp_path), {"latent_channels": 4, "text_dim": 8, "text_encoder": "/m/t5"})
    with pytest.raises(ValueError, match=r"text_encoder.text_dim 8 -> 16"):
        check_made_by(str(tmp_path), _made_by("t5", 16))
    check_made_by(str(tmp_path), _made_by("t5", 8))


def test_storage_dtype_recorded_per_shard_and_recovered_from_the_tar(tmp_path):
    w = ShardWriter(str(tmp_path), rank=0, samples_per_shard=2, storage_dtype="bf16")
    for i in range(3):
        _write(w, i)
    w.close()
    recs = [json.loads(line) for line in open(tmp_path / "done-r000.jsonl")]
    assert [r["storage_dtypes"] for r in recs] == [{"bf16": 2}, {"bf16": 1}]
    os.remove(tmp_path / "done-r000.jsonl")  # killed before the lines: the .json members know
    m = write_manifest(str(tmp_path), {})
    assert (m["storage_dtype"], m["storage_dtypes"]) == ("bf16", {"bf16": 3})
    assert {meta["storage_dtype"] for p in list_shards(str(tmp_path)) for meta in read_shard_meta(p)} == {"bf16"}

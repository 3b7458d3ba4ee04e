"""Shard storage dtypes (encode.storage_dtype) without any model: bf16/fp16/fp32 written by
ShardWriter come back from ShardLoader as float32 equal to the stored values; old fp32 shards
(before the field) still load."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from sora_dist.config.data import DataConfig
from sora_dist.data.loader import ShardLoader
from sora_dist.data.shards import ShardWriter, list_shards, write_manifest

C, T, H, W, D = 4, 2, 3, 5, 8


def _arrays(i, L=3):
    rng = np.random.default_rng(i)
    # Normal values (truncating to bf16 instead of rounding would differ in about half of them),
    # plus exact ties, which round-to-nearest-even breaks differently from round-half-up.
    latent = rng.standard_normal((C, T, H, W)).astype(np.float32) * 3
    bits = latent.reshape(-1).view(np.uint32)
    bits[:8] = (bits[:8] & 0xFFFF0000) | 0x8000  # exactly half way between two bf16 values
    text = rng.standard_normal((L, D)).astype(np.float32) * 100
    return latent, text, np.ones(L, bool)


def _write(folder, storage_dtype, n=3, **manifest):
    w = ShardWriter(str(folder), rank=0, samples_per_shard=2, storage_dtype=storage_dtype)
    for i in range(n):
        w.write(*_arrays(i, L=2 + i), {"source": f"/s/{i}.mp4", "caption": f"c{i}"})
    w.close()
    return write_manifest(str(folder), {"latent_channels": C, "text_dim": D, **manifest})


def _samples(folder, n=3):
    ld = ShardLoader(DataConfig(source="shards", shards=str(folder), batch_size=1, shuffle_buffer=0), 0, 1)
    out = {}
    for _ in range(n):
        b = next(ld)
        assert b["latent"].dtype == b["text"].dtype == torch.float32
        out[int(b["captions"][0][1:])] = b
    return out


def _as_stored(a, storage_dtype):
    t = torch.from_numpy(a)
    return {"bf16": t.to(torch.bfloat16), "fp16": t.to(torch.float16), "fp32": t}[storage_dtype].float()


@pytest.mark.parametrize("storage_dtype", ["bf16", "fp16", "fp32"])
def test_loader_yields_float32_equal_to_the_stored_values(tmp_path, storage_dtype):
    m = _write(tmp_path, storage_dtype)
    assert (m["storage_dtype"], m["storage_dtypes"]) == (storage_dtype, {storage_dtype: 3})
    for i, b in _samples(tmp_path).items():
        latent, text, _ = _arrays(i, L=2 + i)
        # bit for bit: torch.equal on floats, and NaN-free inputs
        assert torch.equal(b["latent"][0], _as_stored(latent, storage_dtype))
        assert torch.equal(b["text"][0], _as_stored(text, storage_dtype))
        if storage_dtype != "fp32":  # the rounding is real, so the check above can fail
            assert not torch.equal(b["latent"][0], torch.from_numpy(latent))


def test_bf16_ties_round_to_even_like_torch(tmp_path):
    _write(tmp_path, "bf16", n=1)
    latent = _arrays(0)[0]
    got = _samples(tmp_path, 1)[0]["latent"][0].reshape(-1)[:8]
    ties = torch.from_numpy(latent.reshape(-1)[:8].copy())
    up = (ties.view(torch.int32) + 0x8000).view(torch.float32)  # round half away from zero
    assert torch.equal(got, ties.to(torch.bfloat16).float()) and not torch.equal(got, up.to(torch.bfloat16).float())


def test_bf16_members_are_raw_words_half_the_fp32_bytes(tmp_path):
    sizes = {}
    for sd in ("bf16", "fp32"):
        _write(tmp_path / sd, sd, n=1)
        with tarfile.open(list_shards(str(tmp_path / sd))[0]) as tf:
            sizes[sd] = {m.name.split(".", 1)[1]: m.size for m in tf}
            meta = json.loads(next(tf.extractfile(m) for m in tf if m.name.endswith(".json")).read())
        assert meta["storage_dtype"] == sd and meta["text_shape"] == [2, D]
    assert sizes["bf16"]["latent.bf16"] == C * T * H * W * 2 and sizes["bf16"]["text.bf16"] == 2 * D * 2
    assert sizes["fp32"]["latent.npy"] > C * T * H * W * 4 and "mask.npy" in sizes["bf16"]


def test_fp32_shards_from_before_storage_dtype_load_unchanged(tmp_path):
    """The old layout: no storage_dtype or text_shape in the .json, no storage_dtypes in the
    done-list, fp32 .npy members."""
    latent, text, mask = _arrays(7)
    name = "shard-r000-000000.tar"
    with open(tmp_path / name, "wb") as f, wds.TarWriter(f) as tw:
        meta = {"source": "/s/7.mp4", "caption": "c7", "latent_bucket": f"{T}x{H}x{W}",
                "latent_shape": [C, T, H, W], "text_len": 3}
        npy = {}
        for k, a in (("latent", latent), ("text", text), ("mask", mask)):
            buf = io.BytesIO()
            np.save(buf, a)
            npy[f"{k}.npy"] = buf.getvalue()
        tw.write({"__key__": "abc", **npy, "json": json.dumps(meta).encode()})
    (tmp_path / "done-r000.jsonl").write_text(json.dumps(
        {"shard": name, "samples": 1, "inputs": ["/s/7.mp4"], "buckets": {f"{T}x{H}x{W}": 1}}) + "\n")
    m = write_manifest(str(tmp_path), {"latent_channels": C, "text_dim": D})
    assert (m["storage_dtype"], m["storage_dtypes"]) == ("fp32", {"fp32": 1})
    b = _samples(tmp_path, 1)[7]
    assert torch.equal(b["latent"][0], torch.from_numpy(latent)) and torch.equal(b["text"][0], torch.from_numpy(text))


def test_reruns_with_another_dtype_load_and_the_manifest_says_mixed(tmp_path):
    _write(tmp_path, "fp32", n=2)
    w = ShardWriter(str(tmp_path), rank=0, samples_per_shard=2, storage_dtype="bf16")
    w.write(*_arrays(5), {"source": "/s/5.mp4", "caption": "c5"})
    w.close()
    m = write_manifest(str(tmp_path), {"latent_channels": C, "text_dim": D})
    assert (m["storage_dtype"], m["storage_dtypes"]) == ("mixed", {"bf16": 1, "fp32": 2})
    got = _samples(tmp_path, 3)
    assert torch.equal(got[5]["latent"][0], _as_stored(_arrays(5)[0], "bf16"))
    assert torch.equal(got[0]["latent"][0], torch.from_numpy(_arrays(0, 2)[0]))


def test_fp16_overflow_and_unknown_dtype_are_refused(tmp_path):
    with pytest.raises(ValueError, match="storage_dtype='int8'"):
        ShardWriter(str(tmp_path / "a"), rank=0, samples_per_shard=1, storage_dtype="int8")
    w = ShardWriter(str(tmp_path / "b"), rank=0, samples_per_shard=2, storage_dtype="fp16")
    latent, text, mask = _arrays(0)
    with pytest.raises(ValueError, match=r"text has \|x\| = 70000 > 65504.*encode.storage_dtype=bf16"):
        w.write(latent, np.full_like(text, 70000.0), mask, {"source": "/s/0.mp4"})
    w.write(latent, np.full_like(text, 65504.0), mask, {"source": "/s/1.mp4"})  # the fp16 max is fine
    w.close()
    assert len(list_shards(str(tmp_path / "b"))) == 1


def test_damaged_bf16_member_names_the_shard(tmp_path):
    _write(tmp_path, "bf16", n=1)
    path = list_shards(str(tmp_path))[0]
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:  # the latent cut short by one bf16 word
        for m, data in members:
            if m.name.endswith(".latent.bf16"):
                data = data[:-2]
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"shard-r000-000000.tar: sample .* damaged .*do not hold shape"):
        _samples(tmp_path, 1)
    assert os.path.exists(path)

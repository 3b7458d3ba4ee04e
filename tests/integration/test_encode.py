"""sora-encode end to end on tiny clips: rejects, resume after kill, DP split, manifest."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from media import unknown_codec_mkv

from sora_dist.config.encode import EncodeConfig
from sora_dist.config.validate import ConfigError
from sora_dist.data import shards as sh
from sora_dist.data.demo_clips import render_clip
from sora_dist.data.video_io import write_mp4
from sora_dist.encode import run_encode
from sora_dist.models.text import build_tiny_text_encoder
from sora_dist.models.vae import build_tiny_vae

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return build_tiny_vae(str(d / "vae")), build_tiny_text_encoder(str(d / "t5"))


def _clips(folder, n, T=9, start=0):
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        h, w = [(32, 32), (24, 48), (48, 24)][i % 3]
        frames, cap = render_clip(h, w, T, seed=i)
        p = write_mp4(frames, os.path.join(folder, f"c{i:03d}.mp4"), 8)
        rows.append({"path": p, "caption": cap})
    return rows


def _manifest(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _cfg(models, inp, out, **kw):
    base = dict(input=str(inp), output=str(out), vae_path=models[0], text_encoder_path=models[1],
                resolutions=[[16, 16], [16, 32], [32, 16]], frames=[1, 5, 9], target_fps=8.0,
                samples_per_shard=2, progress=False, rank=0, world_size=1)
    base.update(kw)
    return EncodeConfig(**base)


def _all_sources(out):
    srcs = []
    for p in sh.list_shards(str(out)):
        srcs += [m["source"] for m in sh.read_shard_meta(p)]
    return srcs


def test_bad_inputs_rejected_good_kept(tmp_path, models):
    rows = _clips(tmp_path / "v", 3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    data = open(rows[0]["path"], "rb").read()
    (bad / "cut.mp4").write_bytes(data[: len(data) // 2])
    (bad / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    short = write_mp4(render_clip(16, 16, 3, 0)[0], str(bad / "short.mp4"), 8)
    big = write_mp4(render_clip(64, 96, 9, 0)[0], str(bad / "big.mp4"), 8)  # over max_side=80
    odd = unknown_codec_mkv(str(bad / "odd.mkv"))
    nocap = rows[1]["path"]
    rows = [rows[0], rows[2], {"path": nocap, "caption": "  "}] + [
        {"path": str(bad / n), "caption": "x"} for n in ("empty.mp4", "cut.mp4", "noise.mp4")] + [
        {"path": short, "caption": "x"}, {"path": big, "caption": "x"}, {"path": odd, "caption": "x"},
        {"path": str(bad / "missing.mp4"), "caption": "x"}]
    stats = run_encode(_cfg(models, _manifest(tmp_path / "m.jsonl", rows), tmp_path / "out", max_side=80))
    rejects = {os.path.basename(r["source"]): r["kind"]
               for r in map(json.loads, open(tmp_path / "out" / "rejects.jsonl"))}
    assert rejects == {"c001.mp4": "no_caption", "empty.mp4": "zero_length", "cut.mp4": "truncated",
                       "noise.mp4": "corrupt", "short.mp4": "too_short", "big.mp4": "huge_resolution",
                       "odd.mkv": "unsupported_codec", "missing.mp4": "missing"}
    m = stats["manifest"]
    assert m["num_samples"] == 2 and m["num_rejected"] == 8
    assert m["latent_channels"] == 4 and m["text_dim"] == 32
    assert sorted(_all_sources(tmp_path / "out")) == sorted([rows[0]["path"], rows[1]["path"]])


def test_folder_input_with_txt_captions_and_rerun_skips(tmp_path, models):
    rows = _clips(tmp_path / "v", 3)
    for r in rows[:2]:
        open(os.path.splitext(r["path"])[0] + ".txt", "w").write(r["caption"])
    out = tmp_path / "out"
    s1 = run_encode(_cfg(models, tmp_path / "v", out))
    assert s1["encoded"] == 2 and s1["rejected"] == {"no_caption": 1}
    s2 = run_encode(_cfg(models, tmp_path / "v", out))
    assert s2["encoded"] == 0 and s2["skipped_done"] == 3
    assert sorted(_all_sources(out)) == sorted(r["path"] for r in rows[:2])
    # the missing caption is added; retry_rejects picks the input up, only it
    open(os.path.splitext(rows[2]["path"])[0] + ".txt", "w").write(rows[2]["caption"])
    s3 = run_encode(_cfg(models, tmp_path / "v", out, retry_rejects=True))
    assert s3["encoded"] == 1 and s3["skipped_done"] == 2
    assert sorted(_all_sources(out)) == sorted(r["path"] for r in rows)
    assert s3["manifest"]["num_rejected"] == 0 and (out / "rejects.jsonl").read_text() == ""
    meta = sh.read_shard_meta(sh.list_shards(str(out))[0])[0]
    assert meta["caption"] in [r["caption"] for r in rows] and meta["bucket"].endswith("x9")


def test_two_ranks_disjoint_complete(tmp_path, models):
    rows = _clips(tmp_path / "v", 5)
    man = _manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    # rank 1 first (rank 0 waits for its marker, so the order matters only for the test's speed)
    s1 = run_encode(_cfg(models, man, out, rank=1, world_size=2))
    s0 = run_encode(_cfg(models, man, out, rank=0, world_size=2, wait_timeout_s=30))
    assert (s0["encoded"], s1["encoded"]) == (3, 2)
    assert {os.path.basename(p)[:10] for p in sh.list_shards(str(out))} == {"shard-r000", "shard-r001"}
    srcs = _all_sources(out)
    assert sorted(srcs) == sorted(r["path"] for r in rows)  # each exactly once
    assert s0["manifest"]["num_samples"] == 5


def test_rank0_times_out_without_other_ranks(tmp_path, models):
    man = _manifest(tmp_path / "m.jsonl", _clips(tmp_path / "v", 2))
    with pytest.raises(TimeoutError, match=r"ranks \[1\]"):
        run_encode(_cfg(models, man, tmp_path / "out", rank=0, world_size=2, wait_timeout_s=0.5))


def test_crash_between_rename_and_donelist_recovered(tmp_path, models):
    rows = _clips(tmp_path / "v", 4)
    man = _manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    run_encode(_cfg(models, man, out))
    # simulate a kill after the last shard's rename but before its done-list line, plus a
    # leftover temp shard: the rerun must neither duplicate nor lose a sample
    lines = open(out / "done-r000.jsonl").read().splitlines()
    open(out / "done-r000.jsonl", "w").write("\n".join(lines[:-1]) + "\n{\"torn")
    (out / ".shard-r000-000009.tar.tmp").write_bytes(b"partial")
    (out / "manifest.json").unlink()
    s = run_encode(_cfg(models, man, out))
    assert s["encoded"] == 0
    assert sorted(_all_sources(out)) == sorted(r["path"] for r in rows)
    assert not (out / ".shard-r000-000009.tar.tmp").exists()
    assert s["manifest"]["num_samples"] == 4


def test_kill_and_rerun_loses_nothing(tmp_path, models):
    rows = _clips(tmp_path / "v", 10)
    man = _manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sora_dist.encode", f"input={man}", f"output={out}",
            f"vae_path={models[0]}", f"text_encoder_path={models[1]}",
            "resolutions=[[16,16],[16,32],[32,16]]", "frames=[1,5,9]", "target_fps=8",
            "samples_per_shard=1", "progress=false"]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(sh.list_shards(str(out))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(sh.list_shards(str(out)))
    assert 2 <= n_before < 10, f"kill did not land mid-run ({n_before} shards); rc={proc.returncode}"
    assert not (out / "manifest.json").exists()
    s = run_encode(_cfg(models, man, out, samples_per_shard=1))
    assert s["skipped_done"] >= n_before and s["encoded"] == 10 - s["skipped_done"]
    srcs = _all_sources(out)
    assert sorted(srcs) == sorted(r["path"] for r in rows)  # every good sample exactly once
    assert s["manifest"]["num_samples"] == 10


def test_config_errors_before_work(tmp_path, models):
    with pytest.raises(ConfigError, match="encode.input"):
        run_encode(_cfg(models, tmp_path / "nope", tmp_path / "out"))
    man = _manifest(tmp_path / "m.jsonl", _clips(tmp_path / "v", 1))
    with pytest.raises(ConfigError, match="1 \\+ 4\\*k"):
        run_encode(_cfg(models, man, tmp_path / "out", frames=[1, 6]))
    with pytest.raises(ConfigError, match=r"encode.storage_dtype='bf8': use bf16, fp16 or fp32"):
        run_encode(_cfg(models, man, tmp_path / "out_sd", storage_dtype="bf8"))
    assert not (tmp_path / "out_sd").exists()  # refused before anything is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "no path"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        run_encode(_cfg(models, bad, tmp_path / "out"))


def test_marker_from_an_earlier_launch_is_not_trusted(tmp_path, models, monkeypatch):
    man = _manifest(tmp_path / "m.jsonl", _clips(tmp_path / "v", 3))
    out = tmp_path / "out"
    monkeypatch.setenv("SORA_ENCODE_RUN_ID", "launch-A")
    run_encode(_cfg(models, man, out, rank=1, world_size=2))
    monkeypatch.setenv("SORA_ENCODE_RUN_ID", "launch-B")
    with pytest.raises(TimeoutError, match=r"ranks \[1\]"):  # rank 1 of launch B has not finished
        run_encode(_cfg(models, man, out, rank=0, world_size=2, wait_timeout_s=0.5))
    run_encode(_cfg(models, man, out, rank=1, world_size=2))
    s0 = run_encode(_cfg(models, man, out, rank=0, world_size=2, wait_timeout_s=5))
    assert s0["manifest"]["num_samples"] == 3 and s0["encoded"] == 0  # nothing redone


@pytest.fixture(scope="module")
def umt5(tmp_path_factory):
    return build_tiny_text_encoder(str(tmp_path_factory.mktemp("models") / "umt5"), kind="umt5")


def test_umt5_folder_encodes_and_shards_record_it(tmp_path, models, umt5):
    """A umT5 folder goes through the same text_encoder_path; the shards say who made them and
    hold exactly what TextEncoder gives for the caption (real tokens only; the loader pads)."""
    from sora_dist.config.data import DataConfig
    from sora_dist.data.loader import ShardLoader
    from sora_dist.models.text import TextEncoder

    rows = _clips(tmp_path / "v", 2)
    out = tmp_path / "out"
    m = run_encode(_cfg((models[0], umt5), _manifest(tmp_path / "m.jsonl", rows), out))["manifest"]
    te = m["text_encoder"]
    assert (te["model_type"], te["class"], te["name"], te["text_dim"]) == ("umt5", "UMT5EncoderModel", "umt5", 32)
    assert (te["max_length"], te["pad_to_max"], te["path"]) == (512, True, umt5)
    assert (m["text_max_length"], m["text_pad_to_max"], m["text_dim"]) == (512, True, 32)
    assert (m["vae"]["class"], m["vae"]["latent_channels"], m["vae"]["name"]) == ("AutoencoderKLWan", 4, "vae")
    assert json.load(open(out / "made_by.json")) == {"text_encoder": te, "vae": m["vae"]}
    direct = TextEncoder.load(umt5)
    ld = ShardLoader(DataConfig(source="shards", packing=False, shards=str(out), batch_size=1, shuffle_buffer=0), 0, 1)
    for _ in range(2):
        b = next(ld)
        emb, mask = direct.encode(b["captions"])
        assert b["text"].shape == emb.shape == (1, 512, 32)  # Wan layout in every training batch
        assert torch.equal(b["text"], emb.to(torch.bfloat16).float())  # stored in bf16 by default
        assert torch.equal(b["text_mask"], mask) and mask.sum() < 512

    # a rerun into that folder with the T5 encoder would mix two encoders' embeddings
    with pytest.raises(ConfigError, match=r"encode.output: .*umt5 text encoder 'umt5'.*t5 text encoder 't5'"):
        run_encode(_cfg(models, _manifest(tmp_path / "m.jsonl", rows), out))


def test_t5_shards_record_t5_and_keep_per_batch_padding(tmp_path, models):
    m = run_encode(_cfg(models, _manifest(tmp_path / "m.jsonl", _clips(tmp_path / "v", 1)), tmp_path / "o"))["manifest"]
    assert (m["text_encoder"]["model_type"], m["text_max_length"], m["text_pad_to_max"]) == ("t5", 120, False)


def test_unsupported_text_encoder_is_a_config_error_before_work(tmp_path, models, umt5):
    import shutil

    bad = tmp_path / "clip_text"
    shutil.copytree(umt5, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="clip_text_model")))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"encode.text_encoder_path: .*clip_text.*model_type='clip_text_model'"
                                          r".*supported text encoders: t5, umt5"):
        run_encode(_cfg((models[0], str(bad)), _manifest(tmp_path / "m.jsonl", _clips(tmp_path / "v", 1)), out))
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("storage_dtype", ["bf16", "fp16", "fp32"])
def test_storage_dtype_round_trips_through_sora_encode(tmp_path, models, storage_dtype):
    """Shards in each storage dtype: the loader's float32 equals the direct encoding rounded by
    torch to that dtype (bit for bit; fp32 is the encoding itself); the manifest and every
    sample record it."""
    import tarfile

    from sora_dist.config.data import DataConfig
    from sora_dist.data.loader import ShardLoader
    from sora_dist.data.video_io import load_clip, parse_buckets
    from sora_dist.models.text import TextEncoder
    from sora_dist.models.vae import VideoVAE

    rows = _clips(tmp_path / "v", 2)
    cfg = _cfg(models, _manifest(tmp_path / "m.jsonl", rows), tmp_path / "out", storage_dtype=storage_dtype)
    m = run_encode(cfg)["manifest"]
    assert (m["storage_dtype"], m["storage_dtypes"]) == (storage_dtype, {storage_dtype: 2})
    ext = "bf16" if storage_dtype == "bf16" else "npy"
    for p in sh.list_shards(str(tmp_path / "out")):
        with tarfile.open(p) as tf:
            names = {n.split(".", 1)[1] for n in tf.getnames()}
        assert names == {f"latent.{ext}", f"text.{ext}", "mask.npy", "json"}
    vae, te = VideoVAE.load(models[0]), TextEncoder.load(models[1], cfg.text_max_length)
    buckets = parse_buckets(cfg.resolutions, cfg.frames)
    rnd = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[storage_dtype]
    ld = ShardLoader(DataConfig(source="shards", packing=False, shards=str(tmp_path / "out"), batch_size=1, shuffle_buffer=0), 0, 1)
    seen = set()
    for _ in rows:
        b = next(ld)
        cap = b["captions"][0]
        row = next(r for r in rows if r["caption"] == cap)
        lat = vae.encode(load_clip(row["path"], buckets, cfg.target_fps)[0])[0]
        emb, mask = te.encode([cap])
        txt = emb[0, : int(mask.sum())]
        assert b["latent"].dtype == b["text"].dtype == torch.float32
        assert torch.equal(b["latent"][0], lat.to(rnd).float()) and torch.equal(b["text"][0], txt.to(rnd).float())
        assert (storage_dtype == "fp32") == torch.equal(b["latent"][0], lat)  # the rounding is real
        seen.add(cap)
        meta = next(mt for p in sh.list_shards(str(tmp_path / "out")) for mt in sh.read_shard_meta(p)
                    if mt["caption"] == cap)
        assert meta["storage_dtype"] == storage_dtype and meta["text_shape"] == list(txt.shape)
    assert seen == {r["caption"] for r in rows}

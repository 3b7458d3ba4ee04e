"""Streaming, tiled and rank-sharded Wan decode equal decode() of the whole latent.

Tolerances (fp32, CPU, tiny random-weight Wan VAE): "equal" is max |diff| <= 1e-5 on [-1, 1]
frames (EQ). The same per-frame ops run in each case, so only float rounding differs: bit for bit
on some CPUs, ~1e-6 on others (an AMD EPYC here), whose conv kernels block the work differently
for different input lengths.
  decode_stream untiled == decode():             EQ (same per-frame ops, cache carried)
  decode_stream tiled   == diffusers tiled_decode: EQ (same grid, same blend order)
  tiled vs untiled: differs (tiles see zero padding at their borders); random weights give
                     max |diff| ~0.8, mean ~0.07 on [-1, 1] frames - bounded below, not a quality claim
  decode_shard with warmup >= decoder_receptive_field(): EQ; a shorter warm-up differs (~0.8).
"""
import av
import pytest
import torch

from sora_dist.data.video_io import Mp4StreamWriter
from sora_dist.models.vae import VideoVAE, build_tiny_vae


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return VideoVAE.load(build_tiny_vae(str(tmp_path_factory.mktemp("v") / "wan"), latent_channels=4))


def _eq(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _z(t, h, w, seed=0):
    return torch.randn(1, 4, t, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 3])
def test_stream_chunks_equal_whole_decode(wan, k):
    z = _z(7, 3, 4)
    ref = wan.decode(z)
    chunks = list(wan.decode_stream(z, frames_per_chunk=k))
    # chunk sizes follow the causal layout: latent frame 0 -> 1 frame, others -> 4
    sizes = [c.shape[2] for c in chunks]
    assert sizes == [-(wan.pixel_frames(t, min(t + k, 7))[0]) + wan.pixel_frames(t, min(t + k, 7))[1]
                     for t in range(0, 7, k)]
    assert sizes[:2] == ([1, 4] if k == 1 else [9, 12])
    assert sum(sizes) == ref.shape[2] == 25
    _eq(torch.cat(chunks, dim=2), ref)


def test_stream_tiled_matches_diffusers_tiling_and_is_near_untiled(wan):
    z = _z(3, 6, 8)  # 48x64 px, tiles of 32 px overlapping by 16
    untiled = wan.decode(z)
    wan.enable_tiling(tile=32, stride=16)
    try:
        ref = wan.decode(z)  # diffusers' tiled_decode
    finally:
        wan.model.disable_tiling()
    got = torch.cat(list(wan.decode_stream(z, frames_per_chunk=2, tile=32, overlap=16)), dim=2)
    assert got.shape == untiled.shape == (1, 3, 9, 48, 64)
    _eq(got, ref)
    d = (got - untiled).abs()
    assert 0 < d.mean() < 0.15 and d.max() < 1.2  # really tiled; stated border tolerance


def test_wan22_patchified_stream(tmp_path):
    vae = VideoVAE.load(build_tiny_vae(str(tmp_path / "w22"), kind="wan2.2"))
    z = _z(3, 2, 3)
    _eq(torch.cat(list(vae.decode_stream(z, frames_per_chunk=2)), dim=2), vae.decode(z))


def test_shards_equal_whole_decode_with_receptive_field_warmup(wan):
    rf = wan.decoder_receptive_field()
    assert 4 < rf < 40  # tiny Wan: ~30 latent frames of causal history
    t = rf + 6
    z = _z(t, 2, 2, seed=1)
    ref = wan.decode(z)
    for world in (2, 3):
        shards = [wan.decode_shard(z, r, world, frames_per_chunk=4) for r in range(world)]
        assert shards[0].start == 0 and shards[-1].stop == ref.shape[2]
        assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
        assert all(s.frames.shape[2] == s.stop - s.start for s in shards)
        _eq(torch.cat([s.frames for s in shards], dim=2), ref)
    # a short warm-up is approximate: the last rank's first frames differ
    short = wan.decode_shard(z, 1, 2, warmup=2)
    assert not torch.allclose(short.frames, ref[:, :, short.start:short.stop], atol=1e-4)


def test_more_ranks_than_frames(wan):
    z = _z(2, 2, 2)
    shards = [wan.decode_shard(z, r, 4, warmup=1) for r in range(4)]
    assert [s.frames.shape[2] for s in shards] == [s.stop - s.start for s in shards]
    _eq(torch.cat([s.frames for s in shards], dim=2), wan.decode(z))


def test_bad_arguments(wan):
    z = _z(2, 2, 2)
    with pytest.raises(ValueError, match="frames_per_chunk"):
        next(wan.decode_stream(z, frames_per_chunk=0))
    with pytest.raises(ValueError, match="decode_stream wants"):
        next(wan.decode_stream(z[:, :3]))
    with pytest.raises(ValueError, match="spatial factor 8"):
        next(wan.decode_stream(z, tile=30))
    with pytest.raises(ValueError, match="0 < overlap < tile"):
        next(wan.decode_stream(z, tile=32, overlap=32))
    with pytest.raises(ValueError, match="tile is None"):
        next(wan.decode_stream(z, overlap=8))
    with pytest.raises(ValueError, match="rank < world"):
        wan.decode_shard(z, 2, 2)
    with pytest.raises(ValueError, match="warmup"):
        wan.decode_shard(z, 1, 2, warmup=0)


def test_mp4_stream_writer(wan, tmp_path):
    z = _z(3, 2, 2)
    path = tmp_path / "out" / "v.mp4"
    with Mp4StreamWriter(str(path), fps=8) as w:
        for chunk in wan.decode_stream(z, frames_per_chunk=1):
            w.write(chunk)
    assert w.frames_written == 9 and path.exists()
    assert not [p for p in path.parent.iterdir() if p.name != "v.mp4"]  # temp file renamed away
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (16, 16)
    w = Mp4StreamWriter(str(tmp_path / "bad.mp4"), fps=8)
    w.write(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="differs"):
        w.write(torch.zeros(1, 3, 32, 16))
    w.abort()
    assert not list(tmp_path.glob(".bad*"))
    with pytest.raises(ValueError, match="fps"):
        Mp4StreamWriter(str(tmp_path / "x.mp4"), fps=0)

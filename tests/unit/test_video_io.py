"""video_io: decode, bucket, resize/crop, bad-input classification, mp4 writing."""
import os

import numpy as np
import pytest
from media import unknown_codec_mkv
import torch

from sora_dist.data.demo_clips import render_clip
from sora_dist.data.video_io import (BadInput, Bucket, choose_bucket, load_clip, parse_buckets, probe,
                                     read_frames, resize_crop, write_mp4)

BUCKETS = parse_buckets([[32, 32], [32, 64], [64, 32]], [1, 5, 9])


def _clip(tmp_path, name="a.mp4", h=40, w=72, T=12, fps=8.0, seed=0):
    frames, _ = render_clip(h, w, T, seed)
    return write_mp4(frames, str(tmp_path / name), fps), frames


def test_write_mp4_roundtrip_decodes(tmp_path):
    path, frames = _clip(tmp_path, h=33, w=47)  # odd size gets padded to even
    info = probe(path)
    assert (info.width, info.height, info.num_frames, info.fps) == (48, 34, 12, 8.0)
    got = read_frames(info, 12, 8.0)
    assert got.shape == (12, 3, 34, 48) and got.dtype == torch.uint8
    # lossy codec: close to the source, not equal
    err = (got[:, :, :33, :47].float() - frames.float()).abs().mean()
    assert err < 12, err
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f], "temp file left behind"


def test_write_mp4_float_range(tmp_path):
    x = torch.linspace(-1, 1, 16 * 16).view(1, 1, 16, 16).expand(3, 3, 16, 16)
    info = probe(write_mp4(x, str(tmp_path / "f.mp4"), 4))
    got = read_frames(info, 3, 4.0).float()
    assert got.min() < 20 and got.max() > 235


def test_bucket_choice_aspect_and_fps(tmp_path):
    path, _ = _clip(tmp_path, h=40, w=72, T=12, fps=8.0)
    info = probe(path)
    b, fps = choose_bucket(info, BUCKETS, target_fps=4)
    # 40x72 is wide -> 32x64; 12 frames at 8 fps sampled at 4 fps -> 6 frames -> bucket 5
    assert (b.height, b.width, b.frames, fps) == (32, 64, 5, 4.0)
    # source slower than the target: frames are taken at the source rate, not duplicated
    b2, fps2 = choose_bucket(info, BUCKETS, target_fps=30)
    assert (b2.frames, fps2) == (9, 8.0)


def test_frame_sampling_picks_strided_frames(tmp_path):
    frames = torch.zeros(10, 3, 16, 16, dtype=torch.uint8)
    for t in range(10):
        frames[t] = t * 25  # brightness encodes the frame index
    info = probe(write_mp4(frames, str(tmp_path / "s.mp4"), 10))
    got = read_frames(info, 4, 5.0)  # every second frame
    idx = (got.float().mean(dim=(1, 2, 3)) / 25).round().tolist()
    assert idx == [0, 2, 4, 6]


def test_resize_crop_center():
    x = torch.zeros(2, 3, 20, 40, dtype=torch.uint8)
    x[:, :, :, 10:30] = 200  # bright center band, 20 px wide
    y = resize_crop(x, 16, 16)
    assert y.shape == (2, 3, 16, 16)
    # scale 0.8 -> 16x32; crop columns 8:24 = the band (scaled to 8:24) -> all bright
    assert y.float().mean() > 190


def test_image_is_one_frame(tmp_path):
    from PIL import Image

    p = tmp_path / "img.png"
    Image.fromarray(np.full((30, 60, 3), 100, np.uint8)).save(p)
    frames, bucket, fps, info = load_clip(str(p), BUCKETS, 8)
    assert info.is_image and bucket == Bucket(32, 64, 1) and frames.shape == (1, 3, 32, 64)


@pytest.mark.parametrize("kind", ["zero_length", "truncated", "corrupt", "too_short", "huge_resolution",
                                  "missing", "unsupported_codec"])
def test_bad_inputs_classified(tmp_path, kind):
    path, _ = _clip(tmp_path, T=12)
    max_side = 4096
    if kind == "zero_length":
        path = str(tmp_path / "empty.mp4")
        open(path, "wb").close()
    elif kind == "truncated":
        data = open(path, "rb").read()
        path = str(tmp_path / "cut.mp4")
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "corrupt":
        path = str(tmp_path / "noise.mp4")
        open(path, "wb").write(np.random.default_rng(0).bytes(4000))
    elif kind == "too_short":
        path, _ = _clip(tmp_path, name="short.mp4", T=3)
    elif kind == "huge_resolution":
        max_side = 64  # lowered limit; the 40x72 clip exceeds it
    elif kind == "missing":
        path = str(tmp_path / "nope.mp4")
    elif kind == "unsupported_codec":
        path = unknown_codec_mkv(str(tmp_path / "odd.mkv"))
    with pytest.raises(BadInput) as e:
        load_clip(path, parse_buckets([[32, 32]], [5, 9]), 8, max_side=max_side)
    assert e.value.kind == kind and path in str(e.value)


def test_bad_bucket_table():
    with pytest.raises(ValueError, match="H, W"):
        parse_buckets([[32]], [1])
    with pytest.raises(ValueError, match="frame count"):
        parse_buckets([[32, 32]], [0])


def test_demo_clips_manifest_decodes(tmp_path):
    import json

    from sora_dist.data.demo_clips import make_demo_clips

    man = make_demo_clips(str(tmp_path / "c"), n=3, images=1, frame_choices=(9,))
    rows = [json.loads(line) for line in open(man)]
    assert len(rows) == 4 and all(r["caption"].startswith("a ") for r in rows)
    infos = [probe(str(tmp_path / "c" / r["path"])) for r in rows]
    assert [i.is_image for i in infos] == [False, False, False, True]
    assert all(i.num_frames == 9 for i in infos[:3])


def test_truncated_faststart_mp4_detected_while_decoding(tmp_path):
    """moov at the front: the header survives the cut, the missing frames are caught on decode."""
    import av

    path = str(tmp_path / "fs.mp4")
    rng = np.random.default_rng(0)
    with av.open(path, "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for _ in range(30):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), format="rgb24")
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert probe(path).num_frames == 30  # the header still claims every frame
    with pytest.raises(BadInput) as e:
        load_clip(path, parse_buckets([[32, 32]], [25]), 8)
    assert e.value.kind == "truncated"


def test_resolution_choice_avoids_upscaling(tmp_path):
    from sora_dist.data.video_io import VideoInfo

    table = parse_buckets([[16, 16], [32, 32], [64, 64], [32, 64]], [5])
    pick = lambda h, w: choose_bucket(VideoInfo("x.mp4", False, w, h, 8.0, 9, "h264"), table, 8)[0]
    assert (pick(40, 40).height, pick(40, 40).width) == (32, 32)   # largest square not above 40x40
    assert (pick(100, 90).height, pick(100, 90).width) == (64, 64)
    assert (pick(10, 10).height, pick(10, 10).width) == (16, 16)   # smaller than all: smallest
    assert (pick(30, 70).height, pick(30, 70).width) == (32, 64)   # only one wide bucket

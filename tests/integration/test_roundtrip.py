"""clip -> sora-encode -> shards -> ShardLoader gives the tensors of encoding the clip directly."""
import json

import pytest
import torch

from sora_dist.config.data import DataConfig
from sora_dist.config.encode import EncodeConfig
from sora_dist.data.demo_clips import render_clip
from sora_dist.data.loader import ShardLoader
from sora_dist.data.video_io import load_clip, parse_buckets, write_mp4
from sora_dist.encode import run_encode
from sora_dist.models.text import TextEncoder, build_tiny_text_encoder
from sora_dist.models.vae import VideoVAE, build_tiny_vae

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("tile", [0, 32])
def test_roundtrip_matches_direct_encode(tmp_path, tile):
    vae_dir = build_tiny_vae(str(tmp_path / "vae"))
    te_dir = build_tiny_text_encoder(str(tmp_path / "t5"))
    rows = []
    for i, (h, w, T, fps) in enumerate([(40, 40, 20, 12), (36, 70, 11, 8), (70, 36, 30, 24), (40, 40, 9, 8)]):
        frames, cap = render_clip(h, w, T, seed=i)
        rows.append({"path": write_mp4(frames, str(tmp_path / f"c{i}.mp4"), fps), "caption": cap + " " * i + "!" * i})
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EncodeConfig(input=str(man), output=str(tmp_path / "out"), vae_path=vae_dir, text_encoder_path=te_dir,
                       resolutions=[[32, 32], [32, 64], [64, 32]], frames=[1, 5, 9], target_fps=8.0,
                       samples_per_shard=3, progress=False, rank=0, world_size=1, vae_tile_size=tile,
                       storage_dtype="fp32")  # exact float32 round trip (bf16 storage: test_storage_dtype)
    run_encode(cfg)

    vae, te = VideoVAE.load(vae_dir), TextEncoder.load(te_dir, cfg.text_max_length)
    vae.enable_tiling_from_size(tile)  # 32: the 32x64 buckets go through diffusers' tiled path
    buckets = parse_buckets(cfg.resolutions, cfg.frames)
    direct = {}
    for r in rows:
        frames, bucket, _, _ = load_clip(r["path"], buckets, cfg.target_fps)
        emb, mask = te.encode([r["caption"]])
        direct[r["caption"]] = (vae.encode(frames)[0], emb[0, : int(mask.sum())])

    ld = ShardLoader(DataConfig(source="shards", packing=False, shards=str(tmp_path / "out"), batch_size=1), 0, 1)
    assert (ld.latent_channels, ld.text_dim) == (4, 32)
    seen = set()
    for _ in range(len(rows)):
        b = next(ld)
        cap = b["captions"][0]
        lat, txt = direct[cap]
        assert b["latent"][0].shape == lat.shape and b["bucket"] == "x".join(map(str, lat.shape[1:]))
        torch.testing.assert_close(b["latent"][0], lat, rtol=0, atol=0)  # float32 stored exactly
        torch.testing.assert_close(b["text"][0], txt, rtol=0, atol=0)
        assert b["text_mask"][0].all()
        seen.add(cap)
    assert seen == set(direct)
    # buckets chosen from aspect ratio and duration at 8 fps
    shapes = sorted(tuple(v[0].shape) for v in direct.values())
    assert shapes == sorted([(4, 3, 4, 4), (4, 3, 4, 8), (4, 3, 8, 4), (4, 3, 4, 4)])

"""The demo's real launch path: `python -m sora_dist.encode` (Hydra main, encode.yaml) as two
ranks that only share RANK/WORLD_SIZE env vars, then the shards feed the loader."""
import json
import os

import pytest

from sora_dist.config.data import DataConfig
from sora_dist.data.loader import ShardLoader
from sora_dist.data.shards import list_shards, read_shard_meta
from sora_dist.demo import run_demo

pytestmark = pytest.mark.integration


def test_demo_two_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = run_demo(str(tmp_path / "demo"), n_clips=5, ranks=2, images=1)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["num_samples"] == 6 and manifest["world_size"] == 2
    ranks = {os.path.basename(p)[7:10] for p in list_shards(out)}
    assert ranks == {"000", "001"}
    sources = [m["source"] for p in list_shards(out) for m in read_shard_meta(p)]
    assert len(sources) == len(set(sources)) == 6
    assert any(b.startswith("1x") for b in manifest["buckets"])  # the still became a 1-frame sample
    b = next(ShardLoader(DataConfig(source="shards", shards=out, batch_size=1), 0, 1))
    assert b["latent"].shape[1] == 4 and b["text"].shape[2] == 32

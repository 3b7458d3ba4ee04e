"""sora-sample under torchrun layouts against one process: the sampled latents of every prompt
equal within 1e-5 relative (fp32, CPU) for DDPM, DDIM and flow, under tp2 (SP), cp2 ring,
cp2 Ulysses, CFG-parallel (2 ranks) and tp2 x cp2; DP over a 5-prompt file on 2 groups samples
each batch once (5 distinct videos, equal to the one-process ones)."""
import json
import os

import pytest
import torch

from sora_dist.config import JobConfig
from sora_dist.config.encode import EncodeConfig
from sora_dist.config.parallel import ParallelConfig
from sora_dist.config.sample import SampleConfig
from sora_dist.data.demo_clips import make_demo_clips
from sora_dist.encode import run_encode
from sora_dist.models.text import build_tiny_text_encoder
from sora_dist.models.vae import build_tiny_vae
from sora_dist.sample import run_sample
from sora_dist.testing import run_distributed

pytestmark = pytest.mark.distributed

PROMPTS = ["a red square moving left", "a blue circle moving up", "a green ball on a white background",
           "a yellow box sliding right", "two dots bouncing"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs (weights all random: zero_init=false) on shared shards: DDPM and flow."""
    from sora_dist.training.trainer import Trainer

    d = tmp_path_factory.mktemp("psample")
    man = make_demo_clips(str(d / "clips"), n=4, sizes=[(32, 32)], fps_choices=(8,), frame_choices=(9,))
    run_encode(EncodeConfig(input=man, output=str(d / "shards"), vae_path=build_tiny_vae(str(d / "vae")),
                            text_encoder_path=build_tiny_text_encoder(str(d / "t5")), resolutions=[[32, 32]],
                            frames=[9], target_fps=8.0, samples_per_shard=2, text_max_length=12,
                            progress=False, rank=0, world_size=1))
    out = {}
    for objective in ("ddpm", "flow"):
        cfg = JobConfig()
        cfg.model.zero_init = False
        cfg.diffusion.objective, cfg.diffusion.sampler = objective, ("euler" if objective == "flow" else "ddim")
        cfg.data.source, cfg.data.shards, cfg.data.batch_size = "shards", str(d / "shards"), 2
        cfg.train.run_dir, cfg.train.steps, cfg.train.ckpt_every = str(d / objective), 1, 1
        cfg.train.ema_decay = 0.9
        cfg.logging.wandb_mode = "disabled"
        tr = Trainer(cfg)
        try:
            tr.train()
        finally:
            tr.close()
        out[objective] = str(d / objective)
    return d, out


def _cfg(run_dir, out, sampler, prompts=PROMPTS[:2], **kw):
    parallel = ParallelConfig(**{"fsdp": False, **kw.pop("parallel", {})})
    base = dict(run_dir=run_dir, output_dir=str(out), num_frames=9, height=32, width=32, fps=8.0, steps=3,
                sampler=sampler, guidance_scale=3.0, progress=False, prompts=list(prompts), batch_size=2)
    return SampleConfig(**{**base, **kw}, parallel=parallel)


def _worker(rank, world, cfg):
    res = run_sample(cfg)
    return {"latents": res["latents"], "indices": res["indices"]}


def _by_index(results):
    out = {}
    for r in results:
        for i, lat in zip(r["indices"], r["latents"]):
            if i in out:  # every rank of a group holds the same latents
                assert torch.equal(out[i], lat)
            out[i] = lat
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


LAYOUTS = {
    "tp2_sp": (2, dict(parallel=dict(tp=2, sequence_parallel=True))),
    "cp2_ring": (2, dict(parallel=dict(cp=2, cp_mode="ring"))),
    "cp2_ulysses": (2, dict(parallel=dict(cp=2, cp_mode="ulysses"))),
    "cfg_parallel": (2, dict(cfg_parallel=True)),
    "tp2_cp2": (4, dict(parallel=dict(tp=2, cp=2, cp_mode="ring"))),
    # weights too big for one device: FSDP-sharded over the CP ranks, gathered per block
    "cp2_fsdp": (2, dict(parallel=dict(cp=2, cp_mode="ulysses", fsdp=True))),
}
# Every layout under flow; DDPM/DDIM (the same denoiser calls, another update rule) on two, the
# rest under `pytest -m slow`.
_SLOW = pytest.mark.slow
CASES = ([("ddpm", "ddpm", "cfg_parallel"), pytest.param("ddpm", "ddpm", "tp2_sp", marks=_SLOW)]
         + [("ddpm", "ddim", n) if n in ("tp2_sp", "cfg_parallel") else pytest.param("ddpm", "ddim", n, marks=_SLOW)
            for n in LAYOUTS]
         + [("flow", "euler", n) for n in LAYOUTS])


@pytest.mark.parametrize("objective, sampler, name", CASES)
def test_sampled_latents_match_one_process(runs, tmp_path, objective, sampler, name):
    _, run = runs
    ref = run_sample(_cfg(run[objective], tmp_path / "ref", sampler))
    world, kw = LAYOUTS[name]
    got = _by_index(run_distributed(_worker, world, _cfg(run[objective], tmp_path / "par", sampler, **kw),
                                    all_ranks=True))
    assert sorted(got) == [0, 1]
    for i, want in zip(ref["indices"], ref["latents"]):
        assert rel(got[i], want) < 1e-5, (name, i, rel(got[i], want))
    assert not torch.allclose(got[0], got[1])


def test_prompt_groups_sample_each_batch_once_and_reruns_skip(runs, tmp_path):
    _, run = runs
    ref = run_sample(_cfg(run["flow"], tmp_path / "ref", "euler", prompts=PROMPTS))
    out = tmp_path / "dp"
    results = run_distributed(_worker, 2, _cfg(run["flow"], out, "euler", prompts=PROMPTS), all_ranks=True)
    # batch 0 and 2 on group 0, batch 1 on group 1: nothing sampled twice
    assert sorted(results[0]["indices"]) == [0, 1, 4] and sorted(results[1]["indices"]) == [2, 3]
    got = _by_index(results)
    for i, want in zip(ref["indices"], ref["latents"]):
        assert rel(got[i], want) < 1e-5
    recs = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4]
    assert [r["prompt"] for r in recs] == PROMPTS and len({r["path"] for r in recs}) == 5
    assert all(os.path.getsize(r["path"]) > 0 for r in recs)
    # A rerun finds every video and samples nothing; samples.jsonl keeps all five.
    again = run_distributed(_worker, 2, _cfg(run["flow"], out, "euler", prompts=PROMPTS), all_ranks=True)
    assert all(r["indices"] == [] for r in again)
    assert len(open(out / "samples.jsonl").read().splitlines()) == 5


def test_decode_parallel_equals_one_writer(runs, tmp_path):
    """decode_parallel: two ranks decode a share each (the second warms its causal cache on the
    frames before its share) and the writer muxes them: the same frames as one decode (the PNG
    strips, lossless, are identical) and the same number of frames in the mp4."""
    from PIL import Image

    from sora_dist.data.video_io import probe

    _, run = runs
    run_sample(_cfg(run["flow"], tmp_path / "one", "euler", num_frames=17))
    run_distributed(_worker, 2, _cfg(run["flow"], tmp_path / "two", "euler", num_frames=17, decode_parallel=True,
                                     parallel=dict(cp=2, cp_mode="ulysses"), decode_chunk_frames=2))
    for i in range(2):
        a, b = (tmp_path / d / f"sample_{i:03d}" for d in ("one", "two"))
        assert probe(str(a) + ".mp4").num_frames == probe(str(b) + ".mp4").num_frames == 17
        assert (Image.open(str(a) + ".png").tobytes() == Image.open(str(b) + ".png").tobytes())

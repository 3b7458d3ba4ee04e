"""sora-train-vae end to end on tiny demo clips and the tiny real AutoencoderKLWan: it learns,
resumes bit for bit, exports a diffusers folder whose latents_mean/std are the training clips'
statistics and that sora-encode reads, refuses bad config up front, and DP2 equals one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sora_dist.config.optim import OptimConfig
from sora_dist.config.train import LoggingConfig
from sora_dist.config.vae_train import VAETrainConfig
from sora_dist.config.validate import ConfigError
from sora_dist.data.demo_clips import make_demo_clips
from sora_dist.data.video_io import load_clip, parse_buckets
from sora_dist.models.vae import VideoVAE, build_tiny_vae
from sora_dist.testing import run_distributed
from sora_dist.training.vae import VAETrainer

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RES, FRAMES = [[16, 16]], [5]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae_data")
    make_demo_clips(str(d / "clips"), n=4, seed=0)
    return str(d / "clips"), build_tiny_vae(str(d / "vae"))


def _cfg(data, run_dir, **kw):
    base = dict(input=data[0], vae_path=data[1], run_dir=str(run_dir), resolutions=RES, frames=FRAMES,
                target_fps=8.0, steps=4, batch_size=2, eval_clips=["clip_0003.mp4"], eval_every=0,
                device="cpu", ckpt_every=2, dp_mode="ddp",
                optim=OptimConfig(lr=2e-3, decay="constant", grad_clip=1.0),
                logging=LoggingConfig(wandb_mode="disabled"))
    base.update(kw)
    return VAETrainConfig(**base)


def _train(cfg, stop_at=None):
    tr = VAETrainer(cfg)
    try:
        return tr.train(stop_at), tr
    finally:
        tr.close()


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    losses, tr = _train(_cfg(data, tmp_path_factory.mktemp("full")))
    return losses, tr


def test_learns_loss_down_psnr_up(full_run):
    losses, tr = full_run
    assert len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], losses
    (s0, p0), (s1, p1) = tr.psnr_history[0], tr.psnr_history[-1]
    assert (s0, s1) == (0, 4)
    assert p1 > p0 + 0.5, tr.psnr_history
    rows = [json.loads(line) for line in open(os.path.join(tr.run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["eval_psnr"] == pytest.approx(p1)


def test_interrupted_run_resumes_exactly(data, full_run, tmp_path):
    cfg = _cfg(data, tmp_path / "run")
    first, _ = _train(cfg, stop_at=2)  # "killed" after the step-2 checkpoint
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000002")
    rest, tr = _train(cfg)
    assert tr.psnr_history[0][0] == 4  # the resumed run did not re-evaluate step 0
    assert first + rest == full_run[0]  # bit for bit


def _recompute_stats(export, sources):
    import diffusers

    vae = diffusers.AutoencoderKLWan.from_pretrained(export).eval()
    buckets = parse_buckets(RES, FRAMES)
    mus = []
    with torch.no_grad():
        for s in sources:
            x = load_clip(s, buckets, 8.0)[0].permute(1, 0, 2, 3)[None].float() / 127.5 - 1
            mus.append(vae.encode(x).latent_dist.mode().double())
    mu = torch.cat([m.flatten(2) for m in mus], dim=2)  # (1, C, positions)
    return mu.mean(dim=(0, 2)), mu.std(dim=(0, 2), unbiased=False)


def test_export_loads_and_holds_training_latent_stats(data, full_run, tmp_path):
    from sora_dist.config.encode import EncodeConfig
    from sora_dist.encode import run_encode
    from sora_dist.models.text import build_tiny_text_encoder

    _, tr = full_run
    export = tr.export_path
    split = json.load(open(os.path.join(tr.run_dir, "split.json")))
    assert [os.path.basename(s) for s in split["eval"]] == ["clip_0003.mp4"] and len(split["train"]) == 3
    conf = json.load(open(os.path.join(export, "config.json")))
    mean, std = _recompute_stats(export, split["train"])
    assert torch.allclose(torch.tensor(conf["latents_mean"], dtype=torch.float64), mean, atol=1e-5)
    assert torch.allclose(torch.tensor(conf["latents_std"], dtype=torch.float64), std, atol=1e-5)
    orig = json.load(open(os.path.join(data[1], "config.json")))
    assert conf["latents_mean"] != orig["latents_mean"]

    vae = VideoVAE.load(export)
    assert vae.latent_channels == 4
    # sora-encode reads the folder as is: normalised latents of the training clips are ~N(0, 1)
    te = build_tiny_text_encoder(str(tmp_path / "t5"))
    stats = run_encode(EncodeConfig(input=os.path.join(data[0], "manifest.jsonl"), output=str(tmp_path / "shards"),
                                    vae_path=export, text_encoder_path=te, resolutions=RES, frames=FRAMES,
                                    target_fps=8.0, progress=False, rank=0, world_size=1, storage_dtype="fp32"))
    assert stats["manifest"]["num_samples"] == 4 and stats["manifest"]["vae"]["path"] == export
    buckets = parse_buckets(RES, FRAMES)
    z = torch.cat([vae.encode(load_clip(s, buckets, 8.0)[0]).flatten(2) for s in split["train"]], dim=2)
    assert torch.allclose(z.mean(dim=(0, 2)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2), unbiased=False), torch.ones(4), atol=1e-4)


def test_bad_input_is_one_config_error_before_work(data, tmp_path):
    with pytest.raises(ConfigError, match=r"vae_train.input=.*does not exist"):
        VAETrainer(_cfg(data, tmp_path / "a", input=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"vae_train.frames=\[6\].*1 \+ 4\*k"):
        VAETrainer(_cfg(data, tmp_path / "b", frames=[6]))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
    r = subprocess.run([sys.executable, "-m", "sora_dist.vae_train", f"input={data[0]}", f"vae_path={data[1]}",
                        f"run_dir={tmp_path / 'c'}", "frames=[6]", "resolutions=[[16,16]]", "device=cpu"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("config error")]
    assert errors == ["config error: " + errors[0][14:]] and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith("config error: vae_train.frames=[6]") and r.stderr.rstrip().endswith(errors[0])
    assert not os.path.exists(tmp_path / "c" / "checkpoints")


def test_fsdp_with_several_ranks_is_refused_by_name(data, tmp_path):
    from sora_dist.config.vae_train import validate_vae_train

    validate_vae_train(_cfg(data, tmp_path, dp_mode="fsdp"), world_size=1)  # one rank: FSDP is a no-op
    with pytest.raises(ConfigError, match="vae_train.dp_mode=fsdp .*use dp_mode=ddp"):
        validate_vae_train(_cfg(data, tmp_path, dp_mode="fsdp"), world_size=2)


def _dp_run(rank, world, cfg_dict):
    torch.set_num_threads(1)
    cfg = VAETrainConfig(**{**cfg_dict, "optim": OptimConfig(**cfg_dict["optim"]),
                            "logging": LoggingConfig(**cfg_dict["logging"])})
    losses, _ = _train(cfg)
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.distributed
def test_dp2_equals_one_process(data, full_run, tmp_path):
    from dataclasses import asdict

    cfg = asdict(_cfg(data, tmp_path / "dp2", dp_mode="ddp", steps=2, ckpt_every=0))
    got = run_distributed(_dp_run, 2, cfg)
    assert torch.allclose(got, torch.tensor(full_run[0][:2], dtype=torch.float64), rtol=0, atol=1e-5), got


def test_from_scratch_starts_near_deterministic_posterior(data, tmp_path):
    """from_scratch with init_logvar: the posterior's log-variance is that constant for any input
    (the encoder's signal is not drowned by unit noise at step 0); None keeps the random init."""
    clip = load_clip(os.path.join(data[0], "clip_0000.mp4"), parse_buckets(RES, FRAMES), 8.0)[0]
    x = clip.permute(1, 0, 2, 3)[None].float().div(127.5).sub(1.0)
    logvars = {}
    for init in (-6.0, None):
        tr = VAETrainer(_cfg(data, tmp_path / str(init), from_scratch=True, init_logvar=init))
        try:
            with torch.no_grad():
                _, mean, logvars[init] = tr.model(x)
        finally:
            tr.close()
        assert mean.abs().max() > 0  # the mean half keeps its random init
    assert torch.equal(logvars[-6.0], torch.full_like(logvars[-6.0], -6.0))
    assert logvars[None].std() > 1e-3 and logvars[None].abs().mean() < 1.0  # random: ~0, varies

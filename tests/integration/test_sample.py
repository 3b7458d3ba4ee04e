"""clips -> sora-encode -> a few training steps on the shards -> sora-sample mp4s (text,
image-to-video, backward extension). Checks shapes, decodability, reproducibility and that
conditioning frames are kept."""
import json
import os

import pytest
import torch

from sora_dist.config import JobConfig
from sora_dist.config.encode import EncodeConfig
from sora_dist.config.sample import SampleConfig
from sora_dist.config.validate import ConfigError
from sora_dist.data.demo_clips import make_demo_clips, render_clip
from sora_dist.data.video_io import load_clip, parse_buckets, probe, read_frames, write_mp4
from sora_dist.encode import run_encode
from sora_dist.models.text import build_tiny_text_encoder
from sora_dist.models.vae import VideoVAE, build_tiny_vae
from sora_dist.sample import run_sample

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from sora_dist.training.trainer import Trainer

    d = tmp_path_factory.mktemp("e2e")
    man = make_demo_clips(str(d / "clips"), n=6, sizes=[(32, 32), (32, 48)], fps_choices=(8,), frame_choices=(9,))
    run_encode(EncodeConfig(input=man, output=str(d / "shards"), vae_path=build_tiny_vae(str(d / "vae")),
                            text_encoder_path=build_tiny_text_encoder(str(d / "t5")),
                            resolutions=[[32, 32]], frames=[1, 9], target_fps=8.0, samples_per_shard=4,
                            text_max_length=16, progress=False, rank=0, world_size=1))
    cfg = JobConfig()
    cfg.data.source, cfg.data.shards, cfg.data.batch_size = "shards", str(d / "shards"), 2
    cfg.train.run_dir, cfg.train.steps, cfg.train.ckpt_every = str(d / "run"), 2, 2
    cfg.train.ema_decay = 0.9
    cfg.logging.wandb_mode = "disabled"
    tr = Trainer(cfg)
    try:
        tr.train()
    finally:
        tr.close()
    return d


def _cfg(d, out, **kw):
    base = dict(run_dir=str(d / "run"), output_dir=str(out), num_frames=9, height=32, width=32,
                fps=8.0, steps=3, progress=False, prompts=["a red square moving left on a black background",
                                                           "a blue circle moving up on a gray background"])
    base.update(kw)
    return SampleConfig(**base)


def test_text_to_video_mp4s(run_dir, tmp_path):
    res = run_sample(_cfg(run_dir, tmp_path / "a"))
    recs = [json.loads(line) for line in open(tmp_path / "a" / "samples.jsonl")]
    assert [r["prompt"] for r in recs] == _cfg(run_dir, "x").prompts
    for r in recs:
        info = probe(r["path"])
        assert (info.num_frames, info.height, info.width, info.fps) == (9, 32, 32, 8.0)
        assert read_frames(info, 9, 8.0).shape == (9, 3, 32, 32)
    assert res["latents"][0].shape == (4, 3, 4, 4)
    # same config and seed -> same videos; the two prompts of the batch differ
    again = run_sample(_cfg(run_dir, tmp_path / "b"))
    for a, b in zip(again["latents"], res["latents"]):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(res["latents"][0], res["latents"][1])


@pytest.mark.parametrize("position,k", [("first", 1), ("last", 2)])
def test_conditioning_frames_are_kept(run_dir, tmp_path, position, k):
    frames, _ = render_clip(32, 32, 9, seed=3)
    if k == 1:
        from PIL import Image

        cond = str(tmp_path / "first.png")
        Image.fromarray(frames[0].permute(1, 2, 0).numpy()).save(cond)
    else:
        cond = write_mp4(frames, str(tmp_path / "cond.mp4"), 8)
    res = run_sample(_cfg(run_dir, tmp_path / "o", cond_path=cond, cond_position=position, cond_latent_frames=k))
    vae = VideoVAE.load(str(run_dir / "vae"))
    # A condition opening the video is encoded as a clip start (1 + 4(k-1) frames); one closing
    # it as a continuation: 1 + 4k frames encoded, the leading image latent dropped.
    first = position == "first"
    need = 1 + 4 * (k - 1) if first else 1 + 4 * k
    z = vae.encode(load_clip(cond, parse_buckets([[32, 32]], [need]), 8.0)[0])[0]
    z = z if first else z[:, 1:]
    sl = slice(0, k) if position == "first" else slice(3 - k, 3)
    for lat in res["latents"]:
        torch.testing.assert_close(lat[:, sl], z)
    assert res["cond_mask"].tolist() == [i in range(3)[sl] for i in range(3)]


def test_bad_requests_fail_early(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="1 \\+ 4\\*k"):
        run_sample(_cfg(run_dir, tmp_path, num_frames=8))
    with pytest.raises(ConfigError, match="config.yaml"):
        run_sample(_cfg(run_dir, tmp_path, run_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="image"):
        png = str(tmp_path / "i.png")
        from PIL import Image

        Image.new("RGB", (32, 32)).save(png)
        run_sample(_cfg(run_dir, tmp_path, cond_path=png, cond_latent_frames=2))


def test_cli_through_hydra(run_dir, tmp_path):
    """`python -m sora_dist.sample` composes sora_dist/hydra_configs/sample.yaml and writes the mp4 (1 frame)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "sora_dist.sample", f"run_dir={run_dir / 'run'}", f"output_dir={out}",
                        "num_frames=1", "height=32", "width=32", "steps=2", "progress=false",
                        "prompts=[a red square]"], env=dict(os.environ, PYTHONPATH=repo),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    info = probe(str(out / "sample_000.mp4"))
    assert (info.num_frames, info.height, info.width) == (1, 32, 32)
    bad = subprocess.run([sys.executable, "-m", "sora_dist.sample", f"run_dir={tmp_path}"],
                         env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "config error" in bad.stderr and "config.yaml" in bad.stderr


def _capture_text_encoder(monkeypatch):
    """The TextEncoder sora-sample loads (to check which class and padding it chose)."""
    import sora_dist.sample as sample_mod
    from sora_dist.models.text import TextEncoder

    seen, original = [], TextEncoder.load

    def load(*a, **kw):
        seen.append(original(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(sample_mod.TextEncoder, "load", load)
    return seen


def _train(d, text_encoder_path, **encode_kw):
    from sora_dist.training.trainer import Trainer

    man = make_demo_clips(str(d / "clips"), n=4, sizes=[(32, 32)], fps_choices=(8,), frame_choices=(9,))
    run_encode(EncodeConfig(input=man, output=str(d / "shards"), vae_path=build_tiny_vae(str(d / "vae")),
                            text_encoder_path=text_encoder_path, resolutions=[[32, 32]], frames=[1, 9],
                            target_fps=8.0, samples_per_shard=2, progress=False, rank=0, world_size=1, **encode_kw))
    cfg = JobConfig()
    cfg.data.source, cfg.data.shards, cfg.data.batch_size = "shards", str(d / "shards"), 2
    cfg.train.run_dir, cfg.train.steps, cfg.train.ckpt_every = str(d / "run"), 1, 1
    cfg.logging.wandb_mode = "disabled"
    tr = Trainer(cfg)
    try:
        tr.train()
    finally:
        tr.close()


def test_umt5_run_samples_with_the_recorded_encoder_and_wan_padding(tmp_path, monkeypatch):
    """umT5 shards -> training -> sora-sample: the manifest's umT5 folder is loaded as
    UMT5EncoderModel and prompts get the training captions' layout (zero-padded to max_length)."""
    from transformers import UMT5EncoderModel

    _train(tmp_path, build_tiny_text_encoder(str(tmp_path / "umt5"), kind="umt5"), text_max_length=24)
    seen = _capture_text_encoder(monkeypatch)
    res = run_sample(_cfg(tmp_path, tmp_path / "o", num_frames=1, steps=1))
    te = seen[-1]
    assert type(te.model) is UMT5EncoderModel and (te.max_length, te.pad_to_max) == (24, True)
    emb, mask = te.encode(_cfg(tmp_path, "x").prompts)
    assert emb.shape[1] == 24 and mask.sum(1).max() < 24 and len(res["records"]) == 2


def test_explicit_umt5_folder_and_unsupported_ones(run_dir, tmp_path, monkeypatch):
    """text_encoder_path takes a umT5 folder like a T5 one (class from its config.json); the run's
    T5 shards still set the text length and padding. An unsupported model_type: config error."""
    import shutil

    from transformers import UMT5EncoderModel

    umt5 = build_tiny_text_encoder(str(tmp_path / "umt5"), kind="umt5")  # same width (32) as the run's T5
    seen = _capture_text_encoder(monkeypatch)
    run_sample(_cfg(run_dir, tmp_path / "o", text_encoder_path=umt5, num_frames=1, steps=1))
    assert type(seen[-1].model) is UMT5EncoderModel and (seen[-1].max_length, seen[-1].pad_to_max) == (16, False)
    bad = tmp_path / "bert"
    shutil.copytree(umt5, bad)
    (bad / "config.json").write_text(json.dumps(dict(json.loads((bad / "config.json").read_text()), model_type="bert")))
    with pytest.raises(ConfigError, match=r"text_encoder_path: .*bert.*model_type='bert'.*t5, umt5"):
        run_sample(_cfg(run_dir, tmp_path / "o2", text_encoder_path=str(bad)))


def _train_wan(d, run: str, t_range=(0.0, 1.0)):
    """A tiny WanDiT (model.arch=wan) trained the Wan way on the umT5 shards in d/shards."""
    from sora_dist.training.trainer import Trainer

    cfg = JobConfig()
    cfg.model.arch, cfg.model.ffn_dim = "wan", 64
    cfg.diffusion.objective, cfg.diffusion.sampler, cfg.diffusion.shift = "flow", "euler", 3.0
    cfg.diffusion.t_range = list(t_range)
    cfg.data.source, cfg.data.shards, cfg.data.batch_size = "shards", str(d / "shards"), 2
    cfg.train.run_dir, cfg.train.steps, cfg.train.ckpt_every = str(d / run), 1, 1
    cfg.logging.wandb_mode = "disabled"
    tr = Trainer(cfg)
    try:
        tr.train()
    finally:
        tr.close()
    return str(d / run)


def test_wan_run_samples_t2v_ti2v_and_two_experts(tmp_path, monkeypatch):
    """umT5 shards -> tiny Wan runs (one full range; a high- and a low-noise expert) ->
    sora-sample: text-to-video; image-to-video keeps the first latent frame exactly (TI2V: clean,
    t=0 per frame); the two-expert sample calls the low-noise expert below the boundary only."""
    from PIL import Image

    from sora_dist.diffusion.flow import RectifiedFlow

    man = make_demo_clips(str(tmp_path / "clips"), n=4, sizes=[(32, 32)], fps_choices=(8,), frame_choices=(9,))
    run_encode(EncodeConfig(input=man, output=str(tmp_path / "shards"), vae_path=build_tiny_vae(str(tmp_path / "vae")),
                            text_encoder_path=build_tiny_text_encoder(str(tmp_path / "umt5"), kind="umt5"),
                            resolutions=[[32, 32]], frames=[1, 9], target_fps=8.0, samples_per_shard=2,
                            text_max_length=24, progress=False, rank=0, world_size=1))
    _train_wan(tmp_path, "run")
    res = run_sample(_cfg(tmp_path, tmp_path / "t2v", steps=2))
    assert len(res["records"]) == 2 and all(os.path.getsize(r["path"]) > 0 for r in res["records"])

    frames, _ = render_clip(32, 32, 9, seed=3)
    png = str(tmp_path / "first.png")
    Image.fromarray(frames[0].permute(1, 2, 0).numpy()).save(png)
    seen_t = []
    original = RectifiedFlow.sample

    def spy(self, model, *a, **kw):
        fwd = model.forward
        model.forward = lambda x, t, *r, **k: (seen_t.append(t.shape), fwd(x, t, *r, **k))[1]
        try:
            return original(self, model, *a, **kw)
        finally:
            del model.forward

    monkeypatch.setattr(RectifiedFlow, "sample", spy)
    res = run_sample(_cfg(tmp_path, tmp_path / "i2v", steps=2, cond_path=png, shift=5.0))
    z = VideoVAE.load(str(tmp_path / "vae")).encode(load_clip(png, parse_buckets([[32, 32]], [1]), 8.0)[0])[0]
    for lat in res["latents"]:
        torch.testing.assert_close(lat[:, :1], z, rtol=0, atol=0)
    assert seen_t and all(len(s) == 2 and s[1] == 3 for s in seen_t)  # one timestep per latent frame
    monkeypatch.setattr(RectifiedFlow, "sample", original)

    high = _train_wan(tmp_path, "high", (0.875, 1.0))
    low = _train_wan(tmp_path, "low", (0.0, 0.875))
    calls = []
    orig_sample = RectifiedFlow.sample

    def count(self, model, *a, model_2=None, **kw):
        for name, m in (("high", model), ("low", model_2)):
            fwd = m.forward
            m.forward = (lambda f, n: lambda x, t, *r, **k: (calls.append((n, float(t.flatten()[0]))),
                                                           f(x, t, *r, **k))[1])(fwd, name)
        return orig_sample(self, model, *a, model_2=model_2, **kw)

    monkeypatch.setattr(RectifiedFlow, "sample", count)
    res = run_sample(_cfg(tmp_path, tmp_path / "a14b", run_dir=high, low_noise_run_dir=low, steps=6,
                          guidance_scale_2=2.0))
    assert {n for n, _ in calls} == {"high", "low"}
    assert all((t >= 875.0) == (n == "high") for n, t in calls), calls
    assert res["records"][0]["low_noise_run_dir"] == low
    with pytest.raises(ConfigError, match="low_noise_run_dir"):
        run_sample(_cfg(tmp_path, tmp_path / "x", guidance_scale_2=2.0))


# ---- modes: edit, connect, loop, image ---------------------------------------------------------

def _clip(tmp_path, name, seed, frames=9):
    f, _ = render_clip(32, 32, frames, seed=seed)
    return write_mp4(f, str(tmp_path / name), 8)


def test_edit_strength_0_returns_the_source_and_1_is_text_to_video(run_dir, tmp_path):
    src = _clip(tmp_path, "src.mp4", 5)
    z = VideoVAE.load(str(run_dir / "vae")).encode(load_clip(src, parse_buckets([[32, 32]], [9]), 8.0)[0])[0]
    zero = run_sample(_cfg(run_dir, tmp_path / "e0", mode="edit", cond_path=src, strength=0.0))
    for lat in zero["latents"]:
        assert torch.equal(lat, z)
    full = run_sample(_cfg(run_dir, tmp_path / "e1", mode="edit", cond_path=src, strength=1.0))
    t2v = run_sample(_cfg(run_dir, tmp_path / "t2v"))
    for a, b in zip(full["latents"], t2v["latents"]):
        assert torch.equal(a, b)
    half = run_sample(_cfg(run_dir, tmp_path / "e5", mode="edit", cond_path=src, strength=0.5))
    for h, a in zip(half["latents"], t2v["latents"]):
        assert not torch.allclose(h, z) and not torch.allclose(h, a)
    recs = [json.loads(line) for line in open(tmp_path / "e5" / "samples.jsonl")]
    assert all(r["mode"] == "edit" and os.path.exists(r["path"][:-4] + ".png") for r in recs)


def test_connect_keeps_both_clips_where_they_were_placed(run_dir, tmp_path):
    a, b = _clip(tmp_path, "a.mp4", 1), _clip(tmp_path, "b.mp4", 2)
    res = run_sample(_cfg(run_dir, tmp_path / "c", mode="connect", cond_path=a, cond_path_2=b, num_frames=13))
    vae = VideoVAE.load(str(run_dir / "vae"))
    za = vae.encode(load_clip(a, parse_buckets([[32, 32]], [5]), 8.0)[0][:1])[0]       # opens: its first frame
    zb = vae.encode(load_clip(b, parse_buckets([[32, 32]], [5]), 8.0)[0])[0][:, 1:]    # closes: continuation
    assert res["cond_mask"].tolist() == [True, False, False, True]
    for lat in res["latents"]:
        assert torch.equal(lat[:, :1], za) and torch.equal(lat[:, 3:], zb)


def test_loop_ties_the_tail_to_the_head(run_dir, tmp_path, monkeypatch):
    from sora_dist.diffusion import GaussianDiffusion

    full = []
    original = GaussianDiffusion.sample

    def keep(self, *a, **kw):
        full.append(original(self, *a, **kw))
        return full[-1]

    monkeypatch.setattr(GaussianDiffusion, "sample", keep)
    res = run_sample(_cfg(run_dir, tmp_path / "l", mode="loop", loop_latent_frames=1))
    x = full[0]
    assert x.shape[2] == 4 and torch.equal(x[:, :, 3:], x[:, :, :1])   # generated T+1, tail == head
    assert all(lat.shape[1] == 3 for lat in res["latents"])             # the video is the first T


def test_image_generation_at_a_bucket_size(run_dir, tmp_path):
    res = run_sample(_cfg(run_dir, tmp_path / "img", num_frames=1, width=48))
    assert all(lat.shape == (4, 1, 4, 6) for lat in res["latents"])
    r = json.loads(open(tmp_path / "img" / "samples.jsonl").readline())
    assert probe(r["path"]).num_frames == 1 and os.path.exists(r["path"][:-4] + ".png")


@pytest.mark.parametrize("kw, needle", [
    (dict(mode="edit"), "needs cond_path"),
    (dict(mode="edit", cond_path="/nonexistent.mp4"), "does not exist"),
    (dict(mode="edit", cond_path="SRC", strength=1.5), "strength=1.5 must be in [0, 1]"),
    (dict(mode="connect", cond_path="SRC"), "needs cond_path_2"),
    (dict(mode="connect", cond_path="SRC", cond_path_2="SHORT", cond_latent_frames=2), "cond_path_2"),
    (dict(mode="blend"), "mode='blend'"),
])
def test_mode_bad_inputs_are_one_config_error(run_dir, tmp_path, kw, needle):
    src, short = _clip(tmp_path, "src.mp4", 5), _clip(tmp_path, "short.mp4", 6, frames=3)
    kw = {k: {"SRC": src, "SHORT": short}.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(ConfigError) as e:
        run_sample(_cfg(run_dir, tmp_path / "bad", **kw))
    assert needle in str(e.value) and "\n" not in str(e.value)

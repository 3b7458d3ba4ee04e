"""The installed package, not the checkout: build a wheel, install it with --no-deps into a fresh
target folder, and run the console scripts (sora-encode -> sora-train 2 steps -> sora-sample)
from an unrelated working folder with only that target on PYTHONPATH. Catches files missing from
the wheel (package data such as the Hydra YAML) and paths that resolve relative to the repo.

Offline: the build uses --no-build-isolation with the setuptools of this environment (the
`test` extra pins it), and the runtime dependencies are the ones already installed here."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ("sora-train", "sora-encode", "sora-sample", "sora-demo")


def _run(cmd, cwd, env, timeout=300):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"$ {' '.join(map(str, cmd))}\n" + (r.stdout + r.stderr)[-4000:]
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    # Build from a copy so the checkout gets no build/ or egg-info from this test.
    src = root / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, f), src / f)
    shutil.copytree(os.path.join(REPO, "sora_dist"), src / "sora_dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "-w", str(root / "dist"), str(src)], cwd=root, env=env)
    wheels = list((root / "dist").glob("sora_dist-*.whl"))
    assert len(wheels) == 1, wheels
    site = root / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
          str(wheels[0])], cwd=root, env=env)
    work = root / "work"  # unrelated cwd: no repo files, no configs next to it
    work.mkdir()
    run_env = dict(os.environ, PYTHONPATH=str(site), WANDB_MODE="disabled", PYTHONNOUSERSITE="1")
    return site, work, run_env


def _job(site, name, module):
    """The console script when --target installed it (<target>/bin), else `python -m module`."""
    script = site / "bin" / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def test_wheel_contents_and_import_path(installed):
    site, work, env = installed
    assert (site / "sora_dist" / "hydra_configs").is_dir()
    assert list((site / "sora_dist" / "hydra_configs").glob("*.yaml"))
    # sora-demo's trained VAE ships in the wheel (diffusers folder + its README)
    vae = site / "sora_dist" / "assets" / "demo_vae"
    assert {p.name for p in vae.iterdir()} >= {"config.json", "diffusion_pytorch_model.safetensors", "README.md"}
    out = _run([sys.executable, "-c", "import sora_dist, sora_dist.config as c; "
                "print(sora_dist.__file__); print(c.CONFIG_DIR)"], cwd=work, env=env)
    mod_file, config_dir = out.strip().splitlines()[-2:]
    assert mod_file.startswith(str(site)), f"imported {mod_file}, not the installed copy"
    assert config_dir.startswith(str(site)) and os.path.isdir(config_dir), config_dir
    if (site / "bin").is_dir():  # pip --target writes the console scripts here
        assert all((site / "bin" / s).exists() for s in SCRIPTS), os.listdir(site / "bin")


def test_encode_train_sample_from_installed_wheel(installed):
    site, work, env = installed
    _run([sys.executable, "-c",
          "import sys, sora_dist\n"
          "assert sora_dist.__file__.startswith(sys.argv[1]), sora_dist.__file__\n"
          "from sora_dist.data.demo_clips import make_demo_clips\n"
          "from sora_dist.models.vae import build_tiny_vae\n"
          "from sora_dist.models.text import build_tiny_text_encoder\n"
          "make_demo_clips('clips', n=3, sizes=[(32, 32)], fps_choices=(8,), frame_choices=(9,))\n"
          "build_tiny_vae('vae'); build_tiny_text_encoder('t5')\n", str(site)], cwd=work, env=env)

    _run(_job(site, "sora-encode", "sora_dist.encode") + [
        "input=clips/manifest.jsonl", "output=shards", "vae_path=vae", "text_encoder_path=t5",
        "resolutions=[[32,32]]", "frames=[1,9]", "target_fps=8", "samples_per_shard=4",
        "text_max_length=16", "progress=false"], cwd=work, env=env)
    manifest = json.load(open(work / "shards" / "manifest.json"))
    assert manifest["num_samples"] >= 3

    _run(_job(site, "sora-train", "sora_dist.train") + [
        "data.source=shards", "data.shards=shards", "data.batch_size=2", "train.run_dir=run",
        "train.steps=2", "train.ckpt_every=2", "logging.wandb_mode=disabled"], cwd=work, env=env)
    assert (work / "run" / "checkpoints" / "step_00000002").is_dir()

    _run(_job(site, "sora-sample", "sora_dist.sample") + [
        "run_dir=run", "output_dir=samples", "num_frames=9", "height=32", "width=32", "fps=8",
        "steps=2", "batch_size=1", "progress=false", 'prompts=["a red square moving right"]'],
        cwd=work, env=env)
    assert [f for f in os.listdir(work / "samples") if f.endswith(".mp4")]
    # Nothing was written next to the checkout's configs: the jobs ran from the installed copy.
    assert not (work / "sora_dist").exists()

"""sora-export end to end: diffusers weights -> model.init_from -> train 2 steps under tp2 (SP)
with the real Trainer -> export -> diffusers' WanTransformer3DModel.from_pretrained computes what
sora_dist's WanDiT computes from the same checkpoint; a VideoDiT run exports to safetensors that
load back exactly."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sora_dist.config import ConfigError, JobConfig, ModelConfig
from sora_dist.config.export import ExportConfig
from sora_dist.config.model import DiTArgs
from sora_dist.export import run_export
from sora_dist.models import build_model
from sora_dist.models.wan_weights import diffusers_config, from_diffusers_state_dict
from sora_dist.testing import run_distributed
from sora_dist.training import checkpoint as ckpt
from sora_dist.training.optim import EMA

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.integration

ARGS = DiTArgs(arch="wan", hidden_size=48, num_heads=4, depth=2, ffn_dim=72, in_channels=4, text_dim=24)


def wan_job(run_dir, init_from):
    cfg = JobConfig()
    cfg.model.arch = "wan"
    for k in ("hidden_size", "num_heads", "depth", "ffn_dim", "in_channels", "text_dim"):
        setattr(cfg.model, k, getattr(ARGS, k))
    cfg.model.init_from = init_from
    cfg.diffusion.objective, cfg.diffusion.sampler = "flow", "euler"
    cfg.train.run_dir = run_dir
    cfg.train.device = "cpu"
    cfg.train.steps = 2
    cfg.train.ckpt_every = 0
    cfg.train.ema_decay = 0.5
    cfg.optim.lr = 1e-3
    cfg.logging.wandb_mode = "disabled"
    cfg.data.text_len = 5
    cfg.data.synthetic_buckets = [[2, 4, 6]]
    return cfg


def _train_worker(rank, world, run_dir, init_from):
    from sora_dist.training.trainer import Trainer
    cfg = wan_job(run_dir, init_from)
    cfg.parallel.tp, cfg.parallel.sequence_parallel = 2, True
    tr = Trainer(cfg)
    try:
        return tr.train()
    finally:
        tr.close()


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_export")
    cfg = {k: v for k, v in diffusers_config(ARGS).items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ref.save_pretrained(str(root / "init"), max_shard_size="30KB")
    run_dir = str(root / "run")
    losses = run_distributed(_train_worker, 2, run_dir, str(root / "init"))
    assert len(losses) == 2
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    return root, run_dir, init


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, ARGS.in_channels, 3, 6, 4, generator=g), torch.rand(2, generator=g) * 1000
    return x, t, torch.randn(2, 5, ARGS.text_dim, generator=g), torch.ones(2, 5, dtype=torch.bool)


def test_wan_export_loads_in_diffusers_and_matches(wan_run):
    # As a user loads it: diffusers' from_pretrained of Wan needs accelerate (a dependency).
    root, run_dir, init = wan_run
    out = str(root / "export")
    run_export(ExportConfig(run_dir=run_dir, output=out))
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not os.path.exists(out + ".tmp")
    exported, info = diffusers.WanTransformer3DModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    exported.eval()

    ours = build_model(wan_job(run_dir, None).model)
    ckpt.load_model_only(ckpt.latest(os.path.join(run_dir, "checkpoints"))[1], ours)
    ours.eval()
    x, t, text, mask = _inputs()
    with torch.no_grad():
        want = ours(x, t, text, mask)
        got = exported(x, t, text, return_dict=False)[0]
    assert ((got - want).norm() / want.norm()).item() < 1e-5

    # Training happened, from the init_from weights: every tensor moved, by a little.
    sd = exported.state_dict()
    for k, v in init.items():
        moved = (sd[k] - v).norm().item()
        assert moved > 0, k
        assert moved < 0.1 * v.norm().item() + 0.02, (k, moved)  # a random init would be far


def test_wan_export_ema_and_bf16(wan_run):
    root, run_dir, _ = wan_run
    raw = load_file(run_export(ExportConfig(run_dir=run_dir, output=str(root / "raw")))
                    + "/diffusion_pytorch_model.safetensors")
    ema_out = run_export(ExportConfig(run_dir=run_dir, output=str(root / "ema"), ema=True))
    ema = load_file(ema_out + "/diffusion_pytorch_model.safetensors")
    # The EMA export is what the run's EMA state holds (decay 0.5 over 2 steps: not the raw weights).
    model = build_model(wan_job(run_dir, None).model)
    shadow = EMA(model, 0.5)
    ckpt.load(ckpt.latest(os.path.join(run_dir, "checkpoints"))[1], model, None, shadow)
    for name, t in from_diffusers_state_dict(ema).items():
        assert torch.equal(t, shadow.shadow[name]), name
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    bf16 = load_file(run_export(ExportConfig(run_dir=run_dir, output=str(root / "bf16"), dtype="bf16"))
                     + "/diffusion_pytorch_model.safetensors")
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], raw[k].bfloat16()) for k in raw)
    with pytest.raises(ConfigError, match="exists; pick a new folder or set overwrite=true"):
        run_export(ExportConfig(run_dir=run_dir, output=str(root / "raw")))
    with pytest.raises(ConfigError, match=r"step=7: no complete checkpoint .* complete steps: \[2\]"):
        run_export(ExportConfig(run_dir=run_dir, output=str(root / "s7"), step=7))


def test_dit_export_loads_back_exactly(tmp_path):
    from trainer_runs import run_trainer
    cfg = JobConfig()
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.train.device = "cpu"
    cfg.train.steps = 2
    cfg.train.ema_decay = 0.0
    cfg.model.zero_init = False
    cfg.logging.wandb_mode = "disabled"
    cfg.data.synthetic_buckets = [[2, 4, 4]]
    _, tr = run_trainer(cfg)
    trained = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    out = tmp_path / "dit"
    # Through the console entry point (Hydra key=value overrides), as a user runs it.
    r = subprocess.run([sys.executable, "-m", "sora_dist.export", f"run_dir={cfg.train.run_dir}",
                        f"output={out}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    # The module docstring's recipe: plain safetensors + ModelConfig.
    model = build_model(ModelConfig(**json.loads((out / "config.json").read_text())))
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    got = dict(model.named_parameters())
    assert got.keys() == trained.keys()
    for n, t in trained.items():
        assert torch.equal(got[n].detach(), t), n
    with pytest.raises(ConfigError, match="kept no EMA .*export with ema=false"):
        run_export(ExportConfig(run_dir=cfg.train.run_dir, output=str(tmp_path / "e"), ema=True))
    assert not os.path.exists(tmp_path / "e")

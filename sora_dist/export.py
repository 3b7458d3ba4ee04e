"""`sora-export`: a training run's DCP checkpoint (saved under any layout) -> a weights folder.

  sora-export run_dir=runs/wan output=exports/wan-ft                 # newest checkpoint
  sora-export run_dir=runs/wan step=2000 ema=true dtype=bf16 output=exports/wan-ft-ema
  python -m sora_dist.export run_dir=... output=...                  # the same

model.arch=wan writes a diffusers transformer folder, `config.json` + one
`diffusion_pytorch_model.safetensors`, which diffusers loads as it loads Wan's releases (and
model.init_from loads for the next fine-tune):

    from diffusers import WanTransformer3DModel
    transformer = WanTransformer3DModel.from_pretrained("exports/wan-ft")

model.arch=dit (sora_dist's VideoDiT, which diffusers has no class for) writes `model.safetensors`
(sora_dist parameter names) and `config.json` holding the run's ModelConfig fields:

    import json
    from safetensors.torch import load_file
    from sora_dist.config.model import ModelConfig
    from sora_dist.models import build_model
    model = build_model(ModelConfig(**json.load(open("exports/dit/config.json"))))
    model.load_state_dict(load_file("exports/dit/model.safetensors"))

DCP reshards on load, so the checkpoint is read into a plain one-process model on CPU whatever
(tp, cp, pp, dp) it was saved under. The folder is written as `<output>.tmp` and renamed when
complete. Weights are fp32 unless dtype=bf16.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from importlib import metadata

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from sora_dist.config import CONFIG_DIR, load_run_config
from sora_dist.config.export import ExportConfig, validate_export
from sora_dist.config.model import DiTArgs
from sora_dist.config.validate import ConfigError
from sora_dist.console import quiet_third_party
from sora_dist.fsutil import replace_dir
from sora_dist.models import build_model
from sora_dist.models.wan_weights import diffusers_config, to_diffusers_state_dict
from sora_dist.training import checkpoint as ckpt
from sora_dist.training.optim import EMA

log = logging.getLogger("sora_dist.export")

WAN_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name
DIT_WEIGHTS = "model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def register_configs() -> None:
    """The typed schema sora_dist/hydra_configs/export.yaml composes onto (Hydra's ConfigStore)."""
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


register_configs()


def _checkpoint(cfg: ExportConfig) -> tuple[int, str]:
    root = os.path.join(cfg.run_dir, "checkpoints")
    done = ckpt.list_complete(root)
    if not done:
        raise ConfigError(f"no complete checkpoint under {root}; train first")
    if cfg.step is None:
        return done[-1]
    for step, path in done:
        if step == cfg.step:
            return step, path
    raise ConfigError(f"step={cfg.step}: no complete checkpoint of that step under {root}; "
                      f"complete steps: {[s for s, _ in done]}")


def load_run_model(cfg: ExportConfig, job, path: str) -> torch.nn.Module:
    """The run's model on CPU, one process, with the checkpoint's (or its EMA's) weights."""
    if cfg.ema and not job.train.ema_decay > 0:
        raise ConfigError(f"ema=true but run {cfg.run_dir} kept no EMA (train.ema_decay="
                          f"{job.train.ema_decay}); export with ema=false")
    with torch.device("meta"):  # every value comes from the checkpoint: skip the random init
        model = build_model(job.model)
    model.to_empty(device="cpu")
    try:
        if cfg.ema:
            ema = EMA(model, job.train.ema_decay)
            ckpt.load(path, model, None, ema)
            ema.copy_to(model)
        else:
            ckpt.load_model_only(path, model)
    except ckpt.CheckpointError as e:
        raise ConfigError(str(e)) from None
    return model.eval()


def _write_atomic(output: str, files: dict, overwrite: bool) -> None:
    """files: name -> callable(path) writing it. All land in <output>.tmp, renamed at the end."""
    output = os.path.normpath(output)
    tmp = output + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed export
    os.makedirs(tmp)
    for name, write in files.items():
        write(os.path.join(tmp, name))
    replace_dir(tmp, output)  # overwrite was checked before any work


def _json_writer(obj: dict):
    def write(path):
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
    return write


def run_export(cfg: ExportConfig) -> str:
    """Write the export folder; returns its path."""
    validate_export(cfg)
    if os.path.exists(cfg.output) and not cfg.overwrite:
        raise ConfigError(f"output={cfg.output!r} exists; pick a new folder or set overwrite=true")
    job = load_run_config(cfg.run_dir)
    step, path = _checkpoint(cfg)
    model = load_run_model(cfg, job, path)
    dtype = DTYPES[cfg.dtype]
    sd = {n: p.detach().to(dtype).contiguous() for n, p in model.state_dict().items()}
    info = {"format": "pt", "sora_dist_run": os.path.abspath(cfg.run_dir), "step": str(step),
            "ema": str(cfg.ema).lower()}
    if job.model.arch == "wan":
        config = diffusers_config(DiTArgs.from_config(job.model))
        try:
            config["_diffusers_version"] = metadata.version("diffusers")
        except metadata.PackageNotFoundError:
            pass
        weights = to_diffusers_state_dict(sd)
        files = {"config.json": _json_writer(config), WAN_WEIGHTS: lambda p: save_file(weights, p, metadata=info)}
    else:
        config = {**asdict(job.model), "init_from": None}  # the weights are in the folder itself
        files = {"config.json": _json_writer(config), DIT_WEIGHTS: lambda p: save_file(sd, p, metadata=info)}
    _write_atomic(cfg.output, files, cfg.overwrite)
    n = sum(t.numel() for t in sd.values())
    print(f"sora-export: step {step}{' (EMA)' if cfg.ema else ''} of {cfg.run_dir}: {n / 1e6:.2f}M "
          f"{cfg.dtype} params -> {os.path.abspath(cfg.output)} ({'diffusers' if job.model.arch == 'wan' else 'safetensors'})",
          flush=True)
    return cfg.output


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="export")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExportConfig), dcfg))
        quiet_third_party(cfg.verbose)
        run_export(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
    main()

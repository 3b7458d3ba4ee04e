"""`sora-train-vae` / `python -m sora_dist.vae_train`: train or fine-tune a diffusers video VAE
(AutoencoderKLWan) on clips, data parallel, and export a diffusers folder with latents_mean/std
measured on the training clips, which sora-encode's vae_path= reads as is. Thin: compose config
-> VAETrainer (sora_dist/training/vae.py) -> train -> export.

  sora-train-vae input=/data/clips vae_path=/models/wan_vae run_dir=runs/vae steps=2000
  torchrun --nproc_per_node 8 -m sora_dist.vae_train input=... vae_path=... batch_size=16
"""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sora_dist.config import CONFIG_DIR
from sora_dist.config.vae_train import VAETrainConfig
from sora_dist.config.validate import ConfigError
from sora_dist.parallel.device import shutdown_distributed
from sora_dist.training.vae import VAETrainer


def register_configs() -> None:
    """The typed schema sora_dist/hydra_configs/train_vae.yaml composes onto (Hydra's ConfigStore)."""
    ConfigStore.instance().store(name="vae_train_schema", node=VAETrainConfig)


register_configs()


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train_vae")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VAETrainConfig), dcfg))
        trainer = VAETrainer(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    clean = False
    try:
        trainer.train()
        clean = True
    finally:
        trainer.close()
        shutdown_distributed(clean)


if __name__ == "__main__":
    main()

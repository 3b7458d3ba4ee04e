"""`sora-train`: Hydra entry point. Thin: compose config -> Trainer -> train."""
from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from sora_dist.config import ConfigError, register_configs, to_job_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "hydra_configs")

register_configs()


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def main(dcfg: DictConfig) -> None:
    from sora_dist.parallel.state import shutdown_distributed
    from sora_dist.train.trainer import Trainer

    try:
        cfg = to_job_config(dcfg)
        trainer = Trainer(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    try:
        trainer.train()
    finally:
        trainer.close()
        shutdown_distributed()


if __name__ == "__main__":
    main()

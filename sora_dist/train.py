"""`sora-train` / `python -m sora_dist.train`: the training job's Hydra entry point. Thin:
compose config -> Trainer (sora_dist/training/) -> train."""
from __future__ import annotations

import logging

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from sora_dist.config import CONFIG_DIR, ConfigError, JobConfig, to_job_config
from sora_dist.parallel.device import is_comm_failure, shutdown_distributed
from sora_dist.training.trainer import Trainer


def register_configs() -> None:
    """The typed schema sora_dist/hydra_configs/train.yaml composes onto (Hydra's ConfigStore)."""
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


register_configs()


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_job_config(dcfg)
        trainer = Trainer(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    clean = False
    try:
        trainer.train()
        clean = True
    except SystemExit as e:  # preemption: every rank checkpointed and stops together
        clean = True
        raise e
    except RuntimeError as e:
        if trainer.world > 1 and is_comm_failure(e):
            logging.getLogger("sora_dist").error(
                "rank %d: a collective failed at step %d: another rank died, hung past "
                "parallel.timeout_s=%ds, or lost its network (see that rank's log). Stopping; rerun "
                "the same command to resume from the newest complete checkpoint in %s/checkpoints. "
                "Cause: %s", trainer.rank, trainer.step, trainer.cfg.parallel.timeout_s,
                trainer.run_dir, str(e).splitlines()[0][:300])
            raise SystemExit(1) from None
        raise
    finally:
        trainer.close()
        shutdown_distributed(clean)


if __name__ == "__main__":
    main()

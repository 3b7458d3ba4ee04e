"""One config tree (DESIGN.md): typed dataclasses, registered in Hydra's ConfigStore by the entry
points (sora_dist/{train,encode,sample}.py).

YAML under sora_dist/hydra_configs/ only composes and overrides; `validate()` runs before any process
group or tensor exists so bad input fails fast with a message that names the field and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

from omegaconf import OmegaConf

from sora_dist.config.data import DataConfig
from sora_dist.config.diffusion import DiffusionConfig
from sora_dist.config.model import FLAVORS, ModelConfig
from sora_dist.config.optim import OptimConfig
from sora_dist.config.parallel import ParallelConfig
from sora_dist.config.train import LoggingConfig, TrainConfig
from sora_dist.config.validate import ConfigError, validate

# The Hydra config folder every entry point (train, encode, sample) composes from: package data
# of sora_dist, so a wheel install has it too.
CONFIG_DIR = str(resources.files("sora_dist") / "hydra_configs")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def to_job_config(cfg) -> JobConfig:
    """OmegaConf DictConfig (from Hydra) -> typed JobConfig object."""
    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
    return OmegaConf.to_object(merged)


def load_run_config(run_dir: str) -> JobConfig:
    """The JobConfig a sora-train run saved (run_dir/config.yaml): what sample/export build from."""
    import os

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"run_dir={run_dir!r} has no config.yaml; point it at a sora-train run folder")
    return to_job_config(OmegaConf.load(path))


__all__ = [
    "CONFIG_DIR", "ConfigError", "DataConfig", "DiffusionConfig", "FLAVORS", "JobConfig", "LoggingConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "TrainConfig",
    "load_run_config", "to_job_config", "validate",
]

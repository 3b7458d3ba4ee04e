"""Config of `sora-export`: a run's DCP checkpoint -> a diffusers (arch=wan) or safetensors
(arch=dit) folder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sora_dist.config.validate import ConfigError, either

EXPORT_DTYPES = ("fp32", "bf16")


@dataclass
class ExportConfig:
    # Training run folder (holds config.yaml and checkpoints/).
    run_dir: str = "???"
    # Step to export; None = the newest complete checkpoint under run_dir/checkpoints.
    step: Optional[int] = None
    # Export the EMA weights (the run needs train.ema_decay > 0) instead of the raw weights.
    ema: bool = False
    # Folder to write (written as <output>.tmp then renamed; must not exist unless overwrite).
    output: str = "???"
    # Replace an existing output folder.
    overwrite: bool = False
    # Dtype of the saved weights: "fp32" or "bf16".
    dtype: str = "fp32"
    # Also print other libraries' import-time warnings (sora_dist/console.py).
    verbose: bool = False


def validate_export(cfg: ExportConfig) -> None:
    if not cfg.run_dir or cfg.run_dir == "???":
        raise ConfigError("run_dir is required: the training run folder (sora-export run_dir=runs/x output=...)")
    if not cfg.output or cfg.output == "???":
        raise ConfigError("output is required: the folder to write (sora-export run_dir=... output=exports/x)")
    if cfg.dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r}: use {either(EXPORT_DTYPES, True)}")
    if cfg.step is not None and cfg.step < 0:
        raise ConfigError(f"step={cfg.step} must be >= 0 (or unset: the newest checkpoint)")

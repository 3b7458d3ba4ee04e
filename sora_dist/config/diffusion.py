"""Diffusion objective and sampler settings."""
from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("ddpm", "flow")
BETA_SCHEDULES = ("linear", "cosine")
# The samplers each objective has.
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler",)}


@dataclass
class DiffusionConfig:
    # "ddpm" (epsilon-prediction, Ho et al. 2020) or "flow" (rectified flow, velocity-prediction).
    objective: str = "ddpm"
    # DDPM: number of training timesteps.
    num_timesteps: int = 1000
    # DDPM: "linear" (1e-4..0.02, Ho et al.) or "cosine" (Nichol & Dhariwal).
    beta_schedule: str = "linear"
    # Flow: logit-normal t ~ sigmoid(N(mean, std)) (SD3).
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Probability of replacing the caption with the learned null caption (enables CFG).
    caption_dropout: float = 0.1
    # Sampler: "ddpm", "ddim" (for objective=ddpm) or "euler" (for objective=flow).
    sampler: str = "ddpm"
    # Number of sampling steps (ddpm uses num_timesteps when <= 0).
    sample_steps: int = 50
    # Classifier-free guidance scale (1 = off).
    guidance_scale: float = 4.0
    # DDIM eta (0 = deterministic).
    ddim_eta: float = 0.0

"""Diffusion objective and sampler settings."""
from __future__ import annotations

from dataclasses import dataclass, field

OBJECTIVES = ("ddpm", "flow")
BETA_SCHEDULES = ("linear", "cosine")
# The samplers each objective has.
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler",)}
# The Euler sampler's sigma grids (diffusion/flow.py, RectifiedFlow.sigmas).
FLOW_GRIDS = ("uniform", "diffusers")


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
    # Flow: timestep shift t' = s*t / (1 + (s-1)*t), in training (the drawn t) and in the Euler
    # sampler's sigma grid; 1 = off. Wan2.1/2.2 use 5.0 at 720p and 3.0 at 480p (more steps at
    # high noise, where large frames still carry low-frequency structure).
    shift: float = 1.0
    # Flow: the training t (after shift) is drawn from its distribution truncated to [lo, hi].
    # Wan2.2-A14B's experts: high-noise [0.875, 1], low-noise [0, 0.875] (T2V boundary_ratio).
    t_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # Flow: Euler sigma grid. "uniform": linspace(1, 0, steps+1), shifted; "diffusers": the grid
    # of diffusers' FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps), for parity
    # with diffusers' Wan/SD3 pipelines.
    flow_grid: str = "uniform"
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

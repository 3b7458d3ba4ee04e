"""Diffusion objectives and samplers: DDPM (eps-prediction; DDPM/DDIM samplers) and
rectified flow (velocity; Euler sampler), both with classifier-free guidance."""
from sora_dist.diffusion.base import guided
from sora_dist.diffusion.ddpm import GaussianDiffusion, make_betas
from sora_dist.diffusion.flow import RectifiedFlow


def build_diffusion(cfg):
    """cfg: DiffusionConfig. Returns an Objective: training_inputs(...), loss(...) and sample(...)."""
    if cfg.objective == "ddpm":
        return GaussianDiffusion(cfg.num_timesteps, cfg.beta_schedule, cfg.caption_dropout)
    if cfg.objective == "flow":
        return RectifiedFlow.from_config(cfg)
    raise ValueError(f"diffusion.objective={cfg.objective!r}: use 'ddpm' or 'flow'")


__all__ = ["GaussianDiffusion", "RectifiedFlow", "build_diffusion", "guided", "make_betas"]

"""Rectified flow (Liu et al. 2022; SD3's logit-normal t): x_t = (1 - t) x0 + t eps,
the model predicts the velocity eps - x0, sampling integrates dx/dt with Euler from t=1 to 0."""
from __future__ import annotations

from typing import Optional

import torch

from sora_dist.config.diffusion import SAMPLERS
from sora_dist.diffusion.base import Objective, check_cond, guided, progress_iter


class RectifiedFlow(Objective):
    # The DiT's timestep embedder was tuned for DDPM's [0, 1000) range; feed t in the same scale.
    time_scale = 1000.0

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, caption_dropout: float = 0.0):
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.caption_dropout = caption_dropout

    def sample_t(self, B: int, generator: torch.Generator) -> torch.Tensor:
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(B, generator=generator))

    def corrupt(self, x0, t, noise):
        tt = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - tt) * x0 + tt * noise, noise - x0

    def model_time(self, t):
        return t * self.time_scale

    @torch.no_grad()
    def sample(self, model, noise, text, text_mask, steps: int = 50, sampler: str = "euler",
               guidance_scale: float = 1.0, generator: Optional[torch.Generator] = None,
               cond_latent=None, cond_frames_mask_T=None, eta: float = 0.0, progress: bool = False):
        check_cond(noise, cond_latent, cond_frames_mask_T)
        if sampler not in SAMPLERS["flow"]:
            raise ValueError(f"sampler {sampler!r} does not fit rectified flow; use one of {SAMPLERS['flow']}")
        v_fn = guided(model, guidance_scale)
        ts = torch.linspace(1.0, 0.0, max(steps, 1) + 1)
        x = noise
        for i in progress_iter(range(len(ts) - 1), progress, "euler"):
            t_now, t_next = float(ts[i]), float(ts[i + 1])
            x = self.fix_frames(x, cond_latent, cond_frames_mask_T,
                                lambda c: (1 - t_now) * c + t_now * noise)
            t = torch.full((x.shape[0],), t_now * self.time_scale, device=x.device)
            x = x + (t_next - t_now) * v_fn(x, t, text, text_mask).to(x.dtype)
        return self.fix_frames(x, cond_latent, cond_frames_mask_T)

"""DDPM (Ho et al. 2020): epsilon-prediction training (Alg. 1), ancestral sampling (Alg. 2),
and DDIM (Song et al. 2021) over a respaced subsequence of timesteps."""
from __future__ import annotations

import math
from typing import Optional

import torch

from sora_dist.config.diffusion import SAMPLERS
from sora_dist.diffusion.base import Objective, check_cond, guided, progress_iter, randn_like_cpu


def make_betas(schedule: str, T: int) -> torch.Tensor:
    if schedule == "linear":
        # Ho et al.'s 1e-4..0.02 for T=1000, scaled so other T keep the same total noise.
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if schedule == "cosine":
        # Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999 near t=T.
        s = 0.008
        f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}; use 'linear' or 'cosine'")


def posterior_coefs(ab, ab_prev):
    """q(x_prev | x_t, x0) for one chain step from abar_t = ab to abar_prev (Ho et al. eq. 7):
    mean = c0 * x0 + ct * x_t, variance var. On a respaced chain the step's beta is
    1 - ab / ab_prev. Works on floats and on tensors (whole tables)."""
    beta = 1 - ab / ab_prev
    c0 = beta * ab_prev ** 0.5 / (1 - ab)
    ct = (1 - ab_prev) * (1 - beta) ** 0.5 / (1 - ab)
    return c0, ct, beta * (1 - ab_prev) / (1 - ab)


def x0_from_eps(x_t, eps, ab):
    """Invert q(x_t | x0): x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (x_t - (1 - ab) ** 0.5 * eps) / ab ** 0.5


def _gather(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] broadcast to x's rank, in x's dtype/device."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return a.to(x.device, dt)[t].view(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion(Objective):
    def __init__(self, num_timesteps: int = 1000, beta_schedule: str = "linear", caption_dropout: float = 0.0):
        self.T = num_timesteps
        self.caption_dropout = caption_dropout
        self.betas = make_betas(beta_schedule, num_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_mean_coef1, self.posterior_mean_coef2, self.posterior_variance = posterior_coefs(
            self.alphas_cumprod, self.alphas_cumprod_prev)

    # ---- forward process -------------------------------------------------------------------
    def sample_t(self, B: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.T, (B,), generator=generator)

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I)."""
        ab = _gather(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def corrupt(self, x0, t, noise):
        return self.q_sample(x0, t, noise), noise  # epsilon-prediction target

    def q_posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)."""
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _gather(self.posterior_variance, t, x_t)

    def predict_x0(self, x_t, t, eps):
        return x0_from_eps(x_t, eps, _gather(self.alphas_cumprod, t, x_t))

    # ---- samplers --------------------------------------------------------------------------
    def timesteps(self, steps: int) -> list[int]:
        """Evenly spaced subsequence of [0, T) (all of them when steps <= 0 or >= T), descending."""
        if steps <= 0 or steps >= self.T:
            return list(range(self.T - 1, -1, -1))
        return sorted({int(round(x)) for x in torch.linspace(0, self.T - 1, steps).tolist()}, reverse=True)

    @torch.no_grad()
    def sample(self, model, noise, text, text_mask, steps: int = 50, sampler: str = "ddpm",
               guidance_scale: float = 1.0, generator: Optional[torch.Generator] = None,
               cond_latent=None, cond_frames_mask_T=None, eta: float = 0.0, progress: bool = False,
               init_latent=None, strength: float = 1.0, constrain=None):
        """DDPM ancestral (Alg. 2 on the respaced chain, posterior variance) or DDIM(eta).
        init_latent + strength (SDEdit): start from init_latent noised to the first timestep at
        or below strength*T and run the rest of the chain (strength 0 returns init_latent, 1 is
        plain sampling). constrain(x): applied before every model call and to the result
        (sora-sample's loop mode)."""
        check_cond(noise, cond_latent, cond_frames_mask_T)
        if sampler not in SAMPLERS["ddpm"]:
            raise ValueError(f"sampler {sampler!r} does not fit DDPM; use one of {SAMPLERS['ddpm']}")
        generator = generator or torch.Generator().manual_seed(0)
        eps_fn = guided(model, guidance_scale)
        fixed_noise = randn_like_cpu(noise, generator)  # noise for the conditioning frames
        ts = self.timesteps(steps)
        ab_all = self.alphas_cumprod
        x = noise
        if init_latent is not None and strength < 1.0:
            ts = [t for t in ts if t < strength * self.T]
            if not ts:
                return init_latent.clone()
            x = self.q_sample(init_latent, torch.full((x.shape[0],), ts[0], dtype=torch.long), noise)
        constrain = constrain or (lambda v: v)
        for i, t_int in enumerate(progress_iter(ts, progress, sampler)):
            t = torch.full((x.shape[0],), t_int, dtype=torch.long, device=x.device)
            x = constrain(self.fix_frames(x, cond_latent, cond_frames_mask_T,
                                          lambda c: self.q_sample(c, t, fixed_noise)))
            eps = eps_fn(x, t, text, text_mask).to(x.dtype)
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            ab = float(ab_all[t_int])
            ab_prev = float(ab_all[prev]) if prev >= 0 else 1.0
            x0 = x0_from_eps(x, eps, ab)
            if sampler == "ddpm":
                # Alg. 2 on the (respaced) chain: sample the posterior q(x_prev | x_t, x0_hat).
                c0, ct, var = posterior_coefs(ab, ab_prev)
                mean, sigma = c0 * x0 + ct * x, math.sqrt(var)
            else:
                sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
                mean = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
            x = mean + sigma * randn_like_cpu(x, generator) if (prev >= 0 and sigma > 0) else mean
        return constrain(self.fix_frames(x, cond_latent, cond_frames_mask_T))

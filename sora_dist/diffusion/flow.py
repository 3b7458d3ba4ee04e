"""Rectified flow (Liu et al. 2022; SD3's logit-normal t): x_t = (1 - t) x0 + t eps,
the model predicts the velocity eps - x0, sampling integrates dx/dt with Euler from t=1 to 0.

Wan's conventions (Wan2.1/2.2, as diffusers' WanPipeline runs them):
- timestep shift t' = s t / (1 + (s-1) t) on the training t and on the sampler's sigma grid;
- the model is fed t * 1000 (num_train_timesteps), which is diffusers' `scheduler.timesteps`;
- Wan2.2-A14B's two experts: a high-noise model for t >= boundary and a low-noise one below,
  each trained only on its own t range (`t_range`) and sampled with its own guidance scale."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from sora_dist.config.diffusion import FLOW_GRIDS, SAMPLERS
from sora_dist.diffusion.base import Objective, check_cond, guided, progress_iter


def shift_sigma(t, shift: float):
    """Timestep shift (SD3 eq. 23, Wan's `shift`): t' = s t / (1 + (s-1) t). Monotone on [0, 1]
    with fixed ends; s > 1 moves mass towards t=1 (noise). The same expression as diffusers'
    FlowMatchEulerDiscreteScheduler, so float32 tensors round the same way."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def unshift_sigma(t, shift: float):
    """The inverse of `shift_sigma`: t = t' / (s - (s-1) t')."""
    if shift == 1.0:
        return t
    return t / (shift - (shift - 1) * t)


class RectifiedFlow(Objective):
    """Training: t = shift(sigmoid(N(logit_mean, logit_std))), truncated to t_range.
    Sampling: `sample` (Euler on `sigmas(steps)`, optionally two experts split at a boundary)."""

    # The DiT's timestep embedder was tuned for DDPM's [0, 1000) range; feed t in the same scale.
    # It is also Wan's num_train_timesteps: the transformer sees sigma * 1000.
    time_scale = 1000.0

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, caption_dropout: float = 0.0,
                 shift: float = 1.0, t_range: Sequence[float] = (0.0, 1.0), grid: str = "uniform"):
        if grid not in FLOW_GRIDS:
            raise ValueError(f"flow grid {grid!r}: use one of {FLOW_GRIDS}")
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.caption_dropout = caption_dropout
        self.shift, self.t_range, self.grid = float(shift), (float(t_range[0]), float(t_range[1])), grid

    @classmethod
    def from_config(cls, cfg) -> "RectifiedFlow":
        """cfg: DiffusionConfig with objective=flow."""
        return cls(cfg.logit_mean, cfg.logit_std, cfg.caption_dropout, shift=cfg.shift,
                   t_range=cfg.t_range, grid=cfg.flow_grid)

    # ---- training ------------------------------------------------------------------------------
    def sample_t(self, B: int, generator: torch.Generator) -> torch.Tensor:
        """One standard normal z per sample from the generator (so the generator advances the
        same with or without shift/t_range, and resume is exact), then t = shift(sigmoid(m + s z)).

        With a t_range [lo, hi] the draw is the exact truncation of that distribution, by inverse
        CDF and without rejection: u = Phi(z) is uniform, is mapped linearly into [F(lo), F(hi)],
        and t = F^-1(u), where F(t) = Phi((logit(unshift(t)) - m) / s). Unlike rescaling the full
        draw (t = lo + (hi - lo) t), each expert then sees the noise levels of its range with the
        density the single-model run would have given them, i.e. the mixture of the two experts'
        training distributions is the full one."""
        z = torch.randn(B, generator=generator)
        lo, hi = self.t_range
        if (lo, hi) == (0.0, 1.0):
            return shift_sigma(torch.sigmoid(self.logit_mean + self.logit_std * z), self.shift)
        # float64: the CDF ends are far in the normal's tails for t near 0 or 1.
        def cdf(t: float) -> torch.Tensor:
            logit = torch.logit(unshift_sigma(torch.tensor(t, dtype=torch.float64), self.shift))
            return torch.special.ndtr((logit - self.logit_mean) / self.logit_std)
        u = cdf(lo) + (cdf(hi) - cdf(lo)) * torch.special.ndtr(z.double())
        t = shift_sigma(torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(u)), self.shift)
        # The clamp only catches rounding at the range's ends, onto the float32 values inside it.
        lo32, hi32 = torch.tensor(lo), torch.tensor(hi)
        lo32 = torch.nextafter(lo32, torch.tensor(1.0)) if float(lo32) < lo else lo32
        hi32 = torch.nextafter(hi32, torch.tensor(0.0)) if float(hi32) > hi else hi32
        return t.float().clamp(lo32, hi32)

    def corrupt(self, x0, t, noise):
        tt = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - tt) * x0 + tt * noise, noise - x0

    def model_time(self, t):
        return t * self.time_scale

    # ---- sampling ------------------------------------------------------------------------------
    def sigmas(self, steps: int) -> torch.Tensor:
        """The Euler grid, float32, descending from 1, steps + 1 values ending in 0.

        "uniform" (default, what sora_dist always did): shift(linspace(1, 0, steps + 1)).
        "diffusers": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s)
        .set_timesteps(steps).sigmas, dynamic shifting and shift_terminal off. diffusers builds it
        from its shifted training grid: linspace(sigma_max, sigma_min, steps) with sigma_min =
        shift(1/1000), shifted again, then a final 0; so its last nonzero sigma is shift(shift(1e-3))
        rather than 0, and a shift=1 run still differs from "uniform"."""
        n = max(steps, 1)
        if self.grid == "uniform":
            return shift_sigma(torch.linspace(1.0, 0.0, n + 1), self.shift)
        N = self.time_scale
        # The ends of diffusers' training grid, computed as it does (float32 timesteps / N).
        sigma_max, sigma_min = shift_sigma(torch.tensor([N, 1.0]) / N, self.shift).tolist()
        s = torch.linspace(sigma_max * N, sigma_min * N, n, dtype=torch.float64) / N
        return torch.cat([shift_sigma(s, self.shift).float(), torch.zeros(1)])

    @torch.no_grad()
    def sample(self, model, noise, text, text_mask, steps: int = 50, sampler: str = "euler",
               guidance_scale: float = 1.0, generator: Optional[torch.Generator] = None,
               cond_latent=None, cond_frames_mask_T=None, eta: float = 0.0, progress: bool = False,
               model_2=None, boundary_ratio: Optional[float] = None,
               guidance_scale_2: Optional[float] = None, clean_cond_frames: bool = False,
               init_latent=None, strength: float = 1.0, constrain=None):
        """Euler over `sigmas(steps)`: x <- x + (sigma_next - sigma) v(x, sigma * 1000), which is
        diffusers' FlowMatchEulerDiscreteScheduler.step fed its `timesteps`.

        Two experts (Wan2.2-A14B; diffusers' WanPipeline with transformer_2 and boundary_ratio):
        pass the low-noise model as `model_2` and `boundary_ratio` (0.875 for T2V). A step whose
        fed timestep t = sigma * 1000 has t >= boundary_ratio * 1000 runs `model` (high noise)
        with `guidance_scale`; the others run `model_2` with `guidance_scale_2` (default: the
        same as guidance_scale). Comparison in float32, as WanPipeline compares its timesteps.

        Conditioning frames (cond_latent where cond_frames_mask_T): by default they are reset
        every step to the condition noised to the current sigma, under one timestep per sample.
        clean_cond_frames=True is Wan2.2 TI2V's convention (diffusers' WanImageToVideoPipeline
        with expand_timesteps): they stay clean and the model gets one timestep per latent frame,
        0 on the conditioning frames (the model must take (B, T) timesteps: WanDiT).

        init_latent + strength (SDEdit video editing): start at the grid's first sigma at or
        below `strength` from (1 - sigma) init_latent + sigma noise, then integrate the rest
        (strength 0 returns init_latent exactly, 1 is plain sampling). constrain(x) is applied
        before every model call and to the result (sora-sample's loop mode)."""
        check_cond(noise, cond_latent, cond_frames_mask_T)
        if sampler not in SAMPLERS["flow"]:
            raise ValueError(f"sampler {sampler!r} does not fit rectified flow; use one of {SAMPLERS['flow']}")
        if (model_2 is None) != (boundary_ratio is None):
            raise ValueError("two-expert sampling needs both model_2 (low noise) and boundary_ratio")
        if guidance_scale_2 is not None and model_2 is None:
            raise ValueError("guidance_scale_2 is the low-noise expert's; pass model_2 and boundary_ratio")
        v_high = guided(model, guidance_scale)
        v_low = v_high if model_2 is None else guided(
            model_2, guidance_scale if guidance_scale_2 is None else guidance_scale_2)
        sigmas = self.sigmas(steps)
        x = noise
        if init_latent is not None and strength < 1.0:
            sigmas = sigmas[sigmas <= strength]  # ends with 0
            if len(sigmas) < 2:
                return init_latent.clone()
            x = (1 - float(sigmas[0])) * init_latent + float(sigmas[0]) * noise
        timesteps = sigmas[:-1] * self.time_scale  # float32, diffusers' scheduler.timesteps
        constrain = constrain or (lambda v: v)
        for i in progress_iter(range(len(timesteps)), progress, "euler"):
            t_now, t_next = float(sigmas[i]), float(sigmas[i + 1])
            if clean_cond_frames and cond_latent is not None:
                x = self.fix_frames(x, cond_latent, cond_frames_mask_T)
                t = torch.full(x.shape[:1] + x.shape[2:3], float(timesteps[i]), device=x.device)
                t[:, cond_frames_mask_T.to(x.device).bool()] = 0.0
            else:
                x = self.fix_frames(x, cond_latent, cond_frames_mask_T,
                                    lambda c: (1 - t_now) * c + t_now * noise)
                t = torch.full((x.shape[0],), float(timesteps[i]), device=x.device)
            x = constrain(x)
            high = model_2 is None or bool(timesteps[i] >= boundary_ratio * self.time_scale)
            v = (v_high if high else v_low)(x, t, text, text_mask)
            x = x + (t_next - t_now) * v.to(x.dtype)
        return constrain(self.fix_frames(x, cond_latent, cond_frames_mask_T))

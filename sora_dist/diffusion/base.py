"""What DDPM and rectified flow share: the training-loss skeleton, CFG, conditioning frames."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm


def randn_like_cpu(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise drawn on CPU from a seeded generator, then moved: the same numbers on any device,
    so CPU tests and GPU runs (and every rank of a DP group) agree."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


def guided(model, guidance_scale: float) -> Callable:
    """Classifier-free guidance (Ho & Salimans): eps = u + s * (c - u), one batched call."""

    if hasattr(model, "guide"):  # a denoiser that guides itself (CFG-parallel: parallel/inference.py)
        return model.guide(guidance_scale)

    def fn(x, t, text, text_mask):
        if guidance_scale == 1.0:
            return model(x, t, text, text_mask)
        B = x.shape[0]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, text]),
                    torch.cat([text_mask, text_mask]), drop)
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return fn


class Objective:
    """Subclasses define `sample_t`, `corrupt` (x_t and the regression target) and samplers."""

    caption_dropout: float = 0.0

    def training_inputs(self, x0: torch.Tensor, generator: torch.Generator):
        """Draw (t, noise, caption drop) from the generator and corrupt x0.
        Returns (x_t, model_time, drop_text, target): what the model sees and must predict."""
        B = x0.shape[0]
        t = self.sample_t(B, generator).to(x0.device)
        noise = randn_like_cpu(x0, generator)
        drop = (torch.rand(B, generator=generator) < self.caption_dropout).to(x0.device)
        x_t, target = self.corrupt(x0, t, noise)
        return x_t, self.model_time(t), drop, target

    def packed_training_inputs(self, latents: list, generator: torch.Generator):
        """training_inputs for a pack (models/packing.py): K latents of any sizes, each with its
        own t, noise and caption drop, drawn from the generator in this order: t (K), then each
        sample's noise, then the drops. Returns (x_t list, model_time (K,), drop (K,), targets)."""
        K = len(latents)
        t = self.sample_t(K, generator).to(latents[0].device)
        noises = [randn_like_cpu(x, generator) for x in latents]
        drop = (torch.rand(K, generator=generator) < self.caption_dropout).to(latents[0].device)
        xs, targets = [], []
        for i, (x0, n) in enumerate(zip(latents, noises)):
            x_t, y = self.corrupt(x0[None], t[i:i + 1], n[None])
            xs.append(x_t[0])
            targets.append(y[0])
        return xs, self.model_time(t), drop, targets

    def training_loss(
        self, model, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Mean-squared error between the model output and the objective's target."""
        x_t, t, drop, target = self.training_inputs(x0, generator)
        return self.loss(model(x_t, t, text, text_mask, drop), target)

    @staticmethod
    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of a model output: fp32 mean-squared error to the target. The one
        definition: the trainer and the pipeline's last stage (parallel/pipeline.py) use it."""
        return F.mse_loss(out.float(), target.float())

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def fix_frames(x, cond_latent, frames_mask_T, value_fn=None):
        """Overwrite the conditioned latent frames (image-to-video, video extension)."""
        if cond_latent is None:
            return x
        m = frames_mask_T.to(x.device).bool()
        x = x.clone()
        x[:, :, m] = (value_fn(cond_latent) if value_fn else cond_latent)[:, :, m].to(x.dtype)
        return x


def progress_iter(seq, enabled: bool, desc: str):
    if not enabled:
        return seq

    return tqdm(seq, desc=desc, leave=False)


def check_cond(noise, cond_latent: Optional[torch.Tensor], frames_mask_T: Optional[torch.Tensor]):
    if cond_latent is None:
        return
    if frames_mask_T is None or frames_mask_T.ndim != 1 or frames_mask_T.shape[0] != noise.shape[2]:
        raise ValueError(f"cond_frames_mask_T must be a bool vector of length T={noise.shape[2]}")
    if cond_latent.shape != noise.shape:
        raise ValueError(f"cond_latent shape {tuple(cond_latent.shape)} != sample shape {tuple(noise.shape)}")

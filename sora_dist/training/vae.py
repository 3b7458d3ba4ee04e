"""VAE training loop (`sora-train-vae`): clips -> encode -> posterior sample -> decode -> L1 + MSE +
KL -> step, data parallel over the same mesh, checkpoint and logging code as the DiT trainer.

Determinism: the clip order is a permutation per (seed, epoch) cut into global batches; DP rank r
takes clips r, r + dp, ... of each batch, and each clip's posterior noise is a function of
(seed, step, its index in the global batch). So the losses depend on neither the DP size (up to
float summation order) nor on where a run was interrupted: the step number is the whole data
position, and a checkpoint holds it with the weights and optimizer state.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import OmegaConf

from sora_dist.config.validate import ConfigError
from sora_dist.config.parallel import ParallelConfig
from sora_dist.config.vae_train import VAETrainConfig, validate_vae_train
from sora_dist.console import quiet_third_party, setup_console
from sora_dist.data.inputs import list_inputs
from sora_dist.data.video_io import BadInput, choose_bucket, load_clip, parse_buckets, probe
from sora_dist.fsutil import atomic_write_text, replace_dir
from sora_dist.parallel.device import autocast, init_distributed, memory_stats, read_launch_env
from sora_dist.parallel.dims import ParallelDims
from sora_dist.parallel.fsdp import allreduce_grads, fsdp_mesh, mp_policy
from sora_dist.parallel.grad import clip_grad_norm_
from sora_dist.training import checkpoint as ckpt
from sora_dist.training.metrics import MetricLogger
from sora_dist.training.optim import build_optimizer, set_lr

log = logging.getLogger("sora_dist")


def _mix(*xs: int) -> int:
    h = 0
    for x in xs:
        h = (h * 1_000_003 + int(x)) % (2**61 - 1)
    return h


class Reconstruct(nn.Module):
    """AutoencoderKLWan as one trainable forward (FSDP's root hooks need one): chunked causal
    encode (diffusers' own `_encode`, Wan 2.2 patchify included) -> posterior sample -> chunked
    decode without diffusers' final clamp (a clamped output has no gradient back into range)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x_BCTHW: torch.Tensor, gen: Optional[torch.Generator] = None):
        m = self.vae
        h = m._encode(x_BCTHW)
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution bounds
        z = mean
        if gen is not None:  # noise from a CPU generator: identical draws on every device
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(mean)
        m.clear_cache()
        x = m.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            m._conv_idx = [0]
            outs.append(m.decoder(x[:, :, i:i + 1], feat_cache=m._feat_map, feat_idx=m._conv_idx,
                                  first_chunk=(i == 0)))
        m.clear_cache()
        out = torch.cat(outs, dim=2)
        if m.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=m.config.patch_size)
        return out, mean, logvar


@torch.no_grad()
def init_posterior_logvar(vae: nn.Module, logvar: float) -> None:
    """The logvar half of quant_conv's output starts at a constant (zero weights, bias = logvar)."""
    conv, C = vae.quant_conv, int(vae.config.z_dim)
    conv.weight[C:].zero_()
    conv.bias[C:].fill_(logvar)


def apply_vae_fsdp(model: Reconstruct, mesh, policy) -> None:
    """One FSDP2 unit per top-level encoder/decoder block (down/up blocks, mid blocks) + the root."""
    from torch.distributed.fsdp import fully_shard

    v = model.vae
    blocks = [*v.encoder.down_blocks, v.encoder.mid_block, v.decoder.mid_block, *v.decoder.up_blocks]
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def psnr_db(recon: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR of [-1, 1] videos (peak-to-peak 2, so the same number as on uint8 [0, 255])."""
    mse = (recon.float().clamp(-1, 1) - target.float()).pow(2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


class VAETrainer:
    def __init__(self, cfg: VAETrainConfig):
        self.cfg = cfg
        _, env_world, _ = read_launch_env()
        validate_vae_train(cfg, env_world)  # before any process group, model or decode
        quiet_third_party(cfg.logging.verbose)
        try:
            items = list_inputs(cfg.input)
        except ValueError as e:
            raise ConfigError(f"vae_train.input: {e}") from None
        self.buckets = parse_buckets(cfg.resolutions, cfg.frames)
        self.train_items, self.eval_items = self._split([it.source for it in items])

        self.env = init_distributed(cfg.device, cfg.backend, cfg.timeout_s)
        self.rank, self.world, self.device = self.env.rank, self.env.world_size, self.env.device
        setup_console(self.rank)
        self.pdims = ParallelDims.from_config(ParallelConfig(), self.world)  # DP only
        meshes = self.pdims.build_mesh(self.device.type)
        self.dp_rank, self.dp_size = self.pdims.local_rank("dp"), self.pdims.dp
        self.run_dir = cfg.run_dir
        os.makedirs(self.run_dir, exist_ok=True)
        self.train_items = self._usable(self.train_items, "training")
        self.eval_items = self._usable(self.eval_items, "held-out")
        if not self.train_items:
            raise ConfigError(f"vae_train.input={cfg.input!r}: no usable training clips (see the rejects above)")

        import diffusers

        torch.manual_seed(cfg.seed)
        if cfg.from_scratch:
            cls = diffusers.AutoencoderKLWan
            vae = cls.from_config(cls.load_config(cfg.vae_path))
            if cfg.init_logvar is not None:
                init_posterior_logvar(vae, cfg.init_logvar)
        else:
            vae = diffusers.AutoencoderKLWan.from_pretrained(cfg.vae_path, torch_dtype=torch.float32)
        self.vae_config = dict(vae.config)
        self.model = Reconstruct(vae.float()).to(self.device).train()
        self.fsdp = self.dp_size > 1 and cfg.dp_mode == "fsdp"
        self.grad_group = meshes["dp"].get_group() if self.dp_size > 1 and not self.fsdp else None
        if self.fsdp:
            apply_vae_fsdp(self.model, fsdp_mesh(meshes, 1), mp_policy(self.device.type, cfg.mixed_precision))
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step = 0
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if cfg.resume and (found := ckpt.latest(self.ckpt_dir)) is not None:
            saved = ckpt.load(found[1], self.model, self.optimizer)
            self.step = int(saved.get("step", found[0]))
            log.info("resumed from %s (step %d)", found[1], self.step)
        if self.rank == 0:
            atomic_write_text(os.path.join(self.run_dir, "config.yaml"), OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            atomic_write_text(os.path.join(self.run_dir, "split.json"),
                              json.dumps({"train": self.train_items, "eval": self.eval_items}, indent=1))
        self.metrics = MetricLogger(cfg.logging, self.run_dir, self.rank, asdict(cfg))

    # ---- data ----------------------------------------------------------------------------------
    def _split(self, sources: list[str]) -> tuple[list[str], list[str]]:
        """(train, held-out) sources: the explicit list (by path or file name), else a seeded fraction."""
        cfg = self.cfg
        if cfg.eval_clips:
            want = {os.path.abspath(p) for p in cfg.eval_clips} | set(cfg.eval_clips)
            held = [s for s in sources if s in want or os.path.basename(s) in want]
            found = {s for s in held} | {os.path.basename(s) for s in held}
            missing = [p for p in cfg.eval_clips if p not in found and os.path.abspath(p) not in found]
            if missing:
                raise ConfigError(f"vae_train.eval_clips: {missing} are not among the input clips")
        else:
            n = round(cfg.eval_fraction * len(sources)) if len(sources) > 1 else 0
            n = max(n, 1) if cfg.eval_fraction > 0 and len(sources) > 1 else n
            held = sorted(random.Random(cfg.seed).sample(sources, n))
        heldset = set(held)
        return [s for s in sources if s not in heldset], held

    def _usable(self, sources: list[str], what: str) -> list[str]:
        """Drop clips that cannot fill a bucket (probe only: no decode), the same on every rank."""
        keep = []
        for s in sources:
            try:
                choose_bucket(probe(s, self.cfg.max_side), self.buckets, self.cfg.target_fps)
                keep.append(s)
            except BadInput as e:
                if self.rank == 0:
                    log.warning("skipping %s clip: %s", what, e)
        return keep

    def _load(self, source: str) -> torch.Tensor:
        """uint8 (T, 3, H, W) -> float (1, 3, T, H, W) in [-1, 1] on the device."""
        frames = load_clip(source, self.buckets, self.cfg.target_fps, self.cfg.max_side)[0]
        return frames.permute(1, 0, 2, 3).unsqueeze(0).float().div(127.5).sub(1.0).to(self.device)

    def batch_indices(self, step: int) -> list[int]:
        """Training-clip indices of global batch `step` (every rank computes the same list)."""
        n, B = len(self.train_items), self.cfg.batch_size
        out, perms = [], {}
        for g in range(step * B, (step + 1) * B):
            epoch = g // n
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(
                    _mix(self.cfg.seed, epoch))).tolist()
            out.append(perms[epoch][g % n])
        return out

    # ---- one step ------------------------------------------------------------------------------
    def loss_terms(self, x: torch.Tensor, gen: Optional[torch.Generator]) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        with autocast(self.device, cfg.mixed_precision):
            recon, mean, logvar = self.model(x, gen)
        recon, mean, logvar = recon.float(), mean.float(), logvar.float()
        diff = recon - x
        l1, mse = diff.abs().mean(), diff.pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / x.numel()
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        return loss, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        self.optimizer.zero_grad(set_to_none=True)
        lr = set_lr(self.optimizer, step, cfg.optim, cfg.steps)
        idx = self.batch_indices(step)
        B = cfg.batch_size
        # The global-batch mean: each rank's clips weigh dp/B, and the DP average of grads divides by dp.
        scale = self.dp_size / B
        sums = torch.zeros(4, dtype=torch.float64)
        for j in range(self.dp_rank, B, self.dp_size):
            x = self._load(self.train_items[idx[j]])
            gen = torch.Generator().manual_seed(_mix(cfg.seed, 7, step, j))
            loss, terms = self.loss_terms(x, gen)
            (loss * scale).backward()
            sums += torch.tensor([loss.item(), terms["l1"].item(), terms["mse"].item(), terms["kl"].item()],
                                 dtype=torch.float64)
        if self.grad_group is not None:
            allreduce_grads(list(self.model.parameters()), self.grad_group)
        grad_norm = clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        if self.world > 1:
            dist.all_reduce(sums)
        sums /= B
        if not math.isfinite(sums[0].item()) or not math.isfinite(grad_norm.item()):
            raise FloatingPointError(f"step {step}: non-finite loss/grad norm ({sums[0].item()}, "
                                     f"{grad_norm.item()}); lower optim.lr or check the clips")
        self.optimizer.step()
        self.step += 1
        loss, l1, mse, kl = sums.tolist()
        return {"loss": loss, "l1": l1, "mse": mse, "kl": kl, "grad_norm": float(grad_norm), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean reconstruction PSNR (dB, posterior mean) over the held-out clips; None without any.
        Every rank runs the same number of forwards (FSDP's collectives), padding with zero weight."""
        n = len(self.eval_items)
        if n == 0:
            return None
        self.model.eval()
        total = torch.zeros(1, dtype=torch.float64)
        for k in range(math.ceil(n / self.dp_size)):
            i = k * self.dp_size + self.dp_rank
            x = self._load(self.eval_items[min(i, n - 1)])
            with autocast(self.device, self.cfg.mixed_precision):
                recon = self.model(x, None)[0]
            if i < n:
                total += psnr_db(recon, x)
        self.model.train()
        if self.world > 1:
            dist.all_reduce(total)
        return total.item() / n

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, stop_at: Optional[int] = None) -> list[float]:
        """Run to cfg.steps (or stop_at, for tests that simulate an interruption); export at the
        end. Returns this run's per-step losses."""
        cfg = self.cfg
        end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("VAE %.2fM params | %d training / %d held-out clips | world %d (dp %d, %s) | device %s",
                 n_params / 1e6, len(self.train_items), len(self.eval_items), self.world, self.dp_size,
                 "fsdp" if self.fsdp else "replicated", self.device)
        losses = []
        self.psnr_history: list[tuple[int, float]] = []
        if self.step == 0 and self.eval_items:
            p0 = self.evaluate()
            self.psnr_history.append((0, p0))
            self.metrics.record(0, {"eval_psnr": p0})
            log.info("step 0 | eval PSNR %.2f dB", p0)
        while self.step < end:
            t0 = time.perf_counter()
            m = self.train_step()
            m["step_time_s"] = time.perf_counter() - t0
            step = self.step
            losses.append(m["loss"])
            if self.eval_items and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                m["eval_psnr"] = self.evaluate()
                self.psnr_history.append((step, m["eval_psnr"]))
            if step % cfg.logging.log_every == 0 or step == end:
                m.update(memory_stats(self.device))
                self._log_line(step, m)
            self.metrics.record(step, m)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                path = ckpt.save(self.ckpt_dir, step, self.model, self.optimizer,
                                 rank_state={"step": step}, keep=cfg.ckpt_keep)
                log.info("saved checkpoint %s", path)
        if self.step >= cfg.steps:
            self.export()
        return losses

    def _log_line(self, step: int, m: dict) -> None:
        if self.rank != 0:
            return
        line = (f"step {step:>6d}/{self.cfg.steps} | loss {m['loss']:.5f} (l1 {m['l1']:.4f} mse {m['mse']:.5f} "
                f"kl {m['kl']:.3g}) | grad_norm {m['grad_norm']:.3f} | lr {m['lr']:.2e} | "
                f"{m['step_time_s']:.2f}s/step")
        if "eval_psnr" in m:
            line += f" | eval PSNR {m['eval_psnr']:.2f} dB"
        log.info(line)
        if self.metrics.wandb is not None:
            self.metrics.wandb.log(m, step=step)

    # ---- export --------------------------------------------------------------------------------
    def export(self) -> str:
        """Collective: full weights on every rank, per-channel latent mean/std of the posterior
        means over the training clips (each rank its share), then rank 0 writes the diffusers
        folder with those statistics in its config, atomically."""
        import diffusers
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        cfg = self.cfg
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        vae = diffusers.AutoencoderKLWan.from_config(self.vae_config)
        vae.load_state_dict({k.removeprefix("vae."): v.detach().cpu() for k, v in full.items()})
        vae = vae.float().to(self.device).eval()
        sources = self.train_items[: cfg.stats_max_clips] if cfg.stats_max_clips else self.train_items
        mean, std = latent_stats(vae, [self._load(s) for s in sources[self.dp_rank::self.dp_size]],
                                 reduce=self.world > 1)
        out = os.path.abspath(cfg.export_dir or os.path.join(self.run_dir, "vae"))
        if self.rank == 0:
            vae.register_to_config(latents_mean=[round(v, 6) for v in mean],
                                   latents_std=[round(v, 6) for v in std])
            tmp = f"{out}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            vae.to("cpu").save_pretrained(tmp)
            replace_dir(tmp, out)
            log.info("exported VAE to %s (latents_mean/std over %d training clips)", out, len(sources))
        if self.world > 1:
            dist.barrier()
        self.export_path = out
        return out

    def close(self) -> None:
        self.metrics.close()


@torch.no_grad()
def latent_stats(vae, clips_BCTHW: list[torch.Tensor], reduce: bool = False) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the posterior means mu over every latent
    position of the clips, accumulated in float64; with reduce, summed over the process group."""
    C = int(vae.config.z_dim)
    acc = torch.zeros(3, C, dtype=torch.float64)
    for x in clips_BCTHW:
        mu = vae._encode(x)[:, :C].double().cpu()
        acc[0] += mu.sum(dim=(0, 2, 3, 4))
        acc[1] += mu.pow(2).sum(dim=(0, 2, 3, 4))
        acc[2] += mu[:, 0].numel()
    if reduce:
        dist.all_reduce(acc)
    mean = acc[0] / acc[2]
    std = (acc[1] / acc[2] - mean.pow(2)).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()

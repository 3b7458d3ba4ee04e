"""The training loop: batch -> loss -> backward -> step -> log -> checkpoint (torchtitan-style:
one class, kept linear). Works for one process and for any (dp, cp, tp, pp) layout."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from sora_dist.config import JobConfig, validate
from sora_dist.console import quiet_third_party, setup_console
from sora_dist.data import build_loader
from sora_dist.diffusion import build_diffusion
from sora_dist.fsutil import atomic_write_text
from sora_dist.models import build_model
from sora_dist.models.packing import cp_balanced_order, pack_latents, pack_targets, token_counts, uniform_batch
from sora_dist.models.dit import count_params
from sora_dist.models.fp8 import apply_fp8
from sora_dist.models.wan_weights import load_diffusers_weights
from sora_dist.parallel.device import init_distributed, memory_stats, peak_tflops
from sora_dist.parallel.dims import ParallelDims, row_exchange
from sora_dist.parallel.parallelize import parallelize
from sora_dist.parallel.rng import seed_step
from sora_dist.training.checkpoint import CheckpointManager, TrainState, latest
from sora_dist.training.metrics import MetricLogger
from sora_dist.training.optim import EMA, build_optimizer, set_lr
from sora_dist.training.sampling import SampleLogger

log = logging.getLogger("sora_dist")


# Exit status after a preemption checkpoint; slurm/train.sbatch requeues the job on it.
REQUEUE_EXIT_CODE = 42


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(SystemExit):
    """Raised after the checkpoint that a SIGUSR1/SIGTERM asked for; exit status 42."""

    def __init__(self, step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


def step_generator(seed: int, step: int, dp_rank: int) -> torch.Generator:
    """Noise, timesteps and caption dropout of a step: a function of (seed, step, dp rank) only,
    so a resumed run draws exactly what the uninterrupted one did, on every device."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 65_537 + dp_rank) % (2**63))


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        env_world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        validate(cfg, world_size=env_world)  # fail fast: before any process group or tensor
        t = cfg.train
        self.env = init_distributed(t.device, cfg.parallel.backend, cfg.parallel.timeout_s)
        self.rank, self.world, self.device = self.env.rank, self.env.world_size, self.env.device
        setup_console(self.rank)
        quiet_third_party(cfg.logging.verbose)
        self.run_dir = t.run_dir
        os.makedirs(self.run_dir, exist_ok=True)

        self.pdims = ParallelDims.from_config(cfg.parallel, self.world)
        self.pdims.build_mesh(self.device.type)
        self.dp_rank, self.dp_size = self.pdims.local_rank("dp"), self.pdims.dp

        # Same seed on every rank -> identical initial weights before any sharding.
        torch.manual_seed(t.seed)
        if t.meta_init:  # shapes only; parallelize allocates and initialises the shards
            with torch.device("meta"):
                model = build_model(cfg.model)
        else:
            model = build_model(cfg.model).to(self.device)
        apply_fp8(model, cfg, self.device)  # model.fp8_linears / fp8_attention; before any sharding (torchtitan order)
        self.n_params = count_params(model)
        self.model_args = model.args  # its dimensions answer the FLOPs of a step (MFU)
        self.diffusion = build_diffusion(cfg.diffusion)
        # TP/CP/recompute/compile/FSDP for any world size; under PP this rank's stages.
        self.parallel = parallelize(model, self.pdims, cfg, self.device, self.diffusion.loss)
        self.model = self.parallel.model
        ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if cfg.model.init_from and not (t.resume and latest(ckpt_dir) is not None):
            # Released weights into this rank's shards (a resumed run's checkpoint wins); before
            # the EMA copies the weights and before any optimizer state exists.
            got = load_diffusers_weights(self.model, cfg.model.init_from)
            log.info("model.init_from %s: %d tensors, %.1f of %.1f MB read by this rank", cfg.model.init_from,
                     got["tensors"], got["bytes_read"] / 2**20, got["bytes_total"] / 2**20)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        # Packs balanced by modelled cost agree over the DP ranks (data.pack_balance=flops).
        exchange = row_exchange(self.pdims.dp_host_group()) if self.dp_size > 1 else None
        self.loader = build_loader(cfg.data, cfg.model, self.dp_rank, self.dp_size, exchange)
        self.state = TrainState()
        self.checkpoint = CheckpointManager(ckpt_dir, self.model,
                                            self.optimizer, self.ema, self.loader, self.state,
                                            self.dp_rank, self.dp_size, t.ckpt_keep, t.async_checkpoint)
        self.nonfinite_streak = 0
        self._stop_signal = 0
        self._stop_agreed = False
        self._install_signal_handlers()
        if self.rank == 0:
            atomic_write_text(os.path.join(self.run_dir, "config.yaml"),
                              OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if not (t.resume and self.checkpoint.resume()) and t.init_from:
            self.checkpoint.load_weights(t.init_from)
        self.metrics = MetricLogger(cfg.logging, self.run_dir, self.rank, asdict(cfg))
        self.samples = SampleLogger(cfg.logging, self.run_dir, self.device.type, self.metrics)
        self.peak_tflops = peak_tflops(self.device, cfg.logging.peak_tflops)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def skipped(self) -> int:
        return self.state.skipped

    def _install_signal_handlers(self) -> None:
        """Slurm sends SIGUSR1 (--signal=USR1@T) or SIGTERM before the time limit / on
        preemption. The handler only sets a flag; the loop checks it between steps."""
        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption hook
                pass

    # ---- one step ----------------------------------------------------------------------------
    def _reduce_step_stats(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int,
                           flops: float) -> tuple[float, float, bool, float, float]:
        """One all-reduce and one host sync per step: (mean loss over DP, grad norm, stop?, tokens
        and model FLOPs of all DP ranks). Every rank of a DP group holds the same full loss and
        batch and every rank the same global grad norm, so sums over the world divided by its size
        give the DP mean and the norm, and x dp / world the DP totals (packs balanced by cost hold
        different token counts per rank). The stop flag (a SIGUSR1/SIGTERM on any rank) is agreed
        on here: ranks may get the signal at different steps, and the one that stopped alone would
        leave the others hanging."""
        stats = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(()).to(loss.device),
                             torch.tensor(1.0 if self._stop_signal else 0.0, device=loss.device),
                             torch.tensor(float(tokens), device=loss.device),
                             torch.tensor(float(flops), device=loss.device)])
        if self.world > 1:
            dist.all_reduce(stats)
        loss_avg, norm, stop, tok, fl = stats.tolist()
        per_dp = self.dp_size / self.world
        return loss_avg / self.world, norm / self.world, stop > 0, tok * per_dp, fl * per_dp

    def train_step(self, batch: dict) -> dict:
        cfg, step = self.cfg, self.state.step
        self.optimizer.zero_grad(set_to_none=True)
        lr = set_lr(self.optimizer, step, cfg.optim, cfg.train.steps)
        gen = step_generator(cfg.train.seed, step, self.dp_rank)
        seed_step(cfg.train.seed, step, self.dp_rank, self.parallel.rng_trackers)  # dropout streams
        text = batch["text"].to(self.device, non_blocking=True)
        mask = batch["text_mask"].to(self.device, non_blocking=True)
        same = None
        if batch.get("packed"):
            # One sequence of whole samples of any sizes (data.packing; models/packing.py).
            patch = self.model_args.patch_size
            x0s = [x.to(self.device, non_blocking=True) for x in batch["latent"]]
            xs, t_model, drop, targets = self.diffusion.packed_training_inputs(x0s, gen)
            # One latent size (say one long clip alone): a batch, run as one (same draws, same
            # loss); pipeline stages take packs as packs (their microbatches split the samples).
            same = uniform_batch(xs, targets) if self.pdims.pp == 1 else None
        if batch.get("packed") and same is None:
            if self.pdims.cp > 1 and cfg.parallel.cp_mode != "ulysses":
                # Ring CP computes each rank's own queries: order the samples so every contiguous
                # CP chunk carries about the same attention work (randomness was drawn first, in
                # the loader's order, so the step does not depend on the layout).
                order = cp_balanced_order([math.prod(x.shape[-3:]) // math.prod(patch) for x in xs],
                                          self.pdims.cp)
                xs, targets = [xs[i] for i in order], [targets[i] for i in order]
                idx = torch.tensor(order, device=self.device)
                t_model, drop, text, mask = t_model[idx], drop[idx], text[idx], mask[idx]
            x_t, grids = pack_latents(xs, patch)
            loss = self.parallel.forward_backward(x_t, t_model, text, mask, drop, pack_targets(targets, patch),
                                                  grids=grids.to(self.device))
            seqs = token_counts(grids)
        else:
            if batch.get("packed"):
                x_t, target = same
            else:  # a bucket batch
                x0 = batch["latent"].to(self.device, non_blocking=True)
                x_t, t_model, drop, target = self.diffusion.training_inputs(x0, gen)
            loss = self.parallel.forward_backward(x_t, t_model, text, mask, drop, target)
            seq = math.prod(math.ceil(n / p) for n, p in zip(x_t.shape[-3:], cfg.model.patch_size))
            seqs = [seq] * x_t.shape[0]
        self.parallel.finalize_grads()
        grad_norm = self.parallel.clip_grad_norm_(cfg.optim.grad_clip)
        # Tokens and model FLOPs (fwd + bwd, no recompute: the MFU numerator) of this rank's
        # samples (attention is quadratic per sample, not per pack), summed over DP below.
        flops = sum(self.model_args.flops_per_sample(n, text.shape[1]) for n in seqs)
        loss_avg, grad_norm, self._stop_agreed, tokens, flops = self._reduce_step_stats(
            loss, grad_norm, sum(seqs), flops)
        if math.isfinite(loss_avg) and math.isfinite(grad_norm):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.nonfinite_streak = 0
        else:
            # Skip the update (grads dropped); all ranks agree since loss/norm are reduced.
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped += 1
            self.nonfinite_streak += 1
            log.warning("step %d: non-finite loss/grad norm (%s, %s); update skipped (%d in a row)",
                        step, loss_avg, grad_norm, self.nonfinite_streak)
            if self.nonfinite_streak >= cfg.train.max_nonfinite_streak:
                raise NonFiniteLossError(
                    f"{self.nonfinite_streak} consecutive non-finite losses at step {step}: "
                    "lower optim.lr, check the data, or raise train.max_nonfinite_streak")
        return {"loss": loss_avg, "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                "skipped": self.state.skipped, "flops": flops}

    # ---- the loop ----------------------------------------------------------------------------
    def train(self, stop_at: Optional[int] = None) -> list[float]:
        """Run to train.steps (or stop_at, for tests that simulate an interruption).
        Returns the per-step losses of this run."""
        cfg = self.cfg.train
        end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        losses = []
        if self.rank == 0:
            log.info("model %s: %.2fM params | world %d = dp %d x cp %d x pp %d x tp %d | device %s",
                     self.cfg.model.flavor, self.n_params / 1e6, self.world, self.pdims.dp,
                     self.pdims.cp, self.pdims.pp, self.pdims.tp, self.device)
            if getattr(self.loader, "layout_note", None):
                log.info("%s", self.loader.layout_note)
        t0 = time.perf_counter()
        while self.state.step < end:
            m = self.train_step(next(self.loader))
            self.state.step += 1
            step = self.state.step
            losses.append(m["loss"])
            if step % self.cfg.logging.log_every == 0 or step == end:
                dt = time.perf_counter() - t0
                m["tokens_per_s"] = m["tokens"] / max(dt, 1e-9)
                m["tflops_per_device"] = m["flops"] / max(dt, 1e-9) / self.world / 1e12
                if self.peak_tflops:
                    m["mfu"] = m["tflops_per_device"] / self.peak_tflops
                m.update(memory_stats(self.device))
                self.metrics.log(step, cfg.steps, m)
            self.metrics.record(step, m)
            if self.rank == 0:
                self.samples.poll()
            sample_now = self.samples.due(step)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or sample_now:
                path = self.checkpoint.save()
                if sample_now:
                    self.checkpoint.wait()  # the sampler reads it: complete first
                    if self.rank == 0:
                        self.samples.start(path, step)
            elif self._stop_agreed:
                self.checkpoint.save()
                self.checkpoint.wait()  # an async save must be complete before the exit
                log.warning("stop signal %s: checkpoint saved at step %d, exiting with %d for requeue",
                            self._stop_signal or "(other rank)", step, REQUEUE_EXIT_CODE)
                raise Preempted(step)
            t0 = time.perf_counter()
        self.checkpoint.wait()
        if self.rank == 0:
            atomic_write_text(os.path.join(self.run_dir, "losses.json"), json.dumps(losses))
            self.samples.poll(wait=True)
        return losses

    def close(self) -> None:
        self.metrics.close()

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

from sora_dist.config import JobConfig, validate
from sora_dist.data import build_loader
from sora_dist.diffusion import build_diffusion
from sora_dist.models.dit import build_dit, count_params
from sora_dist.models.fp8 import apply_fp8
from sora_dist.parallel.dims import ParallelDims
from sora_dist.parallel.grad import clip_grad_norm_
from sora_dist.parallel.rng import seed_step
from sora_dist.parallel.state import autocast, init_distributed, memory_stats, peak_tflops
from sora_dist.train import checkpoint as ckpt
from sora_dist.train.metrics import MetricLogger, setup_console
from sora_dist.train.optim import EMA, build_optimizer, set_lr

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
        self.run_dir = t.run_dir
        os.makedirs(self.run_dir, exist_ok=True)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")

        self.pdims = ParallelDims.from_config(cfg.parallel, self.world)
        self.meshes = self.pdims.build_mesh(self.device.type) if self.world > 1 else None
        coords = self.pdims.coords(self.rank)
        self.dp_rank, self.dp_size = coords["dp"], self.pdims.dp

        # Same seed on every rank -> identical initial weights before any sharding.
        torch.manual_seed(t.seed)
        if t.meta_init:  # shapes only; parallelize_dit allocates and initialises the shards
            with torch.device("meta"):
                model = build_dit(cfg.model)
        else:
            model = build_dit(cfg.model).to(self.device)
        apply_fp8(model, cfg, self.device)  # model.fp8_linears / fp8_attention; before any sharding (torchtitan order)
        self.n_params = count_params(model)
        self.pipeline = None
        if self.pdims.pp > 1:
            # Each PP rank keeps only its stages' modules (same FQNs); TP/CP/FSDP apply per stage.
            from sora_dist.parallel.parallelize import parallelize_dit
            from sora_dist.parallel.pipeline import PipelineRunner

            p = cfg.parallel
            self.pipeline = PipelineRunner(
                model, self.meshes["pp"], self.device, p.pp_schedule, p.pp_microbatches,
                p.pp_virtual_stages,
                stage_wrapper=lambda st: parallelize_dit(st, self.pdims, self.meshes, cfg), meshes=self.meshes)
        elif self.world > 1:
            from sora_dist.parallel.parallelize import parallelize_dit

            model = parallelize_dit(model, self.pdims, self.meshes, cfg)
        else:
            # One process: only recompute/compile apply, the same way parallelize_dit does them.
            from sora_dist.parallel.parallelize import apply_activation_checkpointing
            from sora_dist.parallel.rng import build_rng_tracker

            self._rng_trackers = [build_rng_tracker(t.seed, 0, 0, self.device.type)]
            apply_activation_checkpointing(model, t.activation_checkpointing, self._rng_trackers[0])
            if t.compile:
                for blk in model.blocks.values():
                    blk.compile()  # in place: no "_orig_mod." in parameter names
        self.model = model
        if self.world > 1:  # the streams parallelize_dit made (one per pipeline stage)
            parts = [model]
            if self.pipeline is not None:
                from sora_dist.parallel.pipeline import _unwrap

                parts = [_unwrap(st) for st in self.pipeline.stages]
            self._rng_trackers = [p._sora_parallel.rng_tracker for p in parts]
        self.optimizer = build_optimizer(model, cfg.optim)
        self.ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
        self.loader = build_loader(cfg.data, cfg.model, self.dp_rank, self.dp_size)
        self.diffusion = build_diffusion(cfg.diffusion)
        self.step = 0
        self.nonfinite_streak = 0
        self.skipped = 0
        self._stop_signal = 0
        self._stop_agreed = False
        self._samplers: list = []  # sora-sample processes started by log_samples (rank 0)
        self._install_signal_handlers()
        self._save_config()
        self._maybe_resume()
        self.metrics = MetricLogger(cfg.logging, self.run_dir, self.rank, self._config_dict())
        self.peak_tflops = peak_tflops(self.device, cfg.logging.peak_tflops)

    # ---- set-up helpers ----------------------------------------------------------------------
    def _config_dict(self) -> dict:
        return asdict(self.cfg)

    def _save_config(self) -> None:
        if self.rank == 0:
            from omegaconf import OmegaConf

            ckpt.atomic_write_text(os.path.join(self.run_dir, "config.yaml"),
                                   OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))

    def _maybe_resume(self) -> None:
        found = ckpt.latest(self.ckpt_dir) if self.cfg.train.resume else None
        if found is not None:
            step, path = found
            state = ckpt.load(path, self.model, self.optimizer, self.ema)
            self.step = step
            # The data position belongs to a DP rank, not a global rank: a new layout (other
            # tp/cp/pp) maps global ranks differently, so look it up by DP coordinate.
            by_dp, old_size = self._saved_data_states(path)
            if old_size == self.dp_size:
                self.loader.load_state_dict(by_dp[self.dp_rank])
            elif by_dp:
                # Another DP size: carry the stream over from every old DP rank's position.
                log.info("%s", self.loader.load_elastic_state(list(by_dp.values())))
            else:
                raise ckpt.CheckpointError(f"{path} holds no data position (rank_state/ missing); "
                                           "restore the folder or start with train.init_from")
            self.skipped = state.get("skipped", 0)
            log.info("resumed from %s (step %d)", path, step)
        elif self.cfg.train.init_from:
            ckpt.load_model_only(self.cfg.train.init_from, self.model)
            log.info("initialised weights from %s", self.cfg.train.init_from)

    def _saved_data_states(self, path: str) -> tuple[dict, int]:
        """({dp_rank: loader state}, saved DP size) of a checkpoint. Rank 0 reads the per-rank
        files once and broadcasts (every DP rank's state is saved by all its TP/CP/PP peers:
        one is kept per DP rank), so a restart of N ranks reads N small files, not N^2."""
        out = [None]
        if self.rank == 0:
            by_dp, sizes, err = {}, set(), ""
            try:  # any failure is broadcast, so no rank is left waiting in the collective
                for s in ckpt.rank_states(path):
                    if "data" in s:
                        by_dp[int(s["dp_rank"])] = s["data"]
                        sizes.add(int(s["dp_size"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                err = f"{path}/rank_state is unreadable ({type(e).__name__}: {e})"
            if not err and len(sizes) > 1:
                err = f"{path}: rank states from DP sizes {sorted(sizes)}; the folder mixes two runs"
            elif not err and sizes and sorted(by_dp) != list(range(max(sizes))):
                err = (f"{path}: data positions of DP ranks {sorted(by_dp)} of {max(sizes)}; "
                       "rank_state/ is incomplete")
            if err:
                err += "; delete this step folder to resume from the previous checkpoint"
            out = [(by_dp, max(sizes, default=0), err)]
        if self.world > 1:  # every rank raises together, none is left waiting
            dist.broadcast_object_list(out, src=0)
        by_dp, size, err = out[0]
        if err:
            raise ckpt.CheckpointError(err)
        return by_dp, size

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

    def save_checkpoint(self) -> str:
        rank_state = {"data": self.loader.state_dict(), "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                      "step": self.step, "skipped": self.skipped}
        path = ckpt.save(self.ckpt_dir, self.step, self.model, self.optimizer, self.ema,
                         rank_state=rank_state, keep=self.cfg.train.ckpt_keep)
        log.info("saved checkpoint %s", path)
        return path

    # ---- one step ----------------------------------------------------------------------------
    def _reduce_step_stats(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float, bool]:
        """One all-reduce and one host sync per step: (mean loss over DP, grad norm, stop?).
        Every rank of a DP group holds the same full loss and every rank the same global grad
        norm, so sums over the world divided by its size give the DP mean and the norm. The
        stop flag (a SIGUSR1/SIGTERM on any rank) is agreed on here: ranks may get the signal
        at different steps, and the one that stopped alone would leave the others hanging."""
        stats = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(()).to(loss.device),
                             torch.tensor(1.0 if self._stop_signal else 0.0, device=loss.device)])
        if self.world > 1:
            dist.all_reduce(stats)
        loss_avg, norm, stop = stats.tolist()
        return loss_avg / self.world, norm / self.world, stop > 0

    def train_step(self, batch: dict) -> dict:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        lr = set_lr(self.optimizer, self.step, cfg.optim, cfg.train.steps)
        gen = step_generator(cfg.train.seed, self.step, self.dp_rank)
        seed_step(cfg.train.seed, self.step, self.dp_rank, self._rng_trackers)  # dropout streams
        x0 = batch["latent"].to(self.device, non_blocking=True)
        text = batch["text"].to(self.device, non_blocking=True)
        mask = batch["text_mask"].to(self.device, non_blocking=True)
        if self.pipeline is not None:
            x_t, t_model, drop, target = self.diffusion.training_inputs(x0, gen)
            with autocast(self.device, cfg.train.mixed_precision):
                loss = self.pipeline.step(x_t, t_model, text, mask, drop, target)  # fwd + bwd
        else:
            with autocast(self.device, cfg.train.mixed_precision):
                loss = self.diffusion.training_loss(self.model, x0, text, mask, gen)
            loss.backward()
        if self.world > 1:
            from sora_dist.parallel.parallelize import finalize_grads

            for part in (self.pipeline.stages if self.pipeline is not None else [self.model]):
                finalize_grads(part)
        pp_mesh = self.meshes["pp"] if (self.meshes is not None and self.pdims.pp > 1) else None
        grad_norm = clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip, pp_mesh)
        loss_avg, grad_norm, self._stop_agreed = self._reduce_step_stats(loss, grad_norm)
        if math.isfinite(loss_avg) and math.isfinite(grad_norm):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.nonfinite_streak = 0
        else:
            # Skip the update (grads dropped); all ranks agree since loss/norm are reduced.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.nonfinite_streak += 1
            log.warning("step %d: non-finite loss/grad norm (%s, %s); update skipped (%d in a row)",
                        self.step, loss_avg, grad_norm, self.nonfinite_streak)
            if self.nonfinite_streak >= cfg.train.max_nonfinite_streak:
                raise NonFiniteLossError(
                    f"{self.nonfinite_streak} consecutive non-finite losses at step {self.step}: "
                    "lower optim.lr, check the data, or raise train.max_nonfinite_streak")
        p = cfg.model.patch_size
        T, H, W = x0.shape[-3:]
        tokens = x0.shape[0] * math.ceil(T / p[0]) * math.ceil(H / p[1]) * math.ceil(W / p[2]) * self.dp_size
        return {"loss": loss_avg, "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                "skipped": self.skipped, "flops": self._model_flops(x0.shape, text.shape[1])}

    def _model_flops(self, shape, text_len: int) -> float:
        """Model FLOPs of this step over all DP ranks (fwd + bwd, no recompute): the MFU numerator."""
        from sora_dist.planner import ModelDims, step_flops

        m = self.cfg.model
        r = m.resolved()
        dims = ModelDims(hidden=r["hidden_size"], depth=r["depth"], heads=r["num_heads"], mlp_ratio=m.mlp_ratio,
                         text_dim=m.text_dim, text_len=text_len, in_channels=m.in_channels,
                         patch=tuple(m.patch_size), qk_norm=m.qk_norm)
        p = m.patch_size
        seq = math.ceil(shape[-3] / p[0]) * math.ceil(shape[-2] / p[1]) * math.ceil(shape[-1] / p[2])
        return step_flops(dims, seq, shape[0] * self.dp_size)[0].total

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
        t0 = time.perf_counter()
        while self.step < end:
            batch = next(self.loader)
            m = self.train_step(batch)
            self.step += 1
            losses.append(m["loss"])
            if self.step % self.cfg.logging.log_every == 0 or self.step == end:
                dt = time.perf_counter() - t0
                m["tokens_per_s"] = m["tokens"] / max(dt, 1e-9)
                m["tflops_per_device"] = m["flops"] / max(dt, 1e-9) / self.world / 1e12
                if self.peak_tflops:
                    m["mfu"] = m["tflops_per_device"] / self.peak_tflops
                m.update(memory_stats(self.device))
                self.metrics.log(self.step, cfg.steps, m)
            if self.rank == 0:
                self._poll_samples()
                self._append_metrics({"step": self.step, **{k: v for k, v in m.items() if k not in ("tokens", "flops")}})
            sample_now = bool(self.cfg.logging.sample_every) and self.step % self.cfg.logging.sample_every == 0
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.steps or sample_now:
                path = self.save_checkpoint()
                if sample_now:
                    self.log_samples(path)
            elif self._stop_agreed:
                self.save_checkpoint()
                log.warning("stop signal %s: checkpoint saved at step %d, exiting with %d for requeue",
                            self._stop_signal or "(other rank)", self.step, REQUEUE_EXIT_CODE)
                raise Preempted(self.step)
            t0 = time.perf_counter()
        if self.rank == 0:
            ckpt.atomic_write_text(os.path.join(self.run_dir, "losses.json"), json.dumps(losses))
            self._poll_samples(wait=True)
        return losses

    def log_samples(self, ckpt_path: str) -> None:
        """Rank 0 starts `sora-sample` on the checkpoint just saved, in its own process (no
        process group: any training layout loads into one process) and goes on training; the
        videos are logged when that process has finished (`_poll_samples`). Training never
        waits on sampling, and a failed sampler is reported, never fatal."""
        if self.rank != 0:
            return
        import subprocess
        import sys

        lg = self.cfg.logging
        out = os.path.join(self.run_dir, "samples", f"step_{self.step:08d}")
        os.makedirs(out, exist_ok=True)
        prompts = "[" + ",".join(json.dumps(p) for p in lg.sample_prompts) + "]"
        cmd = [sys.executable, "-m", "sora_dist.sample", f"run_dir={self.run_dir}", f"checkpoint={ckpt_path}",
               f"prompts={prompts}", f"output_dir={out}", f"steps={lg.sample_steps}",
               f"num_frames={lg.sample_num_frames}", f"height={lg.sample_height}", f"width={lg.sample_width}",
               f"batch_size={len(lg.sample_prompts)}", "progress=false", f"device={self.device.type}"]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                            "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
        log_file = open(os.path.join(out, "sample.log"), "w")
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        self._samplers.append((proc, self.step, out, log_file))

    def _poll_samples(self, wait: bool = False) -> None:
        """Log the videos of finished sampler processes (all of them when `wait`)."""
        pending = []
        for proc, step, out, log_file in self._samplers:
            if wait:
                proc.wait()
            if proc.poll() is None:
                pending.append((proc, step, out, log_file))
                continue
            log_file.close()
            jsonl = os.path.join(out, "samples.jsonl")
            if proc.returncode == 0 and os.path.exists(jsonl):
                records = [json.loads(line) for line in open(jsonl)]
                self.metrics.log_videos(step, records)
                log.info("step %d: %d sample videos in %s", step, len(records), out)
            else:
                log.warning("step %d: sampling for the log failed (exit %s); see %s/sample.log",
                            step, proc.returncode, out)
        self._samplers = pending

    def _append_metrics(self, row: dict) -> None:
        """run_dir/metrics.jsonl: one line per step, appended across restarts (a resumed run
        rewrites the steps after its checkpoint; readers keep the last line of each step)."""
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.metrics.close()

"""`sora-sample`: prompt(s) -> text encoder -> diffusion sampler -> VAE decode -> mp4.

  sora-sample run_dir=runs/demo 'prompts=["a red square moving right on a black background"]'
  sora-sample run_dir=runs/demo cond_path=first_frame.png            # image-to-video
  sora-sample run_dir=runs/demo cond_path=clip.mp4 cond_latent_frames=2 cond_position=last
  sora-sample run_dir=runs/demo mode=edit cond_path=clip.mp4 strength=0.6 'prompts=["..."]'
  sora-sample run_dir=runs/demo mode=connect cond_path=a.mp4 cond_path_2=b.mp4
  sora-sample run_dir=runs/demo mode=loop loop_latent_frames=1
  torchrun --nproc_per_node 8 -m sora_dist.sample run_dir=... parallel.cp=4 cfg_parallel=true

Model and diffusion settings come from the run's saved config.yaml, and the VAE/text encoder
from the shard manifest the run trained on, so the sampler cannot silently disagree with the
weights. Single process: sampling a few prompts does not need the training layout.
"""
from __future__ import annotations

import json
import logging
import os
import time

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sora_dist.config import CONFIG_DIR, load_run_config
from sora_dist.console import quiet_third_party
from sora_dist.config.sample import SampleConfig, validate_sample
from sora_dist.config.validate import ConfigError
from sora_dist.data.shards import load_manifest
from sora_dist.diffusion import build_diffusion
from sora_dist.fsutil import atomic_write_text
from sora_dist.models.text import TextEncoder, read_model_type
from sora_dist.data.video_io import Mp4StreamWriter
from sora_dist.models.vae import VideoVAE
from sora_dist.parallel.device import autocast, init_distributed
from sora_dist.parallel.inference import SamplingLayout, build_sampling_layout, gather_records, parallel_denoiser
from sora_dist.sample_modes import mode_inputs
from sora_dist.training import checkpoint as ckpt
from sora_dist.training.optim import EMA

log = logging.getLogger("sora_dist.sample")


def register_configs() -> None:
    """The typed schema sora_dist/hydra_configs/sample.yaml composes onto (Hydra's ConfigStore)."""
    ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


register_configs()


def _resolve_models(cfg: SampleConfig, job) -> tuple[str, str, dict]:
    """VAE / text-encoder folders and text settings: explicit, else from the run's shard
    manifest, else the encoder family's defaults (models/text.py ENCODERS)."""
    manifest = {}
    if job.data.source == "shards" and job.data.shards:
        try:
            manifest = load_manifest(job.data.shards)[1]
        except FileNotFoundError:
            manifest = {}
    vae = cfg.vae_path or manifest.get("vae", {}).get("path")
    recorded = manifest.get("text_encoder")  # a dict since umT5 support; a bare path before
    te = cfg.text_encoder_path or (recorded.get("path") if isinstance(recorded, dict) else recorded)
    if not vae or not te:
        raise ConfigError("cannot tell which VAE/text encoder the run used (no shard manifest); "
                          "pass vae_path=... and text_encoder_path=...")
    # Prompts must be cut and padded as the training captions were (pad_to_max: Wan's layout).
    text = {"max_length": cfg.text_max_length or manifest.get("text_max_length"),
            "pad_to_max": manifest.get("text_pad_to_max")}
    return vae, te, text


def _prompts(cfg: SampleConfig) -> list[str]:
    prompts = [p for p in cfg.prompts if p and p.strip()]
    if cfg.prompt_file:
        with open(cfg.prompt_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: set prompts=[...] or prompt_file=<one prompt per line>")
    return prompts


def _load_model(cfg: SampleConfig, job, device, layout: SamplingLayout, run_dir=None):
    """The run's denoiser under the sampling layout, from its checkpoint (EMA weights by
    default); every rank reads only its own shards (DCP)."""
    run_dir = run_dir or cfg.run_dir
    path = cfg.checkpoint if run_dir == cfg.run_dir else None
    if path is None:
        found = ckpt.latest(os.path.join(run_dir, "checkpoints"))
        if found is None:
            raise ConfigError(f"no complete checkpoint under {run_dir}/checkpoints; train first "
                              "or pass checkpoint=<step folder>")
        path = found[1]

    def load(model):
        if cfg.use_ema and job.train.ema_decay > 0:
            ema = EMA(model, job.train.ema_decay)
            ckpt.load(path, model, None, ema)
            ema.copy_to(model)
        else:
            ckpt.load_model_only(path, model)

    torch.manual_seed(0)  # init values are overwritten; fixed only to keep runs reproducible
    return parallel_denoiser(job, cfg.parallel, layout, load, device), path


def _low_noise_expert(cfg: SampleConfig, job, device, layout: SamplingLayout) -> dict:
    """Wan2.2-A14B's second expert: a run trained on the low-noise range (diffusion.t_range
    [0, boundary]) of the same architecture; sampling switches to it below the boundary."""
    low = load_run_config(cfg.low_noise_run_dir)
    if job.diffusion.objective != "flow" or low.diffusion.objective != "flow":
        raise ConfigError("low_noise_run_dir: two-expert sampling is for flow-matching runs (Wan2.2-A14B)")
    if (low.model.arch, low.model.in_channels, low.model.text_dim) != (
            job.model.arch, job.model.in_channels, job.model.text_dim):
        raise ConfigError(f"low_noise_run_dir={cfg.low_noise_run_dir!r} trained model.arch/in_channels/"
                          f"text_dim={low.model.arch}/{low.model.in_channels}/{low.model.text_dim}, but "
                          f"run_dir has {job.model.arch}/{job.model.in_channels}/{job.model.text_dim}")
    model_2, _ = _load_model(cfg, low, device, layout, run_dir=cfg.low_noise_run_dir)
    out = {"model_2": model_2, "boundary_ratio": cfg.boundary_ratio}
    if cfg.guidance_scale_2 is not None:
        out["guidance_scale_2"] = cfg.guidance_scale_2
    return out


def run_sample(cfg: SampleConfig) -> dict:
    """Sample every prompt (one process, or all ranks of a torchrun/srun launch: see
    parallel/inference.py). Returns this rank's {"records", "latents", "indices", "cond_mask"}
    (latents of the batches its prompt group sampled; records on writer ranks)."""
    validate_sample(cfg)
    env = init_distributed(cfg.device, cfg.parallel.backend, cfg.parallel.timeout_s)
    try:
        layout = build_sampling_layout(cfg.parallel, cfg.cfg_parallel, env.world_size, env.device.type)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    job = load_run_config(cfg.run_dir)
    prompts = _prompts(cfg)
    vae_path, te_path, text_cfg = _resolve_models(cfg, job)
    try:  # an unsupported text encoder fails before the VAE and model are loaded
        read_model_type(te_path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"text_encoder_path: {e}") from None
    device = env.device
    vae = VideoVAE.load(vae_path, device=device)
    try:
        vae.enable_tiling_from_size(cfg.vae_tile_size)
    except ValueError as e:
        raise ConfigError(f"vae_tile_size={cfg.vae_tile_size}: {e}") from None
    if vae.latent_channels != job.model.in_channels:
        raise ConfigError(f"VAE has {vae.latent_channels} latent channels but the model was trained on "
                          f"model.in_channels={job.model.in_channels}; use the run's VAE")
    try:
        C, t, h, w = vae.latent_shape(cfg.num_frames, cfg.height, cfg.width)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    pt, ph, pw = job.model.patch_size
    if t % pt or h % ph or w % pw:
        raise ConfigError(f"latent size {t}x{h}x{w} does not divide by model.patch_size={list(job.model.patch_size)}; "
                          "change num_frames/height/width")
    te = TextEncoder.load(te_path, text_cfg["max_length"], device=device, pad_to_max=text_cfg["pad_to_max"])
    if te.dim != job.model.text_dim:
        raise ConfigError(f"text encoder width {te.dim} != model.text_dim={job.model.text_dim}")
    model, ckpt_path = _load_model(cfg, job, device, layout)
    d = job.diffusion
    if cfg.shift is not None:
        if d.objective != "flow":
            raise ConfigError(f"shift={cfg.shift} is a flow-matching setting; the run trained "
                              f"diffusion.objective={d.objective!r}")
        d.shift = cfg.shift
    flow_kw = {}
    if job.model.arch == "wan" and cfg.cond_path:
        flow_kw["clean_cond_frames"] = True  # Wan2.2 TI2V: clean condition frames at t=0
    if cfg.low_noise_run_dir:
        flow_kw.update(_low_noise_expert(cfg, job, device, layout))
    diffusion = build_diffusion(d)
    p = cfg.parallel
    layout_name = (f"groups={layout.groups} cfg={'2' if layout.cfg_parallel else '1'} cp={p.cp}"
                   f"({p.cp_mode}) tp={p.tp}")
    sampler = cfg.sampler or d.sampler
    steps = cfg.steps if cfg.steps is not None else d.sample_steps
    scale = cfg.guidance_scale if cfg.guidance_scale is not None else d.guidance_scale

    os.makedirs(cfg.output_dir, exist_ok=True)
    records, latents, indices = [], [], []
    starts = list(range(0, len(prompts), cfg.batch_size))
    cmask = None
    for j in layout.batches(len(starts)):
        s = starts[j]
        batch = prompts[s:s + cfg.batch_size]
        B = len(batch)
        if cfg.skip_existing and all(os.path.exists(_video_path(cfg, s + i)) for i in range(B)):
            continue  # a rerun: this batch's videos are there (every rank of the group sees the same files)
        text, mask = te.encode(batch)
        # One generator per call, seeded from the first prompt's index: reruns reproduce.
        g = torch.Generator().manual_seed(cfg.seed + s)
        t_all = t + (cfg.loop_latent_frames if cfg.mode == "loop" else 0)  # loop: + the tied tail
        noise = torch.randn((B, C, t_all, h, w), generator=g).to(device)
        m = mode_inputs(cfg, vae, (B, C, t_all, h, w), device)
        cmask = m.cond_mask
        edit = {"init_latent": m.init_latent, "strength": m.strength} if m.init_latent is not None else {}
        t0 = time.perf_counter()
        with autocast(device, job.train.mixed_precision):
            x0 = diffusion.sample(model, noise, text.to(device), mask.to(device), steps=steps, sampler=sampler,
                                  guidance_scale=scale, generator=g, cond_latent=m.cond_latent,
                                  cond_frames_mask_T=cmask, eta=d.ddim_eta, progress=cfg.progress and layout.writer,
                                  constrain=m.constrain, **edit, **flow_kw)
        if m.keep_T is not None:
            x0 = x0[:, :, :m.keep_T]
        sample_s = time.perf_counter() - t0
        latents += [x0[i].float().cpu() for i in range(B)]
        indices += [s + i for i in range(B)]
        if cfg.decode_parallel and len(layout.group_ranks) > 1:
            paths = [_decode_shared(cfg, vae, x0[i:i + 1].float(), _video_path(cfg, s + i), layout)
                     for i in range(B)]
        elif layout.writer:
            paths = [_decode_to_mp4(cfg, vae, x0[i:i + 1].float(), _video_path(cfg, s + i)) for i in range(B)]
        if not layout.writer:
            continue
        for i, prompt in enumerate(batch):
            path = paths[i]
            records.append({"index": s + i, "prompt": prompt, "path": path, "mode": cfg.mode, "seed": cfg.seed + s,
                            "index_in_batch": i, "batch_size": cfg.batch_size, "checkpoint": ckpt_path,
                            "sampler": sampler, "steps": steps, "guidance_scale": scale,
                            "low_noise_run_dir": cfg.low_noise_run_dir, "layout": layout_name,
                            "sample_s": round(sample_s, 3)})
    merged = gather_records(records, layout)
    if merged is not None:  # global rank 0
        _write_records(cfg, merged)
        print(f"sora-sample: {len(merged)} new videos in {os.path.abspath(cfg.output_dir)}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return {"records": records, "latents": latents, "indices": indices, "cond_mask": cmask}


def strip_indices(T: int, n: int = 8) -> list[int]:
    return sorted({round(i * (T - 1) / max(n - 1, 1)) for i in range(min(n, T))})


def _decode_to_mp4(cfg: SampleConfig, vae, latent_1CTHW: torch.Tensor, path: str) -> str:
    """Decode in chunks of cfg.decode_chunk_frames latent frames (the causal cache carried over:
    equal to a whole decode) straight into the mp4, so a long video never holds all its frames;
    the frames of the PNG strip are kept on the way."""
    T = vae.pixel_frames(0, latent_1CTHW.shape[2])[1]
    want, kept, done = set(strip_indices(T)), [], 0
    with Mp4StreamWriter(path, cfg.fps) as writer:
        for chunk in vae.decode_stream(latent_1CTHW, frames_per_chunk=cfg.decode_chunk_frames,
                                       tile=cfg.vae_tile_size or None):
            writer.write(chunk)
            kept += [chunk[0, :, j - done] for j in range(done, done + chunk.shape[2]) if j in want]
            done += chunk.shape[2]
    write_strip(torch.stack(kept, dim=1), path[:-4] + ".png", n=len(kept))
    return os.path.abspath(path)


def _decode_shared(cfg: SampleConfig, vae, latent_1CTHW: torch.Tensor, path: str, layout: SamplingLayout):
    """decode_parallel: every rank of the prompt group decodes its share of the latent frames
    (VideoVAE.decode_shard: a warm-up of the decoder's receptive field makes it equal to a whole
    decode); the writer muxes its own share, then receives the others' in frame order, one share
    in memory at a time. Returns the path on the writer, None elsewhere."""
    ranks = layout.group_ranks
    me = ranks.index(dist.get_rank())
    share = vae.decode_shard(latent_1CTHW, me, len(ranks), frames_per_chunk=cfg.decode_chunk_frames,
                             tile=cfg.vae_tile_size or None)
    frames = share.frames.contiguous()
    if me > 0:
        dist.send(torch.tensor(frames.shape, device=frames.device), dst=ranks[0])
        dist.send(frames, dst=ranks[0])
        return None
    T = vae.pixel_frames(0, latent_1CTHW.shape[2])[1]
    want, kept, done = set(strip_indices(T)), [], 0
    with Mp4StreamWriter(path, cfg.fps) as writer:
        for src in ranks:
            if src != ranks[0]:
                shape = torch.empty(5, dtype=torch.long, device=frames.device)
                dist.recv(shape, src=src)
                frames = torch.empty(shape.tolist(), dtype=frames.dtype, device=frames.device)
                dist.recv(frames, src=src)
            writer.write(frames)
            kept += [frames[0, :, j - done] for j in range(done, done + frames.shape[2]) if j in want]
            done += frames.shape[2]
    write_strip(torch.stack(kept, dim=1), path[:-4] + ".png", n=len(kept))
    return os.path.abspath(path)


def write_strip(video_CTHW: torch.Tensor, path: str, n: int = 8) -> str:
    """Up to n frames evenly spread over the video, side by side in one PNG (a glance at it)."""
    from PIL import Image

    idx = strip_indices(video_CTHW.shape[1], n)
    frames = ((video_CTHW[:, idx].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, n, H, W)
    strip = frames.permute(2, 1, 3, 0).reshape(frames.shape[2], -1, 3)                # (H, n*W, 3)
    tmp = path + ".tmp.png"
    Image.fromarray(strip.cpu().numpy()).save(tmp)
    os.replace(tmp, path)
    return path


def _video_path(cfg: SampleConfig, index: int) -> str:
    return os.path.join(cfg.output_dir, f"sample_{index:03d}.mp4")


def _write_records(cfg: SampleConfig, new: list[dict]) -> None:
    """samples.jsonl: this run's records plus the earlier runs' for videos it skipped, by index."""
    path = os.path.join(cfg.output_dir, "samples.jsonl")
    by_index = {}
    if cfg.skip_existing and os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            if "index" in r and os.path.exists(r.get("path", "")):
                by_index[r["index"]] = r
    by_index.update({r["index"]: r for r in new})
    atomic_write_text(path, "".join(json.dumps(by_index[i]) + "\n" for i in sorted(by_index)))


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="sample")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SampleConfig), dcfg))
        quiet_third_party(cfg.verbose)
        run_sample(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
    main()

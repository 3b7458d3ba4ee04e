"""`sora-encode`: pre-encode videos + captions into webdataset shards of latents.

Data parallel without a process group: every rank lists the same inputs, takes a round-robin
slice, skips what any earlier run finished (done-lists), and writes only its own shards. Rank 0
then waits for every rank's completion marker and writes manifest.json. Kill it at any point
and rerun the same command: finished shards are kept, the rest is redone.

  sora-encode input=/data/clips output=/data/shards vae_path=/models/wan_vae \
      text_encoder_path=/models/t5 'resolutions=[[256,256]]' 'frames=[1,17]'
  sora-encode ... text_encoder_path=/models/Wan2.1-T2V-1.3B-Diffusers/text_encoder   # umT5, Wan layout
  torchrun --nproc_per_node 8 -m sora_dist.encode ...   # or srun, one task per GPU
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sora_dist.config import CONFIG_DIR
from sora_dist.console import quiet_third_party
from sora_dist.config.encode import EncodeConfig, validate_against_vae, validate_encode
from sora_dist.config.validate import ConfigError
from sora_dist.data import shards as sh
from sora_dist.data.inputs import list_inputs
from sora_dist.data.video_io import BadInput, load_clip, parse_buckets
from sora_dist.models.text import TextEncoder, read_model_type
from sora_dist.models.vae import VideoVAE
from sora_dist.parallel.device import read_launch_env, select_device

log = logging.getLogger("sora_dist.encode")


def register_configs() -> None:
    """The typed schema sora_dist/hydra_configs/encode.yaml composes onto (Hydra's ConfigStore)."""
    ConfigStore.instance().store(name="encode_schema", node=EncodeConfig)


register_configs()


def _setup_torch(cfg: EncodeConfig, world: int):
    _, _, local_rank = read_launch_env()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # Ranks on one node share its cores; oversubscribing threads makes every rank slower.
    threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)
    device = select_device(cfg.device, local_rank)
    if cfg.dtype == "bf16" and device.type != "cuda":
        raise ConfigError("encode.dtype=bf16 needs a CUDA device; use dtype=fp32 on CPU")
    return device, torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def _load(it, buckets, cfg):
    """Caption check, then decode + bucket; a bad input comes back as its BadInput."""
    try:
        if not it.caption:  # checked first: it costs nothing, a decode does
            raise BadInput("no_caption", it.source, "caption missing or empty; add <stem>.txt or a "
                           "'caption' field in the manifest")
        return load_clip(it.source, buckets, cfg.target_fps, cfg.max_side)
    except BadInput as e:
        return e


def _prefetch(items, fn, workers: int):
    """Yield (item, fn(item)) in input order, decoding up to 2*workers items ahead in threads
    (PyAV and torch release the GIL) so decode overlaps the VAE. workers=0: inline."""
    if workers <= 0:
        for it in items:
            yield it, fn(it)
        return

    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        queue = collections.deque()
        for it in items:
            queue.append((it, pool.submit(fn, it)))
            if len(queue) > 2 * workers:
                head, fut = queue.popleft()
                yield head, fut.result()
        while queue:
            head, fut = queue.popleft()
            yield head, fut.result()


def _run_id() -> str:
    """An id every rank of one launch shares, so rank 0 never mistakes a completion marker left
    by an earlier run for this one (that matters when a rerun has new work, e.g. retry_rejects)."""
    env = os.environ
    if env.get("SORA_ENCODE_RUN_ID"):
        return env["SORA_ENCODE_RUN_ID"]
    if env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        return env["TORCHELASTIC_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    return ""


def run_encode(cfg: EncodeConfig) -> dict:
    """Encode this rank's share; on rank 0 also merge the manifest. Returns this rank's stats."""
    validate_encode(cfg)
    try:  # an unsupported text encoder fails here, before any model load or decode
        read_model_type(cfg.text_encoder_path)
    except ValueError as e:
        raise ConfigError(f"encode.text_encoder_path: {e}") from None
    env_rank, env_world, _ = read_launch_env()
    rank = env_rank if cfg.rank is None else cfg.rank
    world = env_world if cfg.world_size is None else cfg.world_size
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside world size {world}")
    try:
        items = list_inputs(cfg.input)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.limit > 0:
        items = items[: cfg.limit]
    mine = items[rank::world]
    os.makedirs(cfg.output, exist_ok=True)
    # This rank's marker from an earlier run is void until this run finishes its share.
    stale = os.path.join(cfg.output, f"rank-r{rank:03d}.complete.json")
    if os.path.exists(stale):
        os.remove(stale)
    done = sh.DoneList(cfg.output, rank=rank)
    todo = [it for it in mine if not done.is_done(it.source, cfg.retry_rejects)]

    device, dtype = _setup_torch(cfg, world)
    vae = VideoVAE.load(cfg.vae_path, device=device, dtype=dtype)
    validate_against_vae(cfg, vae.temporal_compression, vae.spatial_compression)
    try:
        vae.enable_tiling_from_size(cfg.vae_tile_size)
    except ValueError as e:
        raise ConfigError(f"encode.vae_tile_size={cfg.vae_tile_size}: {e}") from None
    te = TextEncoder.load(cfg.text_encoder_path, cfg.text_max_length, device=device, dtype=dtype,
                          pad_to_max=cfg.text_pad_to_max)
    # Which models made these shards; a rerun into the same folder with other ones would mix
    # embeddings of two encoders (or latents of two VAEs) under one manifest.
    made_by = {"text_encoder": te.describe(cfg.text_encoder_path),
               "vae": {"class": vae.kind, "name": os.path.basename(os.path.normpath(cfg.vae_path)),
                       "latent_channels": vae.latent_channels, "temporal_compression": vae.temporal_compression,
                       "spatial_compression": vae.spatial_compression, "path": os.path.abspath(cfg.vae_path)}}
    try:
        sh.check_made_by(cfg.output, made_by, record=rank == 0)
    except ValueError as e:
        raise ConfigError(f"encode.output: {e}") from None
    buckets = parse_buckets(cfg.resolutions, cfg.frames)
    if rank == 0:
        sh.atomic_write_text(os.path.join(cfg.output, "encode_config.yaml"),
                             OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    writer = sh.ShardWriter(cfg.output, rank, cfg.samples_per_shard, cfg.storage_dtype)
    rejected: collections.Counter = collections.Counter()
    n_ok, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    bar = tqdm(total=len(todo), unit="video", position=rank, disable=not cfg.progress,
               desc=f"encode r{rank}", dynamic_ncols=True)
    try:
        for it, loaded in _prefetch(todo, lambda it: _load(it, buckets, cfg), cfg.decode_workers):
            if isinstance(loaded, BadInput):
                writer.reject(it.source, loaded.kind, loaded.detail)
                rejected[loaded.kind] += 1
                bar.update(1)
                continue
            frames, bucket, fps, info = loaded
            latent = vae.encode(frames)[0].cpu().numpy()
            emb, mask = te.encode([it.caption])
            n = int(mask[0].sum())  # store real tokens only; the loader pads per batch
            writer.write(latent, emb[0, :n].numpy(), mask[0, :n].numpy(), {
                "source": it.source, "caption": it.caption, "fps": fps, "bucket": bucket.name,
                "src_size": [info.height, info.width], "src_fps": info.fps, "src_frames": info.num_frames,
            })
            n_ok += 1
            bar.update(1)
    finally:
        # Also on an error: every sample already written is complete, so keep it (and free the lock).
        writer.close()
        bar.close()
    dt = time.perf_counter() - t0
    stats = {"assigned": len(mine), "skipped_done": len(mine) - len(todo), "encoded": n_ok,
             "rejected": dict(rejected), "seconds": dt, "videos_per_s": len(todo) / dt if dt > 0 else 0.0,
             # CPU time of this process (all its threads): comparable across loaded machines
             "cpu_seconds": time.process_time() - cpu0}
    run_id = _run_id()
    sh.mark_rank_complete(cfg.output, rank, sh.assignment_digest([run_id] + [i.source for i in mine]), stats)
    if rank == 0:
        digests = {r: sh.assignment_digest([run_id] + [i.source for i in items[r::world]]) for r in range(world)}
        sh.wait_for_ranks(cfg.output, digests, cfg.wait_timeout_s)
        manifest = sh.write_manifest(cfg.output, {
            "latent_channels": vae.latent_channels, "text_dim": te.dim, **made_by,
            "text_max_length": te.max_length, "text_pad_to_max": te.pad_to_max,
            "target_fps": cfg.target_fps, "world_size": world, "num_inputs": len(items),
        })
        kinds = collections.Counter(r["kind"] for r in sh.DoneList(cfg.output).rejects.values())
        print(f"sora-encode: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
              f"{manifest['num_rejected']} rejected {dict(kinds)} (see rejects.jsonl); "
              f"buckets {manifest['buckets']}; shards in {os.path.abspath(cfg.output)}", flush=True)
        stats["manifest"] = manifest
    return stats


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="encode")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EncodeConfig), dcfg))
        quiet_third_party(cfg.verbose)
        stats = run_encode(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    log.info("rank stats: %s", json.dumps({k: v for k, v in stats.items() if k != "manifest"}))


if __name__ == "__main__":
    main()

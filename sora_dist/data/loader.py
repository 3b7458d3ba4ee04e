"""Streaming reader of sora-encode shards: DP split, bucket batching, exact resume.

Order. Epoch e permutes the shard list with (seed, e); DP rank r takes every dp_size-th shard
of that permutation, so within an epoch the ranks' shards are disjoint and together complete.
A rank's shards are read in consecutive *blocks* of at least `shuffle_buffer` samples; each
block is permuted with (seed, epoch, rank, block). That is a shuffle buffer whose contents are
a pure function of the position, which is what makes resume exact (webdataset's own shuffle
buffer has no state we could save).

Batching. Samples go into one accumulator per bucket (latent T x H x W); a batch is emitted the
moment an accumulator reaches batch_size, so batches never mix buckets and no sample is dropped
(leftovers carry into the next epoch). Captions in a batch are padded to the longest one.

Packing (data.packing). The same sample stream feeds the best-fill packer
(data/packing.py) instead of the accumulators: each batch is one pack of up to
data.tokens_per_rank tokens; the packer's look-ahead window plays the accumulators' part
(stored as "pending": {"window": [...]} in the state, re-read on resume, re-read with its shards
after a DP resize). Samples that cannot be packed (T/H/W not divisible by the patch, longer than
the budget) are errors naming the shard and key when they are read.

Resume. state_dict() = stream position (epoch, block, offset into the block) + the identities
(shard, key) of samples waiting in accumulators. load_state_dict() re-reads only those few
samples, then the stream continues at the next unseen sample.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
import webdataset as wds

from sora_dist.data.packing import BALANCE_NOTE, Packer, check_sample, collate_pack, pack_balance, resolve_packing
from sora_dist.data.shards import decode_arrays, describe_text_encoder, describe_vae, load_manifest


def _decode(raw: dict, shard: str) -> dict:
    # The member format (fp32/fp16 .npy, raw bf16 words) is the writer's: shards.py reads it back
    # (never unpickling: shards may come from anywhere).
    try:
        meta = json.loads(raw["json"])
        latent, text, mask = decode_arrays(raw, meta)  # float32, float32, bool in any storage dtype
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{shard}: sample {raw.get('__key__')!r} is damaged or incomplete ({type(e).__name__}: "
                         f"{e}); delete the shard and its done-list line, then rerun sora-encode") from None
    return {"key": raw["__key__"], "shard": shard, "latent": torch.from_numpy(latent),
            "text": torch.from_numpy(text), "mask": torch.from_numpy(mask).bool(),
            "bucket": "x".join(str(s) for s in latent.shape[1:]), "caption": meta.get("caption", "")}


def collate(samples: list[dict], pad_text_to: int = 0) -> dict:
    """Stack one bucket's samples; pad text/mask to the longest caption in the batch, or to
    pad_text_to when that is longer (Wan's fixed 512-token layout; zeros, mask False)."""
    L = max(max(s["text"].shape[0] for s in samples), pad_text_to)
    D = samples[0]["text"].shape[1]
    text = torch.zeros(len(samples), L, D, dtype=torch.float32)
    mask = torch.zeros(len(samples), L, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = s["text"].shape[0]
        text[i, :n] = s["text"].float() * s["mask"][:, None]  # zero past the mask, always
        mask[i, :n] = s["mask"]
    return {"latent": torch.stack([s["latent"].float() for s in samples]), "text": text,
            "text_mask": mask, "bucket": samples[0]["bucket"],
            "keys": [s["key"] for s in samples], "captions": [s["caption"] for s in samples]}


class ShardLoader:
    """Infinite iterator of bucketed batches for one DP rank (interface: sora_dist/data/__init__.py)."""

    def __init__(self, data_cfg, dp_rank: int = 0, dp_size: int = 1, model_cfg=None, exchange=None):
        if not data_cfg.shards:
            raise ValueError("data.source=shards needs data.shards=<folder written by sora-encode>")
        self.folder, manifest = load_manifest(data_cfg.shards)
        self.shards = [(s["name"], int(s["samples"])) for s in manifest["shards"] if int(s["samples"]) > 0]
        if len(self.shards) < dp_size:
            raise ValueError(f"{len(self.shards)} shards in {self.folder} cannot feed dp_size={dp_size} ranks "
                             "(shards are split across DP ranks); re-encode with smaller "
                             "encode.samples_per_shard or use fewer DP ranks")
        missing = [n for n, _ in self.shards if not os.path.isfile(os.path.join(self.folder, n))]
        if missing:
            raise FileNotFoundError(f"manifest in {self.folder} lists {len(missing)} missing shards "
                                    f"(first: {missing[0]}); rerun sora-encode to restore them")
        self.latent_channels = int(manifest["latent_channels"])
        self.text_dim = int(manifest["text_dim"])
        self.buckets = dict(manifest.get("buckets", {}))
        # Shards store real tokens only; encoders that want a fixed length (umT5 as Wan uses it)
        # get it here. Manifests from before the field existed: per-batch padding, as then.
        self.pad_text_to = int(manifest.get("text_max_length") or 0) if manifest.get("text_pad_to_max") else 0
        if model_cfg is not None:
            # Fail here with the fix, not later inside the model with a shape error.
            if model_cfg.in_channels != self.latent_channels:
                raise ValueError(f"shards in {self.folder} were made by the {describe_vae(manifest)} but "
                                 f"model.in_channels={model_cfg.in_channels}; set model.in_channels="
                                 f"{self.latent_channels}, or re-encode the shards with a VAE of "
                                 f"{model_cfg.in_channels} latent channels")
            if model_cfg.text_dim != self.text_dim:
                raise ValueError(f"shards in {self.folder} were made by the {describe_text_encoder(manifest)} "
                                 f"but model.text_dim={model_cfg.text_dim}; set model.text_dim={self.text_dim}, "
                                 f"or re-encode the shards with a text encoder of width {model_cfg.text_dim}")
        self.batch_size, self.seed = int(data_cfg.batch_size), int(data_cfg.seed)
        self.bucket_batch_size = {str(k): int(v) for k, v in (getattr(data_cfg, "bucket_batch_size", None) or {}).items()}
        bad = {k: v for k, v in self.bucket_batch_size.items() if v < 1}
        if bad:
            raise ValueError(f"data.bucket_batch_size={bad}: batch sizes must be >= 1")
        self.shuffle_buffer = int(data_cfg.shuffle_buffer)
        # Patch n' Pack: the token count of a sample needs the model's patch (VideoDiT's default
        # when no model config is given, as in loader-only tools).
        self.patch = tuple(int(p) for p in (getattr(model_cfg, "patch_size", None) or (1, 2, 2)))
        budget, self.layout_note = resolve_packing(
            data_cfg, [b.split("x") for b in self.buckets], self.patch, f"the manifest of {self.folder}")
        self.packer = Packer(budget, int(data_cfg.pack_window)) if budget else None
        caption_len = self.pad_text_to or int(manifest.get("text_max_length") or 0)  # for the cost model
        self.balance = pack_balance(data_cfg, model_cfg, exchange, caption_len) if budget else None
        if self.balance is not None:
            self.layout_note += BALANCE_NOTE
        self.dp_rank, self.dp_size = dp_rank, dp_size
        # position of the next unseen sample, and accumulators of read-but-unbatched samples
        self.epoch, self.block, self.offset = 0, 0, 0
        self.pending: dict[str, list[dict]] = {}
        self.batches_done = 0
        # After a DP resize (load_elastic_state): (epoch, names of the shards that epoch still
        # has to deliver, in global order), split over the new DP ranks instead of the full list.
        self.epoch_override: Optional[tuple[int, list[str]]] = None
        self._block_key: Optional[tuple[int, int]] = None
        self._block_samples: list[tuple[str, dict]] = []
        # Background read of the next block (bytes only); costs one more block of memory.
        self.prefetch = bool(getattr(data_cfg, "prefetch_next_block", True))
        self._pool = None
        self._prefetch = None

    # ---- order ------------------------------------------------------------------------------
    def epoch_shards(self, epoch: int, override: Optional[tuple] = None) -> list[tuple[str, int]]:
        """Every shard the epoch delivers, in global order (a seeded permutation; after a DP
        resize, the override's remaining shards for its epoch)."""
        if override is not None and int(override[0]) == epoch:
            counts = dict(self.shards)
            return [(n, counts[n]) for n in override[1]]
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def rank_shards(self, epoch: int) -> list[tuple[str, int]]:
        return self.epoch_shards(epoch, self.epoch_override)[self.dp_rank::self.dp_size]

    def blocks(self, epoch: int) -> list[list[str]]:
        return self._group_blocks(self.rank_shards(epoch))

    def _group_blocks(self, rank_shards: list[tuple[str, int]]) -> list[list[str]]:
        out, cur, n = [], [], 0
        for name, count in rank_shards:
            cur.append(name)
            n += count
            if n >= max(1, self.shuffle_buffer):
                out.append(cur)
                cur, n = [], 0
        if cur:
            out.append(cur)
        return out

    def _read(self, names: list[str]) -> list[tuple[str, dict]]:
        urls = [os.path.join(self.folder, n) for n in names]
        # Plain tar expansion: no node/worker splitting here, the DP split is ours.
        pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
        return [(os.path.basename(raw["__url__"]), raw) for raw in pipe]

    def _next_key(self, epoch: int, block: int, n_blocks: int) -> tuple[int, int]:
        return (epoch, block + 1) if block + 1 < n_blocks else (epoch + 1, 0)

    def _read_block(self, epoch: int, block: int) -> list[tuple[str, dict]]:
        blocks = self.blocks(epoch)
        return self._read(blocks[block]) if block < len(blocks) else []

    def _load_block(self) -> None:
        blocks = self.blocks(self.epoch)
        while not blocks:  # a resized epoch can leave a rank nothing: go on to the next one
            self.epoch, self.block, self.offset = self.epoch + 1, 0, 0
            blocks = self.blocks(self.epoch)
        key = (self.epoch, self.block)
        if self._prefetch is not None and self._prefetch[0] == key:
            samples = self._prefetch[1].result()  # read in the background while we trained
        else:
            samples = self._read(blocks[key[1]])
        self._prefetch = None
        if self.prefetch:
            # Read the next block's bytes in a thread (file I/O releases the GIL); the order does
            # not depend on it, only the stall at block boundaries does.
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
            nxt = self._next_key(self.epoch, self.block, len(blocks))
            self._prefetch = (nxt, self._pool.submit(self._read_block, *nxt))
        if self.shuffle_buffer > 0:
            rng = np.random.default_rng([self.seed, self.epoch, self.dp_rank, self.block])
            samples = [samples[i] for i in rng.permutation(len(samples))]
        self._block_key, self._block_samples, self._n_blocks = (self.epoch, self.block), samples, len(blocks)

    def _next_sample(self) -> dict:
        while True:
            if self._block_key != (self.epoch, self.block):
                self._load_block()
            if self.offset < len(self._block_samples):
                shard, raw = self._block_samples[self.offset]
                self.offset += 1
                return _decode(raw, shard)
            self.block, self.offset = self.block + 1, 0
            if self.block >= self._n_blocks:
                self.epoch, self.block = self.epoch + 1, 0

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self):
        return self

    def _packable(self, s: dict) -> dict:
        s["tokens"] = check_sample(s["latent"].shape[1:], self.patch, self.packer.budget,
                                   f"{s['shard']}: sample {s['key']!r}")
        return s

    def __next__(self) -> dict:
        if self.packer is not None:
            pack = self.packer.pack(lambda: self._packable(self._next_sample()), self.balance)
            self.batches_done += 1
            out = collate_pack(pack, self.pad_text_to)
            out["keys"] = [f"{s['shard']}/{s['key']}" for s in pack]
            out["captions"] = [s["caption"] for s in pack]
            return out
        while True:
            s = self._next_sample()
            acc = self.pending.setdefault(s["bucket"], [])
            acc.append(s)
            B = self.bucket_batch_size.get(s["bucket"], self.batch_size)
            if len(acc) >= B:
                # More than B can wait only after a resume with a smaller batch size.
                batch, rest = acc[:B], acc[B:]
                if rest:
                    self.pending[s["bucket"]] = rest
                else:
                    del self.pending[s["bucket"]]
                self.batches_done += 1
                return collate(batch, self.pad_text_to)

    # ---- resume -----------------------------------------------------------------------------
    def _waiting(self) -> dict[str, list[dict]]:
        """Read-but-unbatched samples: the accumulators, or the packer's window."""
        if self.packer is not None:
            return {"window": self.packer.window} if self.packer.window else {}
        return self.pending

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "block": self.block, "offset": self.offset,
                "pending": {b: [[s["shard"], s["key"]] for s in acc] for b, acc in self._waiting().items()},
                "batches_done": self.batches_done, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "seed": self.seed, "shuffle_buffer": self.shuffle_buffer, "batch_size": self.batch_size,
                "shards_digest": self._shards_digest(),
                "head_waits": self.packer.head_waits if self.packer is not None else 0,
                # only while it still matters (the epoch in progress is the overridden one)
                "epoch_override": (list(self.epoch_override) if self.epoch_override is not None
                                   and self.epoch_override[0] >= self.epoch else None)}

    def _shards_digest(self) -> str:
        # A digest, not the list: the state is saved per rank per checkpoint, shard lists can be long.
        return hashlib.sha1("\n".join(f"{n}:{c}" for n, c in self.shards).encode()).hexdigest()

    def load_state_dict(self, sd: dict) -> None:
        for name in ("dp_size", "seed", "shuffle_buffer"):
            if sd[name] != getattr(self, name):
                raise ValueError(f"data state was saved with {name}={sd[name]}, now {getattr(self, name)}; "
                                 "the data order cannot be continued exactly - keep it unchanged to resume")
        if sd["shards_digest"] != self._shards_digest():
            raise ValueError(f"the shard set in {self.folder} changed since the checkpoint; "
                             "resume against the same sora-encode output")
        self.epoch, self.block, self.offset = int(sd["epoch"]), int(sd["block"]), int(sd["offset"])
        self.batches_done = int(sd["batches_done"])
        self.epoch_override = sd.get("epoch_override")
        self._block_key = None
        # Re-read just the waiting samples, in their original accumulator order.
        wanted = {(sh, k) for acc in sd["pending"].values() for sh, k in acc}
        found = {}
        if wanted:
            for shard, raw in self._read(sorted({sh for sh, _ in wanted})):
                if (shard, raw["__key__"]) in wanted:
                    found[(shard, raw["__key__"])] = _decode(raw, shard)
        if len(found) != len(wanted):
            raise ValueError(f"{len(wanted) - len(found)} pending samples from the checkpoint are not in "
                             f"the shards of {self.folder}; the shards changed since the checkpoint")
        waiting = [found[(sh, k)] for acc in sd["pending"].values() for sh, k in acc]
        self.pending = {}
        if self.packer is not None:  # a packed run's window, or (packing turned on) the accumulators
            self.packer.window = [self._packable(s) for s in waiting]
            self.packer.head_waits = int(sd.get("head_waits", 0))
        elif "window" in sd["pending"]:  # packing turned off: the window's samples go to their buckets
            for s in waiting:
                self.pending.setdefault(s["bucket"], []).append(s)
        else:
            self.pending = {b: [found[(sh, k)] for sh, k in acc] for b, acc in sd["pending"].items()}

    def load_elastic_state(self, states: list[dict]) -> str:
        """Continue a stream saved with another DP size, from every old DP rank's state_dict.

        Per-rank positions cannot carry over exactly (the old ranks read disjoint shard lists),
        so the carry-over is at shard granularity: the epoch the slowest old rank was in goes on
        with the shards no old rank had finished a read block of, split over the new ranks;
        later epochs are normal. Nothing of that epoch is skipped: the blocks old ranks were
        partway through are read again (at most one shuffle buffer per old rank repeats), and
        so are the shards of read-but-unbatched samples (which are dropped from the
        accumulators, or with packing from the packer windows: re-read with their shards, never
        lost). An old rank already in a later epoch has its progress there replayed.
        Returns a line for the log."""
        old = int(states[0]["dp_size"])
        ranks = sorted(int(s["dp_rank"]) for s in states)
        if ranks != list(range(old)):
            raise ValueError(f"data states of DP ranks {ranks} cannot describe a dp_size={old} run")
        for sd in states:
            for name in ("seed", "shuffle_buffer"):
                if sd[name] != getattr(self, name):
                    raise ValueError(f"data state was saved with {name}={sd[name]}, now "
                                     f"{getattr(self, name)}; keep it unchanged to resume")
            if sd["shards_digest"] != self._shards_digest():
                raise ValueError(f"the shard set in {self.folder} changed since the checkpoint; "
                                 "resume against the same sora-encode output")
        epoch = min(int(sd["epoch"]) for sd in states)
        # A rank past the resized epoch no longer saves its override: take it from those that do.
        overrides = {json.dumps(sd["epoch_override"]) for sd in states
                     if sd.get("epoch_override") and int(sd["epoch_override"][0]) == epoch}
        if len(overrides) > 1:
            raise ValueError("old DP ranks disagree on the shards of the resized epoch; the "
                             "checkpoint's rank states are not from one run")
        override = json.loads(overrides.pop()) if overrides else None
        everything = self.epoch_shards(epoch, override)
        done: set[str] = set()
        for sd in states:
            mine = everything[int(sd["dp_rank"])::old]
            if int(sd["epoch"]) > epoch:  # finished its share of this epoch
                done.update(n for n, _ in mine)
            else:
                for block in self._group_blocks(mine)[:int(sd["block"])]:
                    done.update(block)
        # Shards whose samples still waited in an accumulator are read again.
        done -= {shard for sd in states for acc in sd["pending"].values() for shard, _ in acc}
        remaining = [n for n, _ in everything if n not in done]
        self.epoch_override = (epoch, remaining)
        self.epoch, self.block, self.offset = epoch, 0, 0
        self.pending, self._block_key, self._prefetch = {}, None, None
        if self.packer is not None:  # the old windows' samples come back with their shards
            self.packer.window, self.packer.head_waits = [], 0
        self.batches_done = max(int(sd["batches_done"]) for sd in states)
        return (f"data stream carried over from dp_size={old} to {self.dp_size} at shard granularity: "
                f"epoch {epoch} continues with {len(remaining)} of its {len(everything)} shards")

"""Webdataset shard writer, per-rank done-lists, and the merged manifest.

Layout of an output folder (every DP rank of sora-encode writes only its own files):

  shard-r{rank:03d}-{idx:06d}.tar   samples <key>.latent.* / .text.* / .mask.npy / .json
  done-r{rank:03d}.jsonl            one line per *closed* shard (its inputs, counts per bucket)
  rejects-r{rank:03d}.jsonl         one line per rejected input (kind + reason)
  rank-r{rank:03d}.complete.json    written when the rank has finished its assignment
  manifest.json, rejects.jsonl      merged by rank 0 once every rank is complete
  made_by.json                      the text encoder and VAE that made the shards (also in the manifest)

Crash safety: a shard is written under a temp name and renamed only when full, so a shard on
disk is always complete. Its inputs are recorded in the done-list after the rename; if the
process dies between the two, `DoneList` recovers the inputs from the shard's own .json
members, so an input is never encoded twice and never lost. Inputs in a temp shard at the kill
are simply redone on the rerun.

Storage dtype (encode.storage_dtype, recorded per sample in its .json and merged into the
manifest): fp32 and fp16 latents/captions are .npy members; bf16 ones are .latent.bf16 /
.text.bf16 members of raw little-endian bfloat16 words (numpy has no bfloat16), their shapes in
the .json. Shards from before the field are fp32 .npy and read unchanged.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections import Counter
from typing import Iterable, Optional

import numpy as np
import torch
import webdataset as wds

from sora_dist.config.data import SHARDS_MANIFEST
from sora_dist.config.encode import STORAGE_DTYPES
from sora_dist.fsutil import atomic_write_text

SHARD_RE = re.compile(r"^shard-r(\d{3})-(\d{6})\.tar$")


def sample_key(source: str) -> str:
    """Stable key from the input's identity (webdataset keys must not contain dots)."""
    return hashlib.sha1(source.encode()).hexdigest()[:20]


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


FP16_MAX = 65504.0


def _bf16_bytes(a: np.ndarray) -> bytes:
    # torch's rounding (nearest, ties to even), so a stored value is exactly x.to(torch.bfloat16).
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()


def _bf16_array(b: bytes, shape) -> np.ndarray:
    """Raw bfloat16 words -> float32: a bf16 is the top half of the float32 with the same bits."""
    words = np.frombuffer(b, dtype="<u2")
    if words.size != int(np.prod(shape)):
        raise ValueError(f"{len(b)} bytes of bf16 do not hold shape {list(shape)}")
    return (words.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def _npy_array(b: bytes) -> np.ndarray:
    # Shards may come from anywhere: never unpickle (object arrays are refused).
    return np.load(io.BytesIO(b), allow_pickle=False)


def encode_members(name: str, a: np.ndarray, storage_dtype: str) -> dict:
    """{member: bytes} of one float array (`name` = "latent" or "text") in storage_dtype."""
    if storage_dtype == "bf16":
        return {f"{name}.bf16": _bf16_bytes(a)}
    if storage_dtype == "fp16":
        # fp16 overflows to inf silently; a latent or embedding that large wants bf16's range.
        peak = float(np.abs(a).max()) if a.size else 0.0
        if peak > FP16_MAX:
            raise ValueError(f"{name} has |x| = {peak:g} > {FP16_MAX:g}, which fp16 cannot hold; "
                             "use encode.storage_dtype=bf16 (fp32's range) or fp32")
        return {f"{name}.npy": _npy_bytes(a.astype(np.float16))}
    if storage_dtype == "fp32":
        return {f"{name}.npy": _npy_bytes(a.astype(np.float32))}
    raise ValueError(f"storage_dtype={storage_dtype!r}: use one of {STORAGE_DTYPES}")


def decode_arrays(raw: dict, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latent float32 (C,T,H,W), text float32 (L,D), mask bool (L,)) of one raw webdataset
    sample in any storage dtype. KeyError/ValueError when a member is missing or damaged."""
    out = []
    for name in ("latent", "text"):
        if f"{name}.bf16" in raw:
            out.append(_bf16_array(raw[f"{name}.bf16"], meta[f"{name}_shape"]))
        else:  # fp32 (as every shard before storage_dtype) or fp16 .npy
            out.append(_npy_array(raw[f"{name}.npy"]).astype(np.float32, copy=False))
    return out[0], out[1], _npy_array(raw["mask.npy"]).astype(bool, copy=False)


def _append_line(path: str, obj: dict) -> None:
    # One write() of one full line, then fsync: a kill leaves at most one partial last line,
    # which readers skip.
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: str) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # torn last line from a killed writer
    return out


def read_shard_meta(path: str) -> list[dict]:
    """The .json members of a finished shard (small; tensors are not read)."""
    metas = []
    with tarfile.open(path) as tf:
        for m in tf:
            if m.name.endswith(".json"):
                metas.append(json.loads(tf.extractfile(m).read()))
    return metas


class DoneList:
    """Which inputs are finished (encoded into a closed shard, or rejected), over all ranks.

    Reading every rank's list lets a rerun with a different world size still skip work. A
    shard renamed into place whose done-list line is missing (killed in between) is recovered
    from the tar itself; only its own rank (`rank`) writes that line back, so no two processes
    append to one file (O_APPEND is not atomic on NFS/Lustre). rank=None: recover in memory.
    """

    def __init__(self, out_dir: str, rank: Optional[int] = None):
        self.out_dir = out_dir
        self.shards: dict[str, dict] = {}    # shard name -> {"inputs", "buckets", "samples"}
        self.rejects: dict[str, dict] = {}   # source -> reject record
        for p in sorted(glob.glob(os.path.join(out_dir, "done-r*.jsonl"))):
            for rec in _read_jsonl(p):
                self.shards[rec["shard"]] = rec
        for p in sorted(glob.glob(os.path.join(out_dir, "rejects-r*.jsonl"))):
            for rec in _read_jsonl(p):
                self.rejects[rec["source"]] = rec
        # Shards renamed into place whose done-list line never got written (killed between).
        for path in list_shards(out_dir):
            name = os.path.basename(path)
            if name not in self.shards:
                owner = int(SHARD_RE.match(name).group(1))
                rec = shard_record(name, read_shard_meta(path))
                if owner == rank:
                    _append_line(os.path.join(out_dir, f"done-r{owner:03d}.jsonl"), rec)
                self.shards[name] = rec
        self.encoded = {s for rec in self.shards.values() for s in rec["inputs"]}
        # An input rejected once and encoded by a later retry is no longer a reject.
        self.rejects = {k: v for k, v in self.rejects.items() if k not in self.encoded}

    def is_done(self, source: str, retry_rejects: bool = False) -> bool:
        return source in self.encoded or (not retry_rejects and source in self.rejects)


def shard_record(name: str, metas: list[dict]) -> dict:
    # Samples from before storage_dtype was recorded are fp32.
    return {"shard": name, "samples": len(metas), "inputs": [m["source"] for m in metas],
            "buckets": dict(Counter(m["latent_bucket"] for m in metas)),
            "storage_dtypes": dict(Counter(m.get("storage_dtype", "fp32") for m in metas))}


def list_shards(out_dir: str, rank: Optional[int] = None) -> list[str]:
    out = []
    for p in sorted(glob.glob(os.path.join(out_dir, "shard-r*.tar"))):
        m = SHARD_RE.match(os.path.basename(p))
        if m and (rank is None or int(m.group(1)) == rank):
            out.append(p)
    return out


class ShardWriter:
    """Fixed samples per shard; temp name while open, renamed on close; rank-scoped names."""

    def __init__(self, out_dir: str, rank: int, samples_per_shard: int, storage_dtype: str = "fp32"):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={storage_dtype!r}: use one of {STORAGE_DTYPES}")
        self.out_dir, self.rank, self.per_shard = out_dir, rank, samples_per_shard
        self.storage_dtype = storage_dtype
        os.makedirs(out_dir, exist_ok=True)
        # Two live writers of one rank would clobber each other's temp shards and indices. flock
        # (not a marker file) so a killed run never leaves a stale lock: the kernel drops it.
        self._lock = open(os.path.join(out_dir, f".rank-r{rank:03d}.lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"another sora-encode process is writing rank {rank} shards in {out_dir}; "
                               "wait for it, or use a different output folder") from None
        # Temp shards of this rank left by a killed run hold nothing recorded: drop them.
        for p in glob.glob(os.path.join(out_dir, f".shard-r{rank:03d}-*.tar.tmp")):
            os.remove(p)
        existing = [int(SHARD_RE.match(os.path.basename(p)).group(2)) for p in list_shards(out_dir, rank)]
        self.next_idx = max(existing) + 1 if existing else 0
        self.done_path = os.path.join(out_dir, f"done-r{rank:03d}.jsonl")
        self.rejects_path = os.path.join(out_dir, f"rejects-r{rank:03d}.jsonl")
        self._tar = self._tmp = self._name = None
        self._metas: list[dict] = []
        self.shards_written: list[str] = []

    def _open(self) -> None:
        self._name = f"shard-r{self.rank:03d}-{self.next_idx:06d}.tar"
        self._tmp = os.path.join(self.out_dir, f".{self._name}.tmp")
        self._file = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._file)
        self._metas = []

    def write(self, latent: np.ndarray, text: np.ndarray, mask: np.ndarray, meta: dict) -> None:
        """latent float32 (C,T,H,W); text float32 (L,D); mask bool (L,); meta needs 'source'.
        Latent and text are stored in the writer's storage_dtype."""
        if self._tar is None:
            self._open()
        meta = dict(meta, latent_bucket="x".join(str(s) for s in latent.shape[1:]),
                    latent_shape=list(latent.shape), text_len=int(text.shape[0]),
                    text_shape=list(text.shape), storage_dtype=self.storage_dtype)
        try:
            self._write_sample(meta, latent, text, mask)
        except BaseException:
            # A half-written member would make the whole shard unreadable: drop this temp shard
            # (its inputs are not in the done-list, so a rerun redoes them).
            self._discard()
            raise
        self._metas.append(meta)
        if len(self._metas) >= self.per_shard:
            self.close_shard()

    def _write_sample(self, meta, latent, text, mask) -> None:
        self._tar.write({
            "__key__": sample_key(meta["source"]),
            **encode_members("latent", latent, self.storage_dtype),
            **encode_members("text", text, self.storage_dtype),
            "mask.npy": _npy_bytes(mask.astype(bool)),
            "json": json.dumps(meta).encode(),
        })

    def _discard(self) -> None:
        try:
            self._tar.close()  # closes tarfile's stream too, so nothing flushes into a closed file later
        except Exception:
            pass  # mid-member streams may refuse; the file is deleted below anyway
        try:
            if not self._file.closed:
                self._file.close()
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
            self._tar, self._metas = None, []

    def reject(self, source: str, kind: str, detail: str) -> None:
        _append_line(self.rejects_path, {"source": source, "kind": kind, "detail": detail, "rank": self.rank})

    def close_shard(self) -> Optional[str]:
        if self._tar is None:
            return None
        self._tar.close()  # closes the tar stream and the file
        if not self._file.closed:
            self._file.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        final = os.path.join(self.out_dir, self._name)
        os.replace(self._tmp, final)
        _append_line(self.done_path, shard_record(self._name, self._metas))
        self.shards_written.append(final)
        self.next_idx += 1
        self._tar = None
        return final

    def close(self) -> None:
        """Flush the last, possibly short, shard and release the rank lock."""
        self.close_shard()
        if not self._lock.closed:
            self._lock.close()


def mark_rank_complete(out_dir: str, rank: int, assignment_digest: str, stats: dict) -> None:
    atomic_write_text(os.path.join(out_dir, f"rank-r{rank:03d}.complete.json"),
                      json.dumps({"rank": rank, "assignment": assignment_digest, **stats}))


def assignment_digest(sources: Iterable[str]) -> str:
    h = hashlib.sha1()
    for s in sources:
        h.update(s.encode() + b"\0")
    return h.hexdigest()


def wait_for_ranks(out_dir: str, digests: dict[int, str], timeout_s: float, poll_s: float = 0.5) -> None:
    """Rank 0 waits (no process group needed) until every rank's completion marker matches
    the assignment rank 0 computes for it; a stale marker from another input set never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = []
        for r, d in digests.items():
            p = os.path.join(out_dir, f"rank-r{r:03d}.complete.json")
            try:
                with open(p) as f:
                    ok = json.load(f).get("assignment") == d
            except (OSError, json.JSONDecodeError):
                ok = False
            if not ok:
                missing.append(r)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:g}s; rerun sora-encode "
                               "(finished inputs are kept) or raise encode.wait_timeout_s")
        time.sleep(poll_s)


def write_manifest(out_dir: str, extra: dict) -> dict:
    """Merge every rank's done-list and rejects into manifest.json and rejects.jsonl (atomic)."""
    done = DoneList(out_dir)
    recs = [rec for n, rec in sorted(done.shards.items()) if os.path.exists(os.path.join(out_dir, n))]
    shards = [{"name": rec["shard"], "samples": rec["samples"], "buckets": rec["buckets"]} for rec in recs]
    buckets: Counter = Counter()
    dtypes: Counter = Counter()
    for rec in recs:
        buckets.update(rec["buckets"])
        # done-list lines from before storage_dtype: those shards are fp32
        dtypes.update(rec.get("storage_dtypes") or {"fp32": rec["samples"]})
    # Reruns into one folder may use different storage dtypes; the loader reads any mix.
    dtypes = {k: v for k, v in sorted(dtypes.items()) if v}
    manifest = {"format": "sora_dist.shards/1", "shards": shards,
                "num_samples": sum(s["samples"] for s in shards),
                "buckets": dict(sorted(buckets.items())),
                "storage_dtype": next(iter(dtypes)) if len(dtypes) == 1 else ("mixed" if dtypes else None),
                "storage_dtypes": dtypes,
                "num_rejected": len(done.rejects), **extra}
    atomic_write_text(os.path.join(out_dir, SHARDS_MANIFEST), json.dumps(manifest, indent=1))
    atomic_write_text(os.path.join(out_dir, "rejects.jsonl"),
                      "".join(json.dumps(r) + "\n" for _, r in sorted(done.rejects.items())))
    return manifest


def load_manifest(path: str) -> tuple[str, dict]:
    """Folder or manifest.json path -> (folder, manifest)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    mpath = os.path.join(folder, SHARDS_MANIFEST)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"data.shards={path!r}: no manifest.json there; run sora-encode to completion "
                                "(rank 0 writes it when every rank has finished)")
    with open(mpath) as f:
        return folder, json.load(f)


MADE_BY = "made_by.json"
# What two runs writing into one folder must agree on: anything else would mix embeddings of
# two encoders (or latents of two VAEs) under one manifest. Paths may differ (models move).
_MUST_MATCH = (("text_encoder", "model_type"), ("text_encoder", "text_dim"), ("text_encoder", "max_length"),
               ("vae", "class"), ("vae", "latent_channels"))


def describe_text_encoder(manifest: dict) -> str:
    """'umt5 text encoder 'text_encoder' (text_dim 4096)'; old manifests recorded only a path."""
    te = manifest.get("text_encoder")
    dim = (te.get("text_dim") if isinstance(te, dict) else None) or manifest.get("text_dim")
    if isinstance(te, dict):
        return f"{te.get('model_type', '?')} text encoder {te.get('name', '?')!r} (text_dim {dim})"
    where = f" {os.path.basename(os.path.normpath(te))!r}" if isinstance(te, str) and te else ""
    return f"text encoder{where} (text_dim {dim}; type not recorded)"


def describe_vae(manifest: dict) -> str:
    vae = manifest.get("vae") or {}
    ch = vae.get("latent_channels") or manifest.get("latent_channels")
    name = f" {vae['name']!r}" if vae.get("name") else ""
    return f"{vae.get('class', 'VAE')}{name} ({ch} latent channels)"


def _fingerprint(made_by: dict) -> dict:
    def field(part, name):  # old manifests: text_encoder is a bare path
        rec = made_by.get(part)
        return rec.get(name) if isinstance(rec, dict) else None

    out = {f"{a}.{b}": field(a, b) for a, b in _MUST_MATCH}
    # A manifest from before made_by was recorded still knows the widths.
    out["text_encoder.text_dim"] = out["text_encoder.text_dim"] or made_by.get("text_dim")
    out["vae.latent_channels"] = out["vae.latent_channels"] or made_by.get("latent_channels")
    return out


def check_made_by(out_dir: str, made_by: dict, record: bool = True) -> None:
    """Refuse to add shards made by other models to a folder that has shards; record ours
    (record=False: check only; sora-encode records on rank 0, so no two ranks write one file)."""
    path = os.path.join(out_dir, MADE_BY)
    old = None
    if list_shards(out_dir):
        for p in (path, os.path.join(out_dir, SHARDS_MANIFEST)):
            if os.path.isfile(p):
                with open(p) as f:
                    old = json.load(f)
                break
    if old is not None:
        a, b = _fingerprint(old), _fingerprint(made_by)
        diff = [f"{k} {a[k]!r} -> {b[k]!r}" for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]]
        if diff:
            raise ValueError(
                f"{out_dir} already holds shards made by the {describe_text_encoder(old)} and "
                f"{describe_vae(old)}; this run uses the {describe_text_encoder(made_by)} and "
                f"{describe_vae(made_by)} ({', '.join(diff)}). Encode into a new output folder, or "
                "delete the old shards first")
    if record:
        atomic_write_text(path, json.dumps(made_by, indent=1))

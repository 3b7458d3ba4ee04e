"""In-repo synthetic latent source with the same interface as the shard loader.

Sample i is a pure function of (seed, i): a smooth moving pattern in latent space whose
content depends on a caption id, and the caption's embedding. That gives the model something
learnable (overfit tests, demos) without files, and makes resume trivial to check.

Packing (data.packing): each DP rank reads its own stream of global sample positions (rank r:
base + r, base + r + dp, ...; after a DP resize first a `carry` list of positions the old
ranks left unread or waiting) into the packer (data/packing.py). A position's bucket is a
seeded draw from data.synthetic_buckets, so list images ([1, H, W]) and several aspect ratios
there for a mixed set. State: positions read + the packer window's positions; resume re-creates
the window, so the packs are exactly the uninterrupted run's.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from sora_dist.data.packing import BALANCE_NOTE, Packer, check_sample, collate_pack, pack_balance, resolve_packing


class SyntheticLatents:
    """Infinite iterator of bucketed batches for one DP rank.

    Batches never mix buckets: the stream of sample indices is cut per bucket into batches.
    Sample ids are strided over DP ranks (rank r takes r, r+dp, ...), so ranks are disjoint.
    """

    def __init__(self, cfg, in_channels: int, text_dim: int, dp_rank: int = 0, dp_size: int = 1,
                 patch_size=(1, 2, 2), model_cfg=None, exchange=None):
        self.cfg = cfg
        self.C, self.text_dim = in_channels, text_dim
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.buckets = [tuple(int(v) for v in b) for b in cfg.synthetic_buckets]
        self.batches_done = 0  # the whole resumable state: batches are a function of this
        # Where this DP layout's stream starts in the global one (non-zero after a DP resize):
        # global sample ids and the bucket cycle continue across the change.
        self.base_samples, self.base_batches = 0, 0
        self.packer, self.balance = None, None
        patch = tuple(int(p) for p in (patch_size or (1, 2, 2)))
        budget, self.layout_note = resolve_packing(cfg, self.buckets, patch, "data.synthetic_buckets")
        if budget:
            self.packer = Packer(budget, int(cfg.pack_window))
            # Every shape is known up front: fail at construction, naming the bucket.
            self.bucket_tokens = [check_sample(b, patch, self.packer.budget, f"data.synthetic_buckets entry {list(b)}")
                                  for b in self.buckets]
            self.balance = pack_balance(cfg, model_cfg, exchange, cfg.text_len)
            if self.balance is not None:
                self.layout_note += BALANCE_NOTE
            self.read = 0                 # positions of this rank's stream read so far
            self.carry: list[int] = []    # positions read first (left over by a DP resize)

    # ---- packing ------------------------------------------------------------------------------
    def _position(self, k: int) -> int:
        """Global sample position of this rank's k-th read."""
        if k < len(self.carry):
            return self.carry[k]
        return self.base_samples + (k - len(self.carry)) * self.dp_size + self.dp_rank

    def _packed_sample(self, pos: int) -> dict:
        idx = pos % self.cfg.synthetic_samples
        b = int(np.random.default_rng([self.cfg.seed, idx]).integers(len(self.buckets)))
        s = self._sample(idx, self.buckets[b])
        return {"latent": s["latent"], "text": s["text"], "mask": s["text_mask"], "key": pos,
                "tokens": self.bucket_tokens[b]}

    def _pull(self) -> dict:
        self.read += 1
        return self._packed_sample(self._position(self.read - 1))

    def _next_pack(self) -> dict:
        pack = self.packer.pack(self._pull, self.balance)
        self.batches_done += 1
        return collate_pack(pack)

    def _packed_state(self) -> dict:
        return {"read": self.read, "carry": list(self.carry), "window": [s["key"] for s in self.packer.window],
                "head_waits": self.packer.head_waits}

    def _load_packed(self, sd: dict) -> None:
        # A state saved without packing read batches_done * batch_size positions, no window.
        self.read = int(sd.get("read", int(sd["batches_done"]) * int(sd.get("batch_size", self.cfg.batch_size))))
        self.carry = [int(p) for p in sd.get("carry", [])]
        self.packer.window = [self._packed_sample(int(p)) for p in sd.get("window", [])]
        self.packer.head_waits = int(sd.get("head_waits", 0))

    def _load_elastic_packed(self, states: list[dict]) -> str:
        """DP resize with packing: ranks read different numbers of positions, so the stream is
        not contiguous. The new ranks start at the furthest position any old rank reached and
        first read (dealt round-robin, in position order) every position below it that no old
        rank emitted: the old windows, unread carry, and the gaps slower ranks left. Exact: no
        sample lost, none repeated."""
        old = int(states[0]["dp_size"])
        base = int(states[0].get("base_samples", 0))
        reads, carries = [], []
        for sd in states:
            read = int(sd.get("read", int(sd["batches_done"]) * int(sd.get("batch_size", self.cfg.batch_size))))
            carry = [int(p) for p in sd.get("carry", [])]
            reads.append(read)
            carries.append(carry)
        strided = [max(0, r - len(c)) for r, c in zip(reads, carries)]
        far = max(strided)
        left = [int(p) for sd in states for p in sd.get("window", [])]
        for sd, r, c, m in zip(states, reads, carries, strided):
            left += c[r:]
            left += [base + j * old + int(sd["dp_rank"]) for j in range(m, far)]
        left.sort()
        self.base_samples = base + far * old
        self.base_batches = int(states[0].get("base_batches", 0)) + max(int(sd["batches_done"]) for sd in states)
        self.batches_done, self.read, self.carry, self.packer.window = 0, 0, left[self.dp_rank::self.dp_size], []
        self.packer.head_waits = 0
        return (f"synthetic packed stream (dp_size {old} -> {self.dp_size}) continues at global sample "
                f"{self.base_samples}, after {len(left)} samples the old ranks left unread or waiting")

    def state_dict(self) -> dict:
        sd = {"batches_done": self.batches_done, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
              "batch_size": self.cfg.batch_size, "base_samples": self.base_samples,
              "base_batches": self.base_batches}
        return {**sd, **self._packed_state()} if self.packer is not None else sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("dp_size", self.dp_size) != self.dp_size:
            raise ValueError(
                f"synthetic data state was saved with dp_size={sd['dp_size']}, now {self.dp_size}; "
                "use load_elastic_state for a DP change"
            )
        self.batches_done = int(sd["batches_done"])
        self.base_samples = int(sd.get("base_samples", 0))
        self.base_batches = int(sd.get("base_batches", 0))
        if self.packer is not None:
            self._load_packed(sd)
        elif "read" in sd:
            raise ValueError("synthetic data state was saved with data.packing=true; set it again to resume "
                             "(a packed stream cannot continue as bucket batches exactly)")

    def load_elastic_state(self, states: list[dict]) -> str:
        """Continue a stream saved with another DP size (every old DP rank's state): exactly, as
        the global sample ids the old ranks consumed are contiguous. Returns a log line."""
        if self.packer is not None:
            return self._load_elastic_packed(states)
        if any("read" in s for s in states):
            raise ValueError("synthetic data state was saved with data.packing=true; set it again to resume")
        done = {int(s["batches_done"]) for s in states}
        if len(done) != 1:
            raise ValueError(f"old DP ranks disagree on batches done ({sorted(done)}); not one step's checkpoint")
        s0 = states[0]
        b = done.pop()
        self.base_samples = int(s0.get("base_samples", 0)) + b * int(s0.get("batch_size", self.cfg.batch_size)) * int(s0["dp_size"])
        self.base_batches = int(s0.get("base_batches", 0)) + b
        self.batches_done = 0
        return (f"synthetic stream continues exactly at global sample {self.base_samples} "
                f"(dp_size {s0['dp_size']} -> {self.dp_size})")

    def __iter__(self):
        return self

    def _sample(self, idx: int, bucket: tuple[int, int, int]) -> dict:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + idx)
        n_captions = 4
        cap = idx % n_captions
        T, H, W = bucket
        t = torch.arange(T).float()[:, None, None]
        y = torch.arange(H).float()[None, :, None]
        x = torch.arange(W).float()[None, None, :]
        phase = float(torch.rand((), generator=g)) * 2 * math.pi
        chans = []
        for c in range(self.C):
            fx, fy = 0.5 + 0.3 * ((cap + c) % 3), 0.4 + 0.2 * ((cap * 2 + c) % 3)
            chans.append(torch.sin(fx * x + fy * y + 0.7 * t + phase + c))
        latent = torch.stack(chans) + 0.05 * torch.randn(self.C, T, H, W, generator=g)
        L = self.cfg.text_len
        cg = torch.Generator().manual_seed(cap)
        text = torch.randn(L, self.text_dim, generator=cg)
        n_valid = 1 + cap % L
        mask = torch.arange(L) < n_valid
        text = text * mask[:, None]
        return {"latent": latent, "text": text, "text_mask": mask}

    def __next__(self) -> dict:
        if self.packer is not None:
            return self._next_pack()
        b = self.batches_done
        B = self.cfg.batch_size
        bucket = self.buckets[(self.base_batches + b) % len(self.buckets)]
        n = self.cfg.synthetic_samples
        ids = [(self.base_samples + (b * B + j) * self.dp_size + self.dp_rank) % n for j in range(B)]
        samples = [self._sample(i, bucket) for i in ids]
        self.batches_done += 1
        return {
            "latent": torch.stack([s["latent"] for s in samples]),
            "text": torch.stack([s["text"] for s in samples]),
            "text_mask": torch.stack([s["text_mask"] for s in samples]),
            "bucket": "x".join(map(str, bucket)),
            "ids": ids,
        }

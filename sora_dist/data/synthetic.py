"""In-repo synthetic latent source with the same interface as the shard loader.

Sample i is a pure function of (seed, i): a smooth moving pattern in latent space whose
content depends on a caption id, and the caption's embedding. That gives the model something
learnable (overfit tests, demos) without files, and makes resume trivial to check.
"""
from __future__ import annotations

import math

import torch


class SyntheticLatents:
    """Infinite iterator of bucketed batches for one DP rank.

    Batches never mix buckets: the stream of sample indices is cut per bucket into batches.
    Sample ids are strided over DP ranks (rank r takes r, r+dp, ...), so ranks are disjoint.
    """

    def __init__(self, cfg, in_channels: int, text_dim: int, dp_rank: int = 0, dp_size: int = 1):
        self.cfg = cfg
        self.C, self.text_dim = in_channels, text_dim
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.buckets = [tuple(int(v) for v in b) for b in cfg.synthetic_buckets]
        self.batches_done = 0  # the whole resumable state: batches are a function of this
        # Where this DP layout's stream starts in the global one (non-zero after a DP resize):
        # global sample ids and the bucket cycle continue across the change.
        self.base_samples, self.base_batches = 0, 0

    def state_dict(self) -> dict:
        return {"batches_done": self.batches_done, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "batch_size": self.cfg.batch_size, "base_samples": self.base_samples,
                "base_batches": self.base_batches}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("dp_size", self.dp_size) != self.dp_size:
            raise ValueError(
                f"synthetic data state was saved with dp_size={sd['dp_size']}, now {self.dp_size}; "
                "use load_elastic_state for a DP change"
            )
        self.batches_done = int(sd["batches_done"])
        self.base_samples = int(sd.get("base_samples", 0))
        self.base_batches = int(sd.get("base_batches", 0))

    def load_elastic_state(self, states: list[dict]) -> str:
        """Continue a stream saved with another DP size (every old DP rank's state): exactly, as
        the global sample ids the old ranks consumed are contiguous. Returns a log line."""
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

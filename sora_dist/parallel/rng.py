"""Model-parallel RNG: named random streams for regions where ranks hold different data.

Dropout on replicated activations must draw the same mask on every TP rank (the default
stream, seeded identically everywhere). Dropout on sharded activations (heads inside a TP
region, token shards under SP/CP) must draw different masks per shard, or all shards repeat
one pattern. Like Megatron's CudaRNGStatesTracker, but device-agnostic: states are plain
generator states of the default CPU or accelerator generator, swapped in by `fork()`.

Every stream, the default one included, is re-seeded at the start of each training step from
(seed, step, DP rank) (`seed_step`): DP ranks draw different masks for their different samples,
TP/CP/PP peers of one DP rank draw the same default-stream masks, and a resumed run draws what
the uninterrupted one would have, on any device, with no generator state in the checkpoint.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# Seed offsets keep the tracked streams apart from the default one (Megatron uses 2718).
TP_SEED_OFFSET = 2718
SEQ_SEED_OFFSET = 3141


def _get_state(device_type: str) -> torch.Tensor:
    if device_type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device_type).get_rng_state()


def _set_state(device_type: str, state: torch.Tensor) -> None:
    if device_type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device_type).set_rng_state(state)


def _seeded_state(device_type: str, seed: int) -> torch.Tensor:
    if device_type == "cpu":
        return torch.Generator().manual_seed(seed).get_state()
    mod = torch.get_device_module(device_type)
    dev = torch.device(device_type, mod.current_device())
    return torch.Generator(device=dev).manual_seed(seed).get_state()


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (order matters); stable across processes and versions."""
    h = 0x5D0A
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) % (2**63)
    return h


class RNGStatesTracker:
    """Named generator states; `with tracker.fork(name):` runs on that stream and saves where
    it stopped, leaving the default stream exactly as it was."""

    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: dict[str, int] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        self._seeds[name] = seed
        self._states[name] = _seeded_state(self.device_type, seed)

    def reseed(self, *salt: int) -> None:
        """Restart every stream from its seed mixed with `salt` (e.g. step, DP rank)."""
        for name, seed in self._seeds.items():
            self._states[name] = _seeded_state(self.device_type, mix_seed(seed, *salt))

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added; have {sorted(self._states)}")
        saved = _get_state(self.device_type)
        _set_state(self.device_type, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device_type)
            _set_state(self.device_type, saved)


def build_rng_tracker(seed: int, tp_rank: int, shard_rank: int, device_type: str) -> RNGStatesTracker:
    """"tp": differs per TP rank, same across DP/CP (head-/width-sharded activations).
    "seq": differs per token shard (shard_rank = position of this rank's tokens)."""
    tracker = RNGStatesTracker(device_type)
    tracker.add("tp", seed + TP_SEED_OFFSET + tp_rank)
    tracker.add("seq", seed + SEQ_SEED_OFFSET + shard_rank)
    return tracker


def seed_step(seed: int, step: int, dp_rank: int, trackers=()) -> None:
    """Randomness of one training step as a function of (seed, step, DP rank): the default
    generators (CPU and accelerator: torch.manual_seed seeds all) and every tracked stream."""
    torch.manual_seed(mix_seed(seed, step, dp_rank))
    for tracker in trackers:
        tracker.reseed(step, dp_rank)


class TrackedDropout(nn.Module):
    """nn.Dropout drawing its mask from a tracked stream (no parameters: FQNs unchanged)."""

    def __init__(self, p: float, tracker: RNGStatesTracker, stream: str):
        super().__init__()
        self.p, self.tracker, self.stream = p, tracker, stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with self.tracker.fork(self.stream):
            return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream!r}"


def checkpoint_context_fn(tracker: RNGStatesTracker):
    """`context_fn` for torch.utils.checkpoint: activation recompute replays the tracked
    streams from where the forward found them (checkpoint itself only restores the default
    stream), so recomputed dropout masks equal the original ones."""

    def context_fn():
        snapshot = tracker.get_states()

        @contextlib.contextmanager
        def recompute():
            current = tracker.get_states()
            tracker.set_states(snapshot)
            try:
                yield
            finally:
                tracker.set_states(current)

        return contextlib.nullcontext(), recompute()

    return context_fn

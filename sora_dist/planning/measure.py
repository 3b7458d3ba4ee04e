"""Measure on the real model what the planner estimates: bytes saved for backward, bytes a
forward leaves allocated, the allocator's high-water mark (CPU), plus tiny models and inputs
to measure them on.

The torch side of planning, kept out of the arithmetic modules (sora_dist.planning does not
import this one, so tools/plan.py stays torch-free); used by tools/plan.py --calibrate,
tools/bench_step.py, tools/bench_cp.py and the planner and context-parallel tests.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from sora_dist.config.model import DiTArgs
from sora_dist.models import model_class
from sora_dist.models.dit import VideoDiT
from sora_dist.parallel.activation_checkpoint import apply_activation_checkpointing
from sora_dist.parallel.rng import build_rng_tracker


def measure_saved_bytes(model, inputs: tuple) -> int:
    """Bytes of the storages autograd saves during one forward of `model(*inputs)` on this
    rank: unique storages (views count once), parameters excluded (they are not activations);
    DTensors (TP) count their local shard."""
    return saved_bytes_of(lambda: model(*inputs), model.parameters())


def _storages(t):
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:  # DTensor -> its local tensor
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
    else:
        yield t.untyped_storage()


def saved_bytes_of(fn, params=()) -> int:
    """measure_saved_bytes for any forward callable; `params` are left out."""
    skip = {s.data_ptr() for p in params for s in _storages(p)}
    seen: dict[int, int] = {}

    def pack(t):
        for s in _storages(t):
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _memory_events(prof) -> list:
    return [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]


def live_bytes_of(fn) -> int:
    """Bytes allocated while fn() runs and still live when it returns, its result excluded
    (CPU profiler memory events): everything a forward keeps for backward, whether autograd
    saved it or a checkpoint's op cache holds it (op-level SAC's outputs are not saved tensors,
    so saved_bytes_of cannot see them)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    net = sum(e.nbytes() for e in _memory_events(prof))
    return net - out.untyped_storage().nbytes()  # the result may view a larger buffer


def cpu_peak_bytes(step) -> int:
    """Allocator high-water mark (CPU profiler memory events) of running step() above what
    was live before it; step does its own backward."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cur = peak = 0
    for e in sorted(_memory_events(prof), key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def tiny_inputs(m: DiTArgs, grid_thw: tuple[int, int, int], batch: int, text_len: int,
                seed: int = 0):
    """Random latents/timesteps/captions for a VideoDiT of dims `m` (a quarter of the caption
    masked, as real padded captions are). grid_thw is the latent T, H, W."""
    g = torch.Generator().manual_seed(seed)
    T, H, W = grid_thw
    x = torch.randn(batch, m.in_channels, T, H, W, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, text_len, m.text_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[:, text_len - text_len // 4:] = False
    return x, t, text, mask


def build_model(m: DiTArgs, recompute: str = "none") -> VideoDiT:
    """The real VideoDiT for `m`, with the trainer's activation checkpointing."""
    model = model_class(m)(m)
    apply_activation_checkpointing(model, recompute, build_rng_tracker(0, 0, 0, "cpu"))
    return model

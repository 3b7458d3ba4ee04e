"""Model-parallel RNG tracker: per-shard streams, default stream untouched, recompute-safe."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from sora_dist.parallel.rng import (
    RNGStatesTracker, TrackedDropout, build_rng_tracker, checkpoint_context_fn,
)


def test_fork_leaves_default_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    tr = RNGStatesTracker()
    tr.add("tp", 123)
    with tr.fork("tp"):
        torch.rand(100)
    assert torch.equal(torch.rand(4), expected)


def test_streams_per_rank_and_progress():
    a0, a1 = build_rng_tracker(0, tp_rank=0, shard_rank=0, device_type="cpu"), \
        build_rng_tracker(0, tp_rank=1, shard_rank=1, device_type="cpu")
    b0 = build_rng_tracker(0, tp_rank=0, shard_rank=0, device_type="cpu")
    with a0.fork("tp"):
        x0 = torch.rand(8)
    with a1.fork("tp"):
        x1 = torch.rand(8)
    with b0.fork("tp"):
        y0 = torch.rand(8)
    assert not torch.equal(x0, x1)  # TP ranks differ
    assert torch.equal(x0, y0)      # same rank, same seed: same stream (every DP/CP replica)
    with a0.fork("tp"):
        assert not torch.equal(torch.rand(8), x0)  # the stream continues, not restarts
    with a0.fork("seq"):
        assert not torch.equal(torch.rand(8), x0)  # streams are distinct
    with pytest.raises(KeyError):
        with a0.fork("nope"):
            pass


def test_dropout_masks_replay_under_activation_checkpointing():
    tr = build_rng_tracker(0, 0, 0, "cpu")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), TrackedDropout(0.5, tr, "seq"), nn.Linear(16, 16))
    x = torch.randn(4, 16, requires_grad=True)

    states = tr.get_states()
    net(x).square().sum().backward()
    ref = [p.grad.clone() for p in net.parameters()] + [x.grad.clone()]

    net.zero_grad()
    x.grad = None
    tr.set_states(states)
    out = checkpoint(net, x, use_reentrant=False, context_fn=checkpoint_context_fn(tr))
    out.square().sum().backward()
    got = [p.grad for p in net.parameters()] + [x.grad]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert TrackedDropout(0.5, tr, "seq").eval()(x) is x


def test_seed_step_is_a_function_of_seed_step_and_dp_rank():
    from sora_dist.parallel.rng import seed_step
    tr = build_rng_tracker(0, tp_rank=0, shard_rank=1, device_type="cpu")

    def draw(step, dp_rank):
        seed_step(7, step, dp_rank, [tr])
        with tr.fork("seq"):
            a = torch.rand(4)
        return torch.cat([torch.rand(4), a])

    first = draw(3, 0)
    draw(4, 0)  # advancing the streams in between changes nothing
    assert torch.equal(draw(3, 0), first)
    assert not torch.equal(draw(3, 1), first)   # DP ranks differ
    assert not torch.equal(draw(4, 0), first)   # steps differ
    assert not torch.equal(first[:4], first[4:])  # tracked stream != default stream

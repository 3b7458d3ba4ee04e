"""ParallelDims: degrees from the config, clear layout errors, and rank coordinates that
match the DeviceMesh layout (torch.arange(world).view(mesh_shape), TP innermost)."""
from __future__ import annotations

import itertools

import pytest
import torch

from sora_dist.config import ConfigError, JobConfig, ParallelConfig, validate
from sora_dist.parallel.dims import ParallelDims


def pc(**kw) -> ParallelConfig:
    p = ParallelConfig()
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_degrees_and_dp_fill():
    d = ParallelDims.from_config(pc(tp=2, cp=4, cp_mode="hybrid", ulysses_degree=2, dp_replicate=2), 32)
    assert (d.dp_replicate, d.dp_shard, d.pp, d.cp_ring, d.cp_ulysses, d.tp) == (2, 2, 1, 2, 2, 2)
    assert d.dp == 4 and d.cp == 4 and d.world_size == 32
    assert ParallelDims.from_config(pc(cp=2, cp_mode="ulysses"), 4).cp_ulysses == 2
    assert ParallelDims.from_config(pc(cp=2, cp_mode="ring"), 4).cp_ring == 2


@pytest.mark.parametrize("kw, world, needle", [
    (dict(tp=2, cp=2, dp=3), 8, "tp*cp*pp*dp = 2*2*1*3 = 12 != world size 8"),
    (dict(tp=3), 8, "world size 8 is not divisible by tp*cp*pp=3*1*1=3"),
    (dict(tp=2, dp_replicate=3), 8, "dp=4 is not divisible by parallel.dp_replicate=3"),
])
def test_layout_errors_say_what_to_change(kw, world, needle):
    with pytest.raises(ConfigError) as e:
        ParallelDims.from_config(pc(**kw), world)
    assert needle in str(e.value)


@pytest.mark.parametrize("kw, needle", [
    (dict(tp=3), "num_heads=4 is not divisible by tp*ulysses=3*1"),
    (dict(tp=2, cp=4, cp_mode="ulysses"), "num_heads=4 is not divisible by tp*ulysses=2*4"),
    (dict(tp=2, cp=4, cp_mode="hybrid", ulysses_degree=4), "tp*ulysses=2*4"),
    (dict(cp=4, cp_mode="hybrid", ulysses_degree=3), "cp=4 is not divisible by parallel.ulysses_degree=3"),
])
def test_heads_must_divide_tp_times_ulysses(kw, needle):
    cfg = JobConfig()  # tiny flavor: 4 heads
    for k, v in kw.items():
        setattr(cfg.parallel, k, v)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_ring_does_not_constrain_heads():
    cfg = JobConfig()
    cfg.parallel.cp, cfg.parallel.cp_mode = 8, "ring"
    validate(cfg, world_size=8)


@pytest.mark.parametrize("kw, world", [
    (dict(tp=2, cp=2, cp_mode="ulysses"), 8),
    (dict(tp=2, cp=4, cp_mode="hybrid", ulysses_degree=2, dp_replicate=2), 32),
    (dict(pp=2, cp=2, cp_mode="ring"), 8),
])
def test_coords_match_mesh_layout(kw, world):
    d = ParallelDims.from_config(pc(**kw), world)
    grid = torch.arange(world).view(d.mesh_shape)
    for idx in itertools.product(*(range(s) for s in d.mesh_shape)):
        rank = int(grid[idx])
        c = d.coords(rank)
        assert tuple(c[n] for n in d.mesh_names) == idx
        # Flattened dims: row-major over their parts (how DeviceMesh._flatten numbers them).
        assert c["dp"] == c["dp_replicate"] * d.dp_shard + c["dp_shard"]
        assert c["cp"] == c["cp_ring"] * d.cp_ulysses + c["cp_ulysses"]
    # TP innermost: consecutive ranks are TP peers.
    assert [d.coords(r)["tp"] for r in range(d.tp)] == list(range(d.tp))


def test_tp_split_errors_name_the_fix():
    from sora_dist.parallel.tensor_parallel import check_tp_divisible

    check_tp_divisible(8, 256, 4)
    with pytest.raises(ValueError, match=r"num_heads=6 is not divisible by tp\*ulysses=4\*1"):
        check_tp_divisible(6, 256, 4)
    with pytest.raises(ValueError, match=r"MLP width 90 .*is not divisible by parallel.tp=4"):
        check_tp_divisible(8, 90, 4)


def test_tp_refuses_transformer_engine_linears():
    import torch.nn as nn

    from sora_dist.models import DiTArgs, VideoDiT
    from sora_dist.parallel.tensor_parallel import check_tp_linears

    model = VideoDiT(DiTArgs())
    check_tp_linears(model)
    fake_te = type("Linear", (nn.Linear,), {"__module__": "transformer_engine.pytorch.module.linear"})
    model.blocks["0"].mlp.fc1 = fake_te(64, 256)
    with pytest.raises(NotImplementedError, match="transformer-engine linears"):
        check_tp_linears(model)


@pytest.mark.parametrize("kw", [dict(cp=4, cp_mode="ulysses"), dict(cp=4, cp_mode="ring"),
                                dict(cp=4, cp_mode="hybrid", ulysses_degree=2)])
def test_mesh_splits_cp_by_the_configs_ulysses_degree(kw):
    """The mesh's Ulysses x ring split is config.parallel.ulysses_degree's mapping."""
    from sora_dist.config.parallel import ulysses_degree

    p = pc(**kw)
    d = ParallelDims.from_config(p, 4)
    assert d.cp_ulysses == ulysses_degree(p.cp_mode, p.cp, p.ulysses_degree)
    assert d.cp_ring * d.cp_ulysses == p.cp

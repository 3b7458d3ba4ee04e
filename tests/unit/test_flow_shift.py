"""Wan's flow-matching conventions (issue 12): timestep shift, diffusers' Euler grid and fed
timesteps, truncated training t (t_range), two-expert sampling, and their config checks."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sora_dist.config import ConfigError, JobConfig, validate
from sora_dist.config.diffusion import DiffusionConfig
from sora_dist.diffusion.flow import RectifiedFlow, shift_sigma, unshift_sigma

SHAPE = (2, 3, 2, 2, 2)  # B, C, T, H, W


class ToyVelocity(torch.nn.Module):
    """A fixed deterministic velocity field: a random channel mix of x plus a function of t,
    recording the timesteps it is fed."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(SHAPE[1], SHAPE[1], generator=g) * 0.5
        self.b = torch.randn(SHAPE[1:], generator=g)
        self.fed = []

    def forward(self, x, t, text, text_mask, drop=None):
        self.fed.append(t.clone())
        s = (t / 1000.0).view(-1, 1, 1, 1, 1)
        return torch.einsum("dc,bcthw->bdthw", self.W, x) + torch.sin(3 * s) * self.b + s * x


def diffusers_loop(model, noise, steps, shift):
    """Euler as diffusers runs it (WanPipeline's loop without CFG)."""
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(steps)
    x = noise
    for t in sch.timesteps:
        x = sch.step(model(x, t.expand(x.shape[0]), None, None), t, x, return_dict=False)[0]
    return x, sch


# ---- (a) the sampler is diffusers' Euler scheduler -----------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 6, 25])
def test_diffusers_grid_sampler_equals_flow_match_euler_scheduler(shift, steps):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ours, ref = ToyVelocity(), ToyVelocity()
    out = RectifiedFlow(shift=shift, grid="diffusers").sample(ours, noise, None, None, steps=steps)
    want, sch = diffusers_loop(ref, noise, steps, shift)
    assert torch.equal(RectifiedFlow(shift=shift, grid="diffusers").sigmas(steps), sch.sigmas)
    assert len(ours.fed) == len(ref.fed) == steps
    for a, b, t in zip(ours.fed, ref.fed, sch.timesteps):
        assert torch.equal(a, b) and float(a[0]) == float(t)  # the transformer sees sigma * 1000
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_uniform_grid_is_the_old_one_shifted_and_not_diffusers():
    """The default grid is unchanged (linspace(1, 0)); diffusers' ends at shift(shift(1e-3))."""
    for shift in (1.0, 5.0):
        f = RectifiedFlow(shift=shift)
        assert torch.equal(f.sigmas(8), shift_sigma(torch.linspace(1.0, 0.0, 9), shift))
        sch = FlowMatchEulerDiscreteScheduler(shift=shift)
        sch.set_timesteps(8)
        assert not torch.allclose(f.sigmas(8), sch.sigmas, atol=1e-4)
    assert torch.equal(RectifiedFlow().sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_shifted_sampler_keeps_conditioning_frames_and_recovers_a_point_mass():
    c = torch.randn(1, *SHAPE[1:])

    class Oracle(torch.nn.Module):  # v = (x_t - c) / t: the exact velocity towards c
        def forward(self, x, t, text, text_mask, drop=None):
            return (x - c) / (t / 1000.0).view(-1, 1, 1, 1, 1)

    for grid in ("uniform", "diffusers"):
        f = RectifiedFlow(shift=5.0, grid=grid)
        noise = torch.randn(SHAPE)
        assert torch.allclose(f.sample(Oracle(), noise, None, None, steps=6), c.expand(SHAPE), atol=1e-4)
        keep = torch.tensor([True, False])
        cond = torch.randn(SHAPE)
        out = f.sample(ToyVelocity(), noise, None, None, steps=5, cond_latent=cond, cond_frames_mask_T=keep)
        assert torch.equal(out[:, :, keep], cond[:, :, keep])
        assert not torch.allclose(out[:, :, 1], cond[:, :, 1])


# ---- (b) the training shift is diffusers' ----------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_shift_formula_is_diffusers_training_sigmas(shift):
    """diffusers' training scripts draw t then index scheduler.sigmas / scheduler.timesteps of the
    unset scheduler: the shifted grid k/1000. Our shift of those t is those sigmas, bit for bit,
    and the model time is its timesteps."""
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    t = torch.linspace(1, 1000, 1000).flip(0) / 1000
    f = RectifiedFlow(shift=shift)
    assert torch.equal(shift_sigma(t, shift), sch.sigmas)
    assert torch.equal(f.model_time(shift_sigma(t, shift)), sch.timesteps)
    torch.testing.assert_close(unshift_sigma(sch.sigmas, shift), t, rtol=1e-6, atol=0)


def test_training_t_is_the_shifted_logit_normal():
    plain = RectifiedFlow().sample_t(50000, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    shifted = RectifiedFlow(shift=3.0).sample_t(50000, g)
    assert torch.equal(shifted, shift_sigma(plain, 3.0))
    assert abs(float(shifted.median()) - 0.75) < 0.01  # shift(0.5) = 3 * 0.5 / 2
    # training_inputs corrupts with the shifted t and feeds t * 1000.
    x0 = torch.randn(4, *SHAPE[1:])
    f = RectifiedFlow(shift=3.0)
    x_t, mt, _, target = f.training_inputs(x0, torch.Generator().manual_seed(5))
    t = f.sample_t(4, torch.Generator().manual_seed(5))
    noise = target + x0
    assert torch.equal(mt, t * 1000)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise)


# ---- (c) t_range ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shift, t_range", [(5.0, (0.875, 1.0)), (5.0, (0.0, 0.875)), (1.0, (0.2, 0.3)),
                                            (3.0, (0.0, 0.001)), (1.0, (0.999, 1.0))])
def test_t_range_draws_the_truncated_distribution_deterministically(shift, t_range):
    lo, hi = t_range
    f = RectifiedFlow(shift=shift, t_range=t_range)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    t = f.sample_t(40000, g1)
    assert t.dtype == torch.float32 and lo <= float(t.min()) and float(t.max()) <= hi
    assert torch.equal(t, f.sample_t(40000, g2))  # same seed, same draws: exact resume
    # The generator advances exactly as without t_range, so the noise drawn next is the same.
    g3 = torch.Generator().manual_seed(7)
    RectifiedFlow(shift=shift).sample_t(40000, g3)
    assert torch.equal(torch.randn(5, generator=g1), torch.randn(5, generator=g3))
    # The draws follow the full distribution conditioned on [lo, hi] (not a rescaled copy).
    full = RectifiedFlow(shift=shift).sample_t(2_000_000, torch.Generator().manual_seed(8))
    inside = full[(full >= lo) & (full <= hi)]
    if inside.numel() > 2000:
        qs = torch.tensor([0.1, 0.5, 0.9])
        torch.testing.assert_close(t.quantile(qs), inside.quantile(qs), rtol=0, atol=0.02 * (hi - lo))


def test_t_range_of_two_experts_covers_the_full_distribution():
    """Drawing each expert's half with the probability mass of its range gives the full law."""
    full = RectifiedFlow(shift=5.0).sample_t(100000, torch.Generator().manual_seed(1))
    p_high = float((full >= 0.875).float().mean())
    assert 0.2 < p_high < 0.8
    high = RectifiedFlow(shift=5.0, t_range=(0.875, 1.0)).sample_t(100000, torch.Generator().manual_seed(2))
    low = RectifiedFlow(shift=5.0, t_range=(0.0, 0.875)).sample_t(100000, torch.Generator().manual_seed(3))
    mix = torch.cat([high[: int(p_high * 100000)], low[: 100000 - int(p_high * 100000)]])
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    torch.testing.assert_close(mix.quantile(qs), full.quantile(qs), rtol=0, atol=0.01)


# ---- (d) two experts ------------------------------------------------------------------------------
class Expert(torch.nn.Module):
    """Velocity 1 (cond) / 0 (uncond) plus `bias`, so CFG's output is the guidance scale + bias."""

    def __init__(self, name, calls, bias):
        super().__init__()
        self.name, self.calls, self.bias = name, calls, bias

    def forward(self, x, t, text, text_mask, drop=None):
        self.calls.append((self.name, float(t[0])))
        cond = torch.ones_like(x) if drop is None else (~drop).float().view(-1, 1, 1, 1, 1).expand_as(x)
        return cond + self.bias


@pytest.mark.parametrize("grid, shift, steps", [("uniform", 1.0, 8), ("diffusers", 5.0, 20), ("diffusers", 3.0, 7)])
def test_two_experts_switch_at_the_boundary_like_wan_pipeline(grid, shift, steps):
    boundary_ratio, gs, gs2 = 0.875, 4.0, 2.5
    calls = []
    high, low = Expert("high", calls, 0.0), Expert("low", calls, 0.5)
    f = RectifiedFlow(shift=shift, grid=grid)
    noise = torch.zeros(1, *SHAPE[1:])
    text, mask = torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool)
    out = f.sample(high, noise, text, mask, steps=steps, guidance_scale=gs,
                   model_2=low, boundary_ratio=boundary_ratio, guidance_scale_2=gs2)
    # WanPipeline's rule over the same timesteps: t >= boundary_ratio * 1000 -> transformer.
    sigmas = f.sigmas(steps)
    timesteps = sigmas[:-1] * 1000
    if grid == "diffusers":
        sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        sch.set_timesteps(steps)
        assert torch.equal(sch.timesteps, timesteps)
    want = ["high" if t >= boundary_ratio * 1000 else "low" for t in timesteps]
    assert [name for name, _ in calls] == want
    assert [t for _, t in calls] == timesteps.tolist()
    assert "high" in want and "low" in want
    if grid == "uniform":  # sigma 0.875 lands on the boundary: it belongs to the high-noise expert
        assert want[1] == "high" and float(timesteps[1]) == 875.0 and want[2] == "low"
    # Each step moved x by dt * (its expert's CFG output): gs for high, 0.5 + gs2 for low.
    v = torch.tensor([gs if w == "high" else 0.5 + gs2 for w in want])
    torch.testing.assert_close(out, torch.full_like(out, float(((sigmas[1:] - sigmas[:-1]) * v).sum())))


def test_two_expert_arguments_go_together():
    f, m = RectifiedFlow(), ToyVelocity()
    with pytest.raises(ValueError, match="model_2"):
        f.sample(m, torch.randn(SHAPE), None, None, steps=2, model_2=m)
    with pytest.raises(ValueError, match="boundary_ratio"):
        f.sample(m, torch.randn(SHAPE), None, None, steps=2, boundary_ratio=0.9)
    with pytest.raises(ValueError, match="guidance_scale_2"):
        f.sample(m, torch.randn(SHAPE), None, None, steps=2, guidance_scale_2=3.0)


# ---- (e) config ----------------------------------------------------------------------------------
def test_from_config_carries_the_flow_fields():
    f = RectifiedFlow.from_config(DiffusionConfig(objective="flow", sampler="euler", shift=5.0,
                                                  t_range=[0.875, 1.0], flow_grid="diffusers"))
    assert (f.shift, f.t_range, f.grid) == (5.0, (0.875, 1.0), "diffusers")
    with pytest.raises(ValueError, match="flow grid"):
        RectifiedFlow(grid="karras")


def flow_cfg(**diffusion):
    cfg = JobConfig()
    for k, v in {"objective": "flow", "sampler": "euler", **diffusion}.items():
        setattr(cfg.diffusion, k, v)
    return cfg


def test_wan_settings_validate():
    validate(flow_cfg(shift=5.0, t_range=[0.875, 1.0], flow_grid="diffusers"))
    validate(flow_cfg(shift=3.0, t_range=[0.0, 0.875]))


@pytest.mark.parametrize("diffusion, message", [
    ({"shift": 0.0}, "diffusion.shift=0.0 must be > 0 (1.0 = off; Wan uses 3.0 at 480p, 5.0 at 720p)"),
    ({"shift": -2.0}, "diffusion.shift=-2.0 must be > 0"),
    ({"t_range": [0.5, 0.5]}, "diffusion.t_range=[0.5, 0.5] must be two numbers [lo, hi] with 0 <= lo < hi <= 1"),
    ({"t_range": [0.9, 0.1]}, "diffusion.t_range=[0.9, 0.1] must be two numbers"),
    ({"t_range": [-0.1, 1.0]}, "diffusion.t_range=[-0.1, 1.0] must be two numbers"),
    ({"t_range": [0.0, 1.5]}, "diffusion.t_range=[0.0, 1.5] must be two numbers"),
    ({"t_range": [0.5]}, "diffusion.t_range=[0.5] must be two numbers"),
    ({"flow_grid": "karras"}, "diffusion.flow_grid='karras': use 'uniform' or 'diffusers'"),
    ({"t_range": [0.5, 1.0], "logit_std": 0.0}, "needs diffusion.logit_std=0.0 > 0"),
    ({"objective": "ddpm", "sampler": "ddpm", "shift": 5.0},
     "diffusion.shift=5.0 applies to rectified flow only, not objective='ddpm'; use "
     "diffusion.objective=flow (sampler=euler) or diffusion.shift=1.0"),
    ({"objective": "ddpm", "sampler": "ddim", "t_range": [0.875, 1.0]},
     "diffusion.t_range=[0.875, 1.0] applies to rectified flow only"),
    ({"objective": "ddpm", "sampler": "ddpm", "flow_grid": "diffusers"},
     "or diffusion.flow_grid='uniform'"),
])
def test_flow_fields_are_checked(diffusion, message):
    with pytest.raises(ConfigError) as e:
        validate(flow_cfg(**diffusion))
    assert message in str(e.value)
    # The field alone is fine in a flow run.
    ok = {k: v for k, v in diffusion.items() if k in ("objective", "sampler")}
    if ok:
        validate(flow_cfg(**{k: v for k, v in diffusion.items() if k not in ok}))


def test_ddpm_with_default_flow_fields_validates():
    validate(flow_cfg(objective="ddpm", sampler="ddpm"))
    validate(flow_cfg(objective="ddpm", sampler="ddpm", t_range=[0, 1]))  # ints from YAML

"""WanDiT against diffusers' WanTransformer3DModel on the same weights (fp32, CPU)."""
import pytest
import torch

from sora_dist.config.model import DiTArgs
from sora_dist.models.wan import WanDiT
from sora_dist.models.wan_weights import (
    diffusers_config, from_diffusers_key, from_diffusers_state_dict, to_diffusers_key,
)

diffusers = pytest.importorskip("diffusers")

T2V = DiTArgs(arch="wan", hidden_size=48, num_heads=4, depth=2, ffn_dim=72, in_channels=4, text_dim=24)
# TI2V-5B's shape family: 48 latent channels, wider heads relative to depth.
TI2V = DiTArgs(arch="wan", hidden_size=64, num_heads=2, depth=3, ffn_dim=96, in_channels=12, text_dim=16)


def reference(a: DiTArgs, seed: int = 0):
    cfg = {k: v for k, v in diffusers_config(a).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-inits nothing we rely on: randomise every weight
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = WanDiT(a).eval()
    ours.load_state_dict(from_diffusers_state_dict(ref.state_dict()), strict=True)
    return ref, ours


def wan_inputs(a, B, T, H, W, L=7, seed=1, lengths=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, a.in_channels, T, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    text = torch.randn(B, L, a.text_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    if lengths is not None:
        for i, n in enumerate(lengths):
            mask[i, n:] = False
    return x, t, text, mask


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_every_parameter_maps_one_to_one():
    ref, ours = reference(T2V)
    names = dict(ours.named_parameters())
    keys = dict(ref.named_parameters())
    assert {to_diffusers_key(n) for n in names} == set(keys)
    for n, p in names.items():
        assert keys[to_diffusers_key(n)].shape == p.shape, n
        assert from_diffusers_key(to_diffusers_key(n)) == n
    with pytest.raises(KeyError, match="blocks.0.attn1.to_x.weight"):
        from_diffusers_key("blocks.0.attn1.to_x.weight")


@pytest.mark.parametrize("a", [T2V, TI2V], ids=["t2v", "ti2v"])
@pytest.mark.parametrize("B, T, H, W", [(2, 3, 6, 10), (3, 5, 4, 2), (1, 1, 8, 6)])
def test_forward_equals_diffusers(a, B, T, H, W):
    ref, ours = reference(a)
    x, t, text, mask = wan_inputs(a, B, T, H, W)
    with torch.no_grad():
        want = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, text, mask)
    assert got.shape == want.shape == x.shape
    assert rel(got, want) < 1e-5


def test_caption_padding_is_zeroing():
    """Wan's captions are zeroed past their length: masking them equals handing diffusers the
    zero-padded caption, and a dropped caption equals the all-zero caption."""
    ref, ours = reference(T2V)
    x, t, text, mask = wan_inputs(T2V, 3, 2, 4, 6, lengths=[7, 3, 1])
    padded = text * mask[..., None]
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        want = ref(x, t, padded, return_dict=False)[0]
        got = ours(x, t, text, mask)
        assert rel(got, want) < 1e-5
        zero = padded.clone()
        zero[1] = 0
        assert rel(ours(x, t, text, mask, drop), ref(x, t, zero, return_dict=False)[0]) < 1e-5
        # and the padding really matters (the test can fail)
        assert rel(ours(x, t, text, torch.ones_like(mask)), want) > 1e-3


def test_param_count_matches_diffusers():
    ref, ours = reference(TI2V)
    n = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n == TI2V.num_params()


@pytest.mark.parametrize("flavor, billions", [("wan2.1-1.3b", 1.42), ("wan2.1-14b", 14.29), ("wan2.2-5b", 5.00)])
def test_flavors_have_the_released_sizes(flavor, billions):
    a = DiTArgs.from_flavor(flavor)
    with torch.device("meta"):
        m = WanDiT(a)
    n = sum(p.numel() for p in m.parameters())
    assert n == a.num_params()
    assert abs(n / 1e9 - billions) < 0.01


@pytest.mark.parametrize("a", [T2V, TI2V], ids=["t2v", "ti2v"])
def test_per_frame_timesteps_equal_diffusers_per_token(a):
    """Wan2.2 TI2V: the conditioning frame's tokens get t=0. diffusers takes a (B, S) timestep;
    WanDiT takes one per latent frame (B, T), constant over the frame's tokens."""
    ref, ours = reference(a)
    B, T, H, W = 2, 3, 6, 4
    x, _, text, mask = wan_inputs(a, B, T, H, W)
    t_BT = torch.tensor([[0.0, 700.0, 700.0], [0.0, 123.0, 123.0]])
    t_BS = t_BT.repeat_interleave((H // 2) * (W // 2), dim=1)
    with torch.no_grad():
        want = ref(x, t_BS, text, return_dict=False)[0]
        got = ours(x, t_BT, text, mask)
        assert rel(got, want) < 1e-5
        # ... and it is not what one timestep per sample gives
        assert rel(ours(x, t_BT[:, 1], text, mask), want) > 1e-3
    with pytest.raises(ValueError, match="one per latent frame"):
        ours(x, t_BT[:, :2], text, mask)


def test_row_modulation_gradients_equal_plain_indexing():
    """models/modulation.py's memory-saving functions against autograd through indexing."""
    from sora_dist.models.modulation import gated_add, modulate

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    shift, scale, gate = (torch.randn(2, 3, 8, generator=g) for _ in range(3))
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    leaves = [t.clone().requires_grad_() for t in (x, y, shift, scale, gate)]
    out = gated_add(modulate(leaves[0], leaves[2], leaves[3], rows), leaves[1], leaves[4], rows)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, y, shift, scale, gate)]
    rx, ry, rsh, rsc, rg = ref_leaves
    ref = rx * (1 + rsc[:, rows]) + rsh[:, rows] + ry * rg[:, rows]
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad)


def test_ti2v_sampling_equals_diffusers_expand_timesteps_loop():
    """Image-to-video the Wan2.2 TI2V way, against WanImageToVideoPipeline's expand_timesteps
    loop written with diffusers' own transformer and scheduler: the first latent frame stays
    the clean condition, its tokens get timestep 0, the rest follow the shifted Euler grid; CFG
    with a zero negative caption."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sora_dist.diffusion.flow import RectifiedFlow

    ref, ours = reference(TI2V)
    B, T, H, W, steps, shift, scale = 1, 3, 4, 6, 4, 5.0, 3.0
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(B, TI2V.in_channels, T, H, W, generator=g)
    cond = torch.randn(B, TI2V.in_channels, T, H, W, generator=g)
    text = torch.randn(B, 5, TI2V.text_dim, generator=g)
    mask = torch.ones(B, 5, dtype=torch.bool)
    frames = torch.tensor([True, False, False])

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    ffm = torch.ones_like(noise)
    ffm[:, :, 0] = 0  # diffusers' first_frame_mask
    lat = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            inp = (1 - ffm) * cond + ffm * lat
            ts = (ffm[0, 0][:, ::2, ::2] * t).flatten()[None].expand(B, -1)
            c = ref(inp, ts, text, return_dict=False)[0]
            u = ref(inp, ts, torch.zeros_like(text), return_dict=False)[0]
            lat = sched.step(u + scale * (c - u), t, lat, return_dict=False)[0]
        want = (1 - ffm) * cond + ffm * lat
        got = RectifiedFlow(shift=shift, grid="diffusers").sample(
            ours, noise, text, mask, steps=steps, guidance_scale=scale, cond_latent=cond,
            cond_frames_mask_T=frames, clean_cond_frames=True)
    assert torch.equal(got[:, :, 0], cond[:, :, 0])
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("per_frame", [False, True])
def test_compiled_blocks_with_op_recompute_equal_eager(per_frame):
    """The trainer's train.compile + op-level activation checkpointing on WanDiT blocks (incl.
    the per-frame row modulation's custom autograd functions) gives eager's output and grads."""
    import copy

    from sora_dist.parallel.activation_checkpoint import apply_activation_checkpointing
    from sora_dist.parallel.rng import build_rng_tracker

    _, eager = reference(T2V)
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(compiled, "op", build_rng_tracker(0, 0, 0, "cpu"))
    for blk in compiled.blocks.values():
        blk.compile()
    x, t, text, mask = wan_inputs(T2V, 2, 3, 4, 6)
    if per_frame:
        t = torch.stack([torch.zeros(2), t, t], dim=1)
    outs = []
    for m in (eager, compiled):
        out = m(x, t, text, mask)
        out.square().mean().backward()
        outs.append((out.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                                    for n, p in m.named_parameters()}))
    assert rel(outs[1][0], outs[0][0]) < 1e-5
    for n, g in outs[0][1].items():
        assert rel(outs[1][1][n], g) < 1e-4, n

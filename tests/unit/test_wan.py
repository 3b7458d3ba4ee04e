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

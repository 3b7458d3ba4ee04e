import pytest
import torch

from sora_dist.config import ModelConfig
from sora_dist.models.dit import VideoDiT, build_dit
from sora_dist.models.embeddings import PatchEmbed3D, apply_rope, build_rope_3d, unpatchify


def tiny(**kw) -> VideoDiT:
    m = build_dit(ModelConfig(**kw))
    m.init_weights(zero_init=False)
    return m


@pytest.mark.parametrize("thw, patch", [((3, 7, 9), (1, 2, 2)), ((5, 8, 8), (2, 2, 2)), ((1, 5, 3), (1, 2, 2)),
                                        ((4, 6, 10), (1, 1, 1))])
def test_output_shape_matches_odd_inputs(thw, patch):
    m = tiny(patch_size=list(patch))
    x = torch.randn(2, 4, *thw)
    out = m(x, torch.tensor([1, 500]), torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_variable_shapes_across_batches_same_model():
    m = tiny()
    for thw in [(2, 4, 4), (3, 6, 10), (1, 9, 7)]:
        x = torch.randn(1, 4, *thw)
        assert m(x, torch.tensor([3]), torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.bool)).shape == x.shape


def test_zero_init_output_is_zero():
    m = build_dit(ModelConfig())  # adaLN-Zero + zero final layer
    out = m(torch.randn(1, 4, 2, 4, 4), torch.tensor([10]), torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))
    assert out.abs().max() == 0


def test_patchify_roundtrip_is_identity():
    pe = PatchEmbed3D(3, 3 * 8, (2, 2, 2))
    x = torch.randn(1, 3, 4, 6, 8)
    # unpatchify of a patchified layout: emulate with rearranged raw patches
    from einops import rearrange
    raw = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=2, ph=2, pw=2)
    assert torch.equal(unpatchify(raw, (2, 3, 4), (2, 2, 2), 3, (4, 6, 8)), x)
    tokens, grid = pe(torch.randn(1, 3, 3, 5, 7))  # padded to 4x6x8
    assert grid == (2, 3, 4) and tokens.shape == (1, 24, 24)


def _identity_patch_embed(C: int, patch: tuple[int, int, int]) -> PatchEmbed3D:
    """PatchEmbed3D whose conv copies each patch's voxel (c, it, ih, iw) to output channel
    ((it * ph + ih) * pw + iw) * C + c: the (pt ph pw c) order unpatchify reads back."""
    pt, ph, pw = patch
    pe = PatchEmbed3D(C, C * pt * ph * pw, patch)
    w = torch.zeros_like(pe.proj.weight)  # (D, C, pt, ph, pw)
    for it in range(pt):
        for ih in range(ph):
            for iw in range(pw):
                for c in range(C):
                    w[((it * ph + ih) * pw + iw) * C + c, c, it, ih, iw] = 1.0
    with torch.no_grad():
        pe.proj.weight.copy_(w)
        pe.proj.bias.zero_()
    return pe


@pytest.mark.parametrize("thw, patch", [((4, 6, 8), (2, 2, 2)), ((3, 5, 7), (2, 2, 2)), ((5, 7, 4), (1, 2, 3)),
                                        ((2, 3, 9), (2, 3, 2)), ((1, 1, 1), (1, 2, 2))])
def test_patch_embed_then_unpatchify_recovers_the_input(thw, patch):
    """unpatchify(PatchEmbed3D(x)) with a copying projection gives x back: the token order
    (t, h, w), the per-token (pt, ph, pw, c) layout, the zero padding at the end of each axis and
    the crop all agree between the two. Non-cubic patches and grids catch swapped axes."""
    C = 3
    pe = _identity_patch_embed(C, patch)
    x = torch.randn(2, C, *thw)
    tokens, grid = pe(x)
    assert grid == tuple(-(-n // p) for n, p in zip(thw, patch))
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], C * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(tokens, grid, patch, C, thw), x)
    # Uncropped: the input zero-padded at the end of T, H and W.
    padded = tuple(g * p for g, p in zip(grid, patch))
    want = torch.zeros(2, C, *padded)
    want[:, :, :thw[0], :thw[1], :thw[2]] = x
    assert torch.equal(unpatchify(tokens, grid, patch, C, padded), want)


def test_text_mask_hides_padding_tokens():
    m = tiny()
    x, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([7])
    text = torch.randn(1, 6, 32)
    mask = torch.tensor([[True, True, True, False, False, False]])
    out1 = m(x, t, text, mask)
    text2 = text.clone()
    text2[:, 3:] = 100.0  # garbage behind the mask must not matter
    assert torch.allclose(out1, m(x, t, text2, mask), atol=1e-6)


def test_caption_drop_uses_null_caption():
    m = tiny()
    x, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([7, 7])
    mask = torch.ones(2, 5, dtype=torch.bool)
    a = m(x, t, torch.randn(2, 5, 32), mask, torch.tensor([True, True]))
    b = m(x, t, torch.randn(2, 5, 32), mask, torch.tensor([True, True]))
    assert torch.allclose(a, b, atol=1e-6)  # dropped captions: text content irrelevant
    c = m(x, t, torch.randn(2, 5, 32), mask, torch.tensor([False, False]))
    assert not torch.allclose(a, c, atol=1e-4)


def test_rope_is_relative_in_every_axis():
    # <R(p) q, R(p') k> depends only on p - p' per axis.
    hd = 24
    rope = build_rope_3d((4, 5, 6), hd).view(4, 5, 6, hd // 2, 2)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(a, b):
        qa = apply_rope(q.view(1, 1, 1, hd), rope[a].view(1, hd // 2, 2)).flatten()
        kb = apply_rope(k.view(1, 1, 1, hd), rope[b].view(1, hd // 2, 2)).flatten()
        return (qa * kb).sum()

    def add(p, d):
        return tuple(x + y for x, y in zip(p, d))

    assert torch.allclose(score((1, 2, 3), (0, 1, 1)), score((3, 4, 5), (2, 3, 3)), atol=1e-5)
    assert not torch.allclose(score((1, 2, 3), (0, 1, 1)), score((1, 2, 3), (0, 1, 2)), atol=1e-3)
    a, b = (1, 1, 2), (0, 2, 1)
    for axis in range(3):
        unit = tuple(int(i == axis) for i in range(3))
        # Shifting both positions along this axis alone keeps the score (relative) ...
        for d in (1, 2):
            shift = tuple(d * u for u in unit)
            assert torch.allclose(score(a, b), score(add(a, shift), add(b, shift)), atol=1e-5), (axis, d)
        # ... while changing the offset along this axis alone changes it (the axis is encoded).
        assert not torch.allclose(score(a, b), score(add(a, unit), b), atol=1e-3), axis
        assert not torch.allclose(score(a, b), score(a, add(b, unit)), atol=1e-3), axis
    # A shift in all axes at once.
    assert torch.allclose(score(a, b), score(add(a, (2, 2, 3)), add(b, (2, 2, 3))), atol=1e-5)


@pytest.mark.parametrize("flavor, lo, hi", [("1B", 0.7e9, 1.5e9), ("7B", 5e9, 9e9), ("30B", 2e10, 4e10)])
def test_flavor_names_match_their_size(flavor, lo, hi):
    from sora_dist.config import FLAVORS
    from sora_dist.models.dit import DiTArgs, count_params
    with torch.device("meta"):  # no memory: shapes only
        m = VideoDiT(DiTArgs(text_dim=4096, in_channels=16, **FLAVORS[flavor]))
    assert lo < count_params(m) < hi

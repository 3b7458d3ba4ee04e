"""VideoVAE: real diffusers classes with tiny random weights; chunked encode equals one-shot."""
import pytest
import torch

from sora_dist.models.vae import VideoVAE, build_tiny_vae


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return VideoVAE.load(build_tiny_vae(str(tmp_path_factory.mktemp("v") / "wan"), latent_channels=4))


def test_wan_shapes_and_factors(wan):
    assert wan.kind == "AutoencoderKLWan"
    assert (wan.latent_channels, wan.temporal_compression, wan.spatial_compression) == (4, 4, 8)
    x = torch.randint(0, 256, (9, 3, 32, 48), dtype=torch.uint8)
    z = wan.encode(x)
    assert z.shape == (1, 4, 3, 4, 6) and z.dtype == torch.float32
    assert wan.latent_shape(9, 32, 48) == (4, 3, 4, 6)


def test_wan_chunked_encode_matches_diffusers_and_normalises(wan):
    x = torch.randint(0, 256, (13, 3, 16, 16), dtype=torch.uint8)
    z = wan.encode(x)
    xf = x.permute(1, 0, 2, 3)[None].float() / 127.5 - 1
    mu = wan.model.encode(xf).latent_dist.mean
    mean = torch.tensor(wan.model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(wan.model.config.latents_std).view(1, -1, 1, 1, 1)
    assert not torch.allclose(mean, torch.zeros_like(mean))  # normalisation is non-trivial
    torch.testing.assert_close(z, (mu - mean) / std, atol=1e-5, rtol=1e-5)
    # float BCTHW input gives the same latents as uint8 TCHW
    torch.testing.assert_close(wan.encode(xf), z)


def test_wan_decode_shape_range_and_matches_diffusers(wan):
    z = torch.randn(1, 4, 2, 3, 5)
    y = wan.decode(z)
    assert y.shape == (1, 3, 5, 24, 40) and y.min() >= -1 and y.max() <= 1
    mean = torch.tensor(wan.model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(wan.model.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(y, wan.model.decode(z * std + mean).sample, atol=1e-5, rtol=1e-5)


def test_bad_frame_count_and_size(wan):
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        wan.encode(torch.zeros(8, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="spatial factor"):
        wan.encode(torch.zeros(5, 3, 20, 16, dtype=torch.uint8))


def test_cogvideox_fallback(tmp_path):
    vae = VideoVAE.load(build_tiny_vae(str(tmp_path / "cog"), kind="cogvideox"))
    assert vae.kind == "AutoencoderKLCogVideoX" and vae.latent_channels == 4
    z = vae.encode(torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8))
    assert z.shape == (1, 4, 3, 2, 2)
    assert vae.decode(z).shape == (1, 3, 9, 16, 16)


def test_missing_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_tiny_vae"):
        VideoVAE.load(str(tmp_path))


def test_wan22_patchified_layout(tmp_path):
    vae = VideoVAE.load(build_tiny_vae(str(tmp_path / "w22"), kind="wan2.2"))
    assert vae.spatial_compression == 16
    x = torch.randint(0, 256, (9, 3, 32, 48), dtype=torch.uint8)
    z = vae.encode(x)
    assert z.shape == (1, 4, 3, 2, 3)
    xf = x.permute(1, 0, 2, 3)[None].float() / 127.5 - 1
    mean = torch.tensor(vae.model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.model.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (vae.model.encode(xf).latent_dist.mean - mean) / std, atol=1e-5, rtol=1e-5)
    y = vae.decode(z)
    assert y.shape == (1, 3, 9, 32, 48)
    torch.testing.assert_close(y, vae.model.decode(z * std + mean).sample, atol=1e-5, rtol=1e-5)


def test_wan_tiling_for_large_frames(wan):
    x = torch.randint(0, 256, (5, 3, 48, 64), dtype=torch.uint8)
    plain = wan.encode(x)
    wan.enable_tiling(tile=32, stride=16)
    try:
        assert wan._tiled(48, 64) and not wan._tiled(32, 32)
        tiled = wan.encode(x)
        assert tiled.shape == plain.shape == (1, 4, 2, 6, 8)
        xf = x.permute(1, 0, 2, 3)[None].float() / 127.5 - 1
        mean = torch.tensor(wan.model.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(wan.model.config.latents_std).view(1, -1, 1, 1, 1)
        ref = wan.model.tiled_encode(xf)[:, :4]  # diffusers' tiled path, mu channels
        torch.testing.assert_close(tiled, (ref - mean) / std, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tiled, plain)  # really tiled (seams blended differently)
        assert wan.decode(tiled).shape == (1, 3, 5, 48, 64)
        with pytest.raises(ValueError, match="stride < tile"):
            wan.enable_tiling(tile=32, stride=32)
    finally:
        wan.model.disable_tiling()

"""VaeHandle on a tiny real AutoencoderKL: shapes, ranges, scaling, cropping, tiling, memory protocol."""
from __future__ import annotations

import os

import pytest
import torch

from nodes.models.tiny import tiny_checkpoint_models
from nodes.models.vae import VaeHandle

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint_models("sd1", seed=4)


@pytest.fixture()
def vae(ckpt) -> VaeHandle:
    return VaeHandle(ckpt.vae, device="cpu")


def test_encode_decode_shapes_and_range(vae) -> None:
    pixels = torch.rand(2, 64, 96, 3)
    latent = vae.encode(pixels)
    assert latent.shape == (2, vae.latent_channels, 8, 12) and latent.dtype == torch.float32
    assert vae.downscale_ratio == 8 and vae.latent_channels == 4
    image = vae.decode(latent)
    assert image.shape == (2, 64, 96, 3) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_latents_are_the_raw_vae_output(vae, ckpt) -> None:
    """ComfyUI's LATENT convention: VAEEncode gives the encoder distribution's mode unscaled."""
    pixels = torch.rand(1, 64, 64, 3)
    latent = vae.encode(pixels)
    with torch.no_grad():
        raw = ckpt.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(latent, raw, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ref = ckpt.vae.decode(raw).sample
    ref = ((ref + 1) / 2).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(vae.decode(latent), ref, atol=1e-5, rtol=1e-4)


def test_encode_is_deterministic(vae) -> None:
    pixels = torch.rand(1, 64, 64, 3)
    torch.testing.assert_close(vae.encode(pixels), vae.encode(pixels), rtol=0, atol=0)


def test_alpha_channel_is_ignored(vae) -> None:
    rgb = torch.rand(1, 64, 64, 3)
    rgba = torch.cat([rgb, torch.rand(1, 64, 64, 1)], dim=-1)
    torch.testing.assert_close(vae.encode(rgba), vae.encode(rgb), rtol=0, atol=0)


def test_non_multiple_of_8_is_center_cropped(vae) -> None:
    pixels = torch.rand(1, 69, 75, 3)  # 69 -> 64 (offset 2), 75 -> 72 (offset 1)
    cropped = vae.crop_pixels(pixels)
    assert cropped.shape == (1, 64, 72, 3)
    torch.testing.assert_close(cropped, pixels[:, 2:66, 1:73])
    assert vae.encode(pixels).shape == (1, 4, 8, 9)
    torch.testing.assert_close(vae.encode(pixels), vae.encode(pixels[:, 2:66, 1:73]), rtol=0, atol=0)
    with pytest.raises(ValueError):
        vae.encode(torch.rand(1, 7, 64, 3))


def test_tiled_decode(vae) -> None:
    latent = vae.encode(torch.rand(1, 64, 64, 3))
    whole = vae.decode(latent)
    # One tile covering everything is the plain decode.
    torch.testing.assert_close(vae.decode_tiled(latent, tile=8, overlap=2), whole, rtol=0, atol=1e-6)
    tiled = vae.decode_tiled(latent, tile=4, overlap=2)
    assert tiled.shape == whole.shape and tiled.min() >= 0 and tiled.max() <= 1
    # Tiles see less context (the VAE's mid-block attention is global), so only roughly equal.
    assert (tiled - whole).abs().mean() < 0.25


def test_decode_accepts_video_shaped_latents(vae) -> None:
    latent = vae.encode(torch.rand(2, 64, 64, 3))
    video = torch.stack([latent, latent], dim=2)  # [B, C, F, h, w]
    assert vae.decode(video).shape == (4, 64, 64, 3)


def test_memory_protocol_and_clone(vae, ckpt) -> None:
    fp = vae.footprint()
    assert set(fp) == {"cpu"}
    assert fp["cpu"] >= sum(p.numel() * p.element_size() for p in ckpt.vae.parameters())
    twin = vae.clone()
    assert twin.vae is vae.vae and twin.weights_key() == vae.weights_key()
    twin.to_device("cpu")
    assert twin.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 64, 64, 3)


def test_tile_blending_is_exact_for_local_operations() -> None:
    from nodes.models.vae import _tiled

    x = torch.randn(1, 4, 13, 17)

    def upscale(t: torch.Tensor) -> torch.Tensor:  # channels-last output like the VAE decode
        return t.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1).movedim(1, -1)

    out = _tiled(x, tile=6, overlap=2, scale=8, run=upscale, out_channels_last=True)
    torch.testing.assert_close(out, upscale(x), atol=1e-5, rtol=1e-5)


def test_tiled_encode_shape(vae) -> None:
    pixels = torch.rand(1, 64, 64, 3)
    out = vae._encode_tiled(pixels, tile=32, overlap=16)
    assert out.shape == (1, 4, 8, 8)
    torch.testing.assert_close(vae._encode_tiled(pixels, tile=64, overlap=16), vae.encode(pixels), rtol=0, atol=1e-6)


def test_out_of_memory_falls_back_to_smaller_batches_then_tiles(vae) -> None:
    calls: list[int] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x * 2

    x = torch.arange(4.0).view(4, 1)
    torch.testing.assert_close(vae._batched(x, run, tiled=lambda t: t), x * 2)
    assert calls[:2] == [4, 2] and calls[-4:] == [1, 1, 1, 1]

    def always_oom(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("out of memory")

    torch.testing.assert_close(vae._batched(x, always_oom, tiled=lambda t: t - 1), x - 1)

    def other_error(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        vae._batched(x, other_error, tiled=lambda t: t)

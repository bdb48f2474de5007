"""DiffusionModelHandle on tiny real UNets: apply() matches a direct diffusers call, SDXL extras, clones."""
from __future__ import annotations

import os

import pytest
import torch

from nodes.models.diffusion_model import DiffusionModelHandle
from nodes.models.tiny import tiny_checkpoint_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd1():
    return tiny_checkpoint_models("sd1", seed=5)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_checkpoint_models("sdxl", seed=6, prediction_type="v_prediction")


def test_sd1_apply_matches_unet(sd1) -> None:
    model = DiffusionModelHandle.from_checkpoint(sd1, device="cpu")
    assert model.arch == "sd1" and model.prediction_type == "epsilon"
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(1, 77, 32)
    out = model.apply(x, 500, {"context": context})
    with torch.no_grad():
        ref = sd1.unet(x, torch.tensor([500.0, 500.0]), encoder_hidden_states=context.expand(2, -1, -1)).sample
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Per-sample timesteps are honoured.
    t = torch.tensor([10.0, 900.0])
    out2 = model.apply(x, t, {"context": context, "control": None})
    assert not torch.allclose(out2, out)


def test_sdxl_needs_and_uses_pooled_and_size_cond(sdxl) -> None:
    model = DiffusionModelHandle.from_checkpoint(sdxl, device="cpu")
    assert model.arch == "sdxl" and model.prediction_type == "v_prediction"
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, 64)
    pooled = torch.randn(1, 32)
    size = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    with pytest.raises(ValueError):
        model.apply(x, 500, {"context": context})
    out = model.apply(x, 500, {"context": context, "pooled": pooled, "size_cond": size})
    other = model.apply(x, 500, {"context": context, "pooled": pooled,
                                 "size_cond": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])})
    assert out.shape == x.shape and not torch.allclose(out, other)


def test_control_residuals_are_added(sd1) -> None:
    model = DiffusionModelHandle.from_checkpoint(sd1, device="cpu")
    x = torch.randn(1, 4, 8, 8)
    cond = {"context": torch.randn(1, 77, 32)}
    base = model.apply(x, 300, cond)
    # Tiny SD1 UNet skips: conv_in, block 1 (resnet, downsampler), block 2 (resnet).
    down = [torch.zeros(1, 32, 8, 8), torch.zeros(1, 32, 8, 8), torch.zeros(1, 32, 4, 4), torch.zeros(1, 64, 4, 4)]
    mid = torch.full((1, 64, 4, 4), 0.5)
    zero = model.apply(x, 300, {**cond, "control": {"down": down, "mid": torch.zeros_like(mid)}})
    torch.testing.assert_close(zero, base, atol=1e-6, rtol=1e-6)
    with_mid = model.apply(x, 300, {**cond, "control": {"down": down, "mid": mid}})
    assert not torch.allclose(with_mid, base)
    with pytest.raises(ValueError):
        model.apply(x, 300, {**cond, "control": {"mid": mid}})


def test_clone_shares_weights_and_memory_protocol(sd1) -> None:
    model = DiffusionModelHandle.from_checkpoint(sd1, device="cpu")
    twin = model.clone()
    twin.prediction_type = "v_prediction"
    assert twin.unet is model.unet and model.prediction_type == "epsilon"
    fp = model.footprint()
    assert set(fp) == {"cpu"} and fp["cpu"] >= sum(p.numel() * 4 for p in sd1.unet.parameters())
    assert twin.weights_key() == model.weights_key()


def test_with_unet_swaps_weights_on_the_copy_only(sd1) -> None:
    import copy

    model = DiffusionModelHandle.from_checkpoint(sd1, device="cpu")
    other = copy.deepcopy(sd1.unet)
    with torch.no_grad():
        other.conv_out.bias.add_(1.0)
    patched = model.with_unet(other)
    x, cond = torch.randn(1, 4, 8, 8), {"context": torch.randn(1, 77, 32)}
    assert patched.unet is other and model.unet is sd1.unet
    assert patched.weights_key() != model.weights_key()
    torch.testing.assert_close(patched.apply(x, 100, cond), model.apply(x, 100, cond) + 1.0, atol=1e-5, rtol=1e-5)

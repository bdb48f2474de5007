"""The real spandrel load path: tiny random upscalers saved in their published key layouts, loaded through
UpscaleModelLoader and run through ImageUpscaleWithModel, plus tiling and wrong-file errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nodes.models.state_dict import ModelFileError
from nodes.models.upscale import upscale_tiles
from nodes.upscale import image_upscale_with_model, upscale_model_loader
from tests.torchvision_ops import require_spandrel

GROWTH = 32   # ESRGAN's dense-block growth channels: fixed by the architecture, not read from the file


def _rrdb_new_layout(in_ch: int = 3, nf: int = 8, blocks: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real-ESRGAN (BasicSR) key names: conv_first, body.N.rdbK.convJ, conv_body, conv_up1/2, conv_hr,
    conv_last. in_ch=12 is RealESRGAN x2, which pixel-unshuffles its input by 2 before conv_first."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, out_ch: int, in_c: int) -> None:
        sd[name + ".weight"] = torch.randn(out_ch, in_c, 3, 3, generator=gen) * 0.05
        sd[name + ".bias"] = torch.randn(out_ch, generator=gen) * 0.01

    conv("conv_first", nf, in_ch)
    for b in range(blocks):
        for r in (1, 2, 3):
            for c in range(1, 5):
                conv(f"body.{b}.rdb{r}.conv{c}", GROWTH, nf + (c - 1) * GROWTH)
            conv(f"body.{b}.rdb{r}.conv5", nf, nf + 4 * GROWTH)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, nf, nf)
    conv("conv_last", 3, nf)
    return sd


def _save(config, name: str, sd: dict[str, torch.Tensor]) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(config.models_dir / "upscale_models" / name))
    return name


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _run(name: str, h: int = 20, w: int = 24) -> tuple[object, torch.Tensor]:
    handle = upscale_model_loader(name)
    return handle, image_upscale_with_model(handle, _image(h, w))


def _assert_real_output(out: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert out.shape == shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 0, "a real network output, not a constant"


def test_esrgan_old_key_layout(sd_env):
    require_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN
    _, config = sd_env
    torch.manual_seed(0)
    sd = ESRGAN(num_filters=8, num_blocks=1, scale=4).state_dict()
    assert "model.0.weight" in sd and "model.1.sub.0.RDB1.conv1.0.weight" in sd   # the original ESRGAN layout
    handle, out = _run(_save(config, "esrgan-old-x4.safetensors", sd))
    assert handle.scale == 4
    _assert_real_output(out, (1, 80, 96, 3))


def test_esrgan_new_key_layout(sd_env):
    require_spandrel()
    _, config = sd_env
    handle, out = _run(_save(config, "realesrgan-x4.safetensors", _rrdb_new_layout()))
    assert handle.scale == 4
    _assert_real_output(out, (1, 80, 96, 3))


def test_realesrgan_x2_pixel_unshuffle(sd_env):
    require_spandrel()
    _, config = sd_env
    handle, out = _run(_save(config, "realesrgan-x2.safetensors", _rrdb_new_layout(in_ch=12)))
    assert handle.scale == 2
    _assert_real_output(out, (1, 40, 48, 3))


def test_swinir_transformer_upscaler(sd_env):
    require_spandrel()
    from spandrel.architectures.SwinIR import SwinIR
    _, config = sd_env
    torch.manual_seed(0)
    net = SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2,
                 upsampler="pixelshuffle")
    handle, out = _run(_save(config, "swinir-x2.safetensors", net.state_dict()), 16, 20)
    assert handle.scale == 2
    _assert_real_output(out, (1, 32, 40, 3))


def test_tiling_matches_untiled_with_bounded_tiles(sd_env):
    require_spandrel()
    _, config = sd_env
    handle = upscale_model_loader(_save(config, "realesrgan-x2-tiles.safetensors", _rrdb_new_layout(in_ch=12)))
    handle.ensure_loaded()
    image = _image(72, 80, seed=3).movedim(-1, 1)
    seen: list[tuple[int, int]] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return handle(x)

    with torch.no_grad():
        full = handle(image)
        tiled = upscale_tiles(image, model, 2, tile=32, overlap=16)
    assert tiled.shape == full.shape == (1, 3, 144, 160)
    assert len(seen) > 4 and max(max(s) for s in seen) <= 32, seen   # never more than one tile at a time
    assert (tiled - full).abs().mean() < 1e-2, (tiled - full).abs().mean()


def test_lora_file_is_rejected_naming_node_input_and_file(sd_env):
    require_spandrel()
    _, config = sd_env
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    name = _save(config, "some-lora.safetensors", lora)
    with pytest.raises(ModelFileError) as info:
        upscale_model_loader(name)
    assert name in str(info.value) and "not a recognised upscale model" in str(info.value)


def test_truncated_file_is_rejected_naming_the_file(sd_env):
    require_spandrel()
    _, config = sd_env
    name = _save(config, "cut-x4.safetensors", _rrdb_new_layout())
    path = config.models_dir / "upscale_models" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError) as info:
        upscale_model_loader(name)
    assert name in str(info.value)

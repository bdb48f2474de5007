"""Speed switches on tiny real models: attention backends agree, the automatic choice follows its rule,
half-precision dtypes per device, the fp16 VAE's fp32 fallback, channels_last and torch.compile."""
from __future__ import annotations

import contextlib
import copy
import logging
import os

import pytest
import torch

from engine.config import RuntimeConfig, reset_current_config, set_current_config
from nodes.model_patches import torch_compile_model
from nodes.models.diffusion_model import DiffusionModelHandle
from nodes.models.memory import compute_dtype
from nodes.models.speed import SpeedSettings, attention_shape, choose_attention, compile_unet, unet_dtype
from nodes.models.tiny import tiny_checkpoint_models
from nodes.models.vae import VaeHandle
from server.cli import build_parser, speed_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd1():
    return tiny_checkpoint_models("sd1", seed=11)


@contextlib.contextmanager
def speed(tmp_path, **options):
    token = set_current_config(RuntimeConfig(data_dir=tmp_path, speed=options))
    try:
        yield
    finally:
        reset_current_config(token)


def _inputs(batch: int = 2, size: int = 16):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(batch, 4, size, size, generator=gen), torch.randn(1, 77, 32, generator=gen)


def _processors(unet) -> set[str]:
    return {type(p).__name__ for p in unet.attn_processors.values()}


def test_every_attention_backend_gives_the_same_unet_output(sd1, tmp_path) -> None:
    model = DiffusionModelHandle(copy.deepcopy(sd1.unet), "sd1", device="cpu")
    x, context = _inputs()
    outs = {}
    for backend, processor in (("sdpa", "AttnProcessor2_0"), ("sliced", "SlicedAttnProcessor"),
                               ("basic", "AttnProcessor")):
        with speed(tmp_path, attention=backend):
            outs[backend] = model.apply(x, 500, {"context": context})
        assert _processors(model.unet) == {processor}
    torch.testing.assert_close(outs["sliced"], outs["sdpa"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs["basic"], outs["sdpa"], atol=1e-5, rtol=1e-4)
    assert outs["sdpa"].abs().sum() > 0


def test_automatic_attention_choice_follows_the_rule() -> None:
    big = dict(batch=2, heads=8, tokens=128 * 128, element_size=2)   # 1024px SD1: 128x128 latent tokens
    scores = 2 * 8 * (128 * 128) ** 2 * 2
    # CUDA: SDPA whatever the size (its flash/efficient kernels do not hold the score matrix).
    assert choose_attention("cuda", free_bytes=1 << 20, **big) == ("sdpa", None)
    # Elsewhere SDPA while the scores fit a quarter of the free memory ...
    assert choose_attention("cpu", free_bytes=scores * 4, **big) == ("sdpa", None)
    assert choose_attention("cpu", free_bytes=None, **big) == ("sdpa", None)
    # ... sliced beyond, with slices whose scores fit that quarter.
    backend, slices = choose_attention("cpu", free_bytes=scores, **big)
    assert backend == "sliced" and slices == 4     # 16 rows of batch*heads, a quarter of them at a time
    assert choose_attention("mps", free_bytes=1, **big) == ("sliced", 1)
    # A requested backend wins over the rule.
    assert choose_attention("cuda", free_bytes=None, requested="basic", **big) == ("basic", None)
    assert choose_attention("cpu", free_bytes=scores * 4, requested="sliced", **big)[0] == "sliced"
    assert choose_attention("cpu", free_bytes=1, requested="sdpa", **big) == ("sdpa", None)


def test_attention_shape_is_the_highest_resolution_attention_layer(sd1) -> None:
    from types import SimpleNamespace

    from nodes.models import detect
    assert attention_shape(sd1.unet.config, 16, 16) == (sd1.unet.config.attention_head_dim, 256)
    sdxl = SimpleNamespace(**detect.shipped_config("sdxl", "unet"))   # no attention in its first block
    assert attention_shape(sdxl, 128, 128) == (10, 64 * 64)
    sd15 = SimpleNamespace(**detect.shipped_config("sd1", "unet"))
    assert attention_shape(sd15, 64, 64) == (8, 64 * 64)


def test_unet_dtype_per_device_and_flag() -> None:
    auto, bf16, fp32 = SpeedSettings(), SpeedSettings(unet_dtype="bf16"), SpeedSettings(unet_dtype="fp32")
    assert unet_dtype("cpu", auto) == torch.float32             # half on the CPU only when asked
    assert unet_dtype("cpu", bf16) == torch.bfloat16
    assert unet_dtype("cuda", auto, capability=(8, 9)) == torch.float16
    assert unet_dtype("cuda", bf16, capability=(8, 0)) == torch.bfloat16
    assert unet_dtype("cuda", bf16, capability=(7, 5)) == torch.float16   # no bf16 before Ampere
    assert unet_dtype("cuda", auto, capability=(5, 2)) == torch.float32   # no fast fp16 either
    assert unet_dtype("cuda", fp32, capability=(9, 0)) == torch.float32
    with pytest.raises(ValueError, match="unet_dtype"):
        SpeedSettings(unet_dtype="fp8")


def test_loaders_follow_the_config(tmp_path) -> None:
    assert compute_dtype("cpu") == torch.float32 and compute_dtype("cpu", vae=True) == torch.float32
    with speed(tmp_path, unet_dtype="bf16", vae_dtype="fp16"):
        assert compute_dtype("cpu") == torch.bfloat16
        assert compute_dtype("cpu", vae=True) == torch.float16


def test_cli_flags_make_the_speed_options() -> None:
    parser = build_parser()

    def options(*flags: str) -> dict:
        return speed_options(parser.parse_args(["run", "w.json", *flags]))

    assert options() == {}
    assert options("--use-split-cross-attention", "--bf16-unet", "--fp16-vae") == {
        "attention": "sliced", "unet_dtype": "bf16", "vae_dtype": "fp16"}
    assert options("--use-pytorch-cross-attention", "--force-fp32") == {
        "attention": "sdpa", "unet_dtype": "fp32", "vae_dtype": "fp32"}
    assert options("--force-fp16", "--channels-last") == {"unet_dtype": "fp16", "channels_last": True}
    with pytest.raises(SystemExit):
        options("--fp16-unet", "--bf16-unet")


def test_bf16_unet_on_cpu_is_close_to_fp32(sd1, tmp_path) -> None:
    x, context = _inputs()
    ref = DiffusionModelHandle(sd1.unet, "sd1", device="cpu").apply(x, 500, {"context": context})
    half = DiffusionModelHandle(copy.deepcopy(sd1.unet).to(torch.bfloat16), "sd1", device="cpu")
    out = half.apply(x, 500, {"context": context})
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert not torch.equal(out, ref)     # it really ran in bf16


def test_fp16_vae_that_overflows_falls_back_to_fp32(sd1, caplog) -> None:
    vae = copy.deepcopy(sd1.vae)
    with torch.no_grad():    # activations past fp16's 65504 right at the decoder's input: inf, then NaN
        vae.decoder.conv_in.weight.mul_(3e4)
        vae.decoder.conv_in.bias.mul_(3e4)
    half = vae.half()
    reference = VaeHandle(copy.deepcopy(half).float(), device="cpu")   # the same (fp16-rounded) weights
    # a raw latent of the usual size (LATENT holds raw VAE latents: model-space noise / scaling factor)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) / reference.scaling_factor
    with torch.no_grad():
        raw = half.decode(latent.half()).sample
    assert not bool(torch.isfinite(raw).all())          # the fp16 decode really overflows
    handle = VaeHandle(half, device="cpu")
    with caplog.at_level(logging.WARNING, logger="nodes.models.vae"):
        image = handle.decode(latent)
    assert bool(torch.isfinite(image).all())
    torch.testing.assert_close(image, reference.decode(latent), atol=1e-5, rtol=1e-5)
    assert handle.dtype == torch.float32 and "float32" in caplog.text    # kept in fp32 afterwards
    torch.testing.assert_close(handle.decode(latent), image)


def test_channels_last_gives_the_same_output(sd1, tmp_path) -> None:
    model = DiffusionModelHandle(copy.deepcopy(sd1.unet), "sd1", device="cpu")
    x, context = _inputs()
    ref = model.apply(x, 500, {"context": context})
    with speed(tmp_path, channels_last=True):
        out = model.apply(x, 500, {"context": context})
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_compiled_unet_gives_the_same_output(sd1) -> None:
    # aot_eager traces the UNet through dynamo and AOTAutograd like inductor does, but runs the traced
    # graph with eager kernels: it checks the compile path without a minutes-long C++ build on this CPU.
    model = DiffusionModelHandle(copy.deepcopy(sd1.unet), "sd1", device="cpu")
    x, context = _inputs(size=8)
    ref = model.apply(x, 500, {"context": context})
    compiled = model.with_unet(compile_unet(model.unet, backend="aot_eager"))
    out = compiled.apply(x, 500, {"context": context})
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert compiled.unet is not model.unet and compiled.in_channels == model.in_channels


def test_torch_compile_model_node(sd1) -> None:
    model = DiffusionModelHandle(sd1.unet, "sd1", device="cpu")
    out = torch_compile_model(model, "inductor")
    assert isinstance(out.unet, torch._dynamo.eval_frame.OptimizedModule) and out.unet._orig_mod is sd1.unet
    assert model.unet is sd1.unet        # the input model is left alone
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="TorchCompileModel: input 'backend' cudagraphs needs a CUDA GPU"):
            torch_compile_model(model, "cudagraphs")


def test_torch_compile_model_schema_matches_comfyui(tmp_path) -> None:
    import nodes

    registry, _ = nodes.build_registry(RuntimeConfig(data_dir=tmp_path), plugins=False)
    info = registry.object_info()["TorchCompileModel"]
    assert info["category"] == "_for_testing" and info.get("experimental") is True
    assert list(info["input"]["required"]) == ["model", "backend"]
    assert info["input"]["required"]["backend"][0] == ["inductor", "cudagraphs"]
    assert info["output"] == ["MODEL"]

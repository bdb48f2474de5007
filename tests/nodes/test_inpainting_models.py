"""9-channel inpainting checkpoints (SD1 and SD2): the mask and the masked image's latent reach the
UNet as its extra input channels, from VAEEncodeForInpaint's latent and from InpaintModelConditioning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.executor import Executor
from nodes.conditioning import inpaint_model_conditioning
from nodes.latent import vae_encode_for_inpaint
from nodes.models.checkpoint import load_checkpoint
from nodes.models.diffusion_model import DiffusionModelHandle
from nodes.models.inpaint import BLANK_LATENT
from nodes.models.tiny import write_tiny_checkpoint
from nodes.models.vae import VaeHandle
from nodes.sampling.guidance import CFGDenoiser
from nodes.sampling.model_sampling import DiscreteSchedule

from .conftest import TINY_SD1

INPAINT_SD1 = "tiny-sd1-inpainting.safetensors"
INPAINT_SD2 = "tiny-sd2-inpainting.safetensors"


@pytest.fixture(scope="module")
def inpaint_files(sd_env):
    _, config = sd_env
    folder = config.models_dir / "checkpoints"
    for name, arch in ((INPAINT_SD1, "sd1"), (INPAINT_SD2, "sd2")):
        if not (folder / name).exists():
            write_tiny_checkpoint(folder / name, arch, seed=3, inpaint=True)
    return folder


def _image_and_mask(size=64):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((1, size, size, 3), generator=g)
    mask = torch.zeros((1, size, size))
    mask[:, 16:40, 8:48] = 1.0
    return pixels, mask


def _capture_unet_input(unet):
    seen = []
    hook = unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen, hook


def _denoise_once(model, positive, negative, latent):
    schedule = DiscreteSchedule(prediction_type=model.prediction_type)
    samples = latent["samples"]
    den = CFGDenoiser(model.apply, schedule, positive, negative, 7.0, latent_shape=tuple(samples.shape),
                      noise_mask=latent.get("noise_mask"),
                      latent_image=samples if latent.get("noise_mask") is not None else None)
    sigma = schedule.sigmas[-1:].expand(samples.shape[0]).clone()
    return den(samples + torch.randn_like(samples) * sigma.view(-1, 1, 1, 1), sigma)


def test_tiny_inpainting_checkpoint_loads_with_nine_channels(inpaint_files):
    for name, arch in ((INPAINT_SD1, "sd1"), (INPAINT_SD2, "sd2")):
        ckpt = load_checkpoint(inpaint_files / name)
        assert ckpt.arch == arch
        model = DiffusionModelHandle.from_checkpoint(ckpt)
        assert model.in_channels == 9 and model.is_inpaint


def test_vae_encode_for_inpaint_latent_and_mask_are_the_extra_channels(inpaint_files, sd_env):
    ckpt = load_checkpoint(inpaint_files / INPAINT_SD1)
    model, vae = DiffusionModelHandle.from_checkpoint(ckpt), VaeHandle(ckpt.vae)
    from nodes.models.text_encoder import ClipHandle
    clip = ClipHandle.from_checkpoint(ckpt)
    pixels, mask = _image_and_mask()
    latent = vae_encode_for_inpaint(pixels, vae, mask, 6)
    pos, neg = clip.encode_text("a cat"), clip.encode_text("")
    seen, hook = _capture_unet_input(model.unet)
    try:
        out = _denoise_once(model, pos, neg, latent)
    finally:
        hook.remove()
    assert out.shape == latent["samples"].shape and torch.isfinite(out).all()
    x = seen[0]
    assert x.shape[1] == 9
    want_mask = F.interpolate(latent["noise_mask"], size=x.shape[-2:], mode="bilinear").round()
    torch.testing.assert_close(x[:1, 4:5], want_mask)
    torch.testing.assert_close(x[:1, 5:], latent["samples"])  # model-space latent, not rescaled again
    assert 0 < float(want_mask.mean()) < 1


def test_inpaint_model_conditioning_puts_masked_latent_into_the_conditioning(inpaint_files):
    ckpt = load_checkpoint(inpaint_files / INPAINT_SD1)
    model, vae = DiffusionModelHandle.from_checkpoint(ckpt), VaeHandle(ckpt.vae)
    from nodes.models.text_encoder import ClipHandle
    clip = ClipHandle.from_checkpoint(ckpt)
    pixels, mask = _image_and_mask()
    pos, neg = clip.encode_text("a cat"), clip.encode_text("")
    p2, n2, latent = inpaint_model_conditioning(pos, neg, vae, pixels, mask, True)
    # the concat latent is the grey-masked image in the same (scaled) space as VAEEncodeForInpaint's latent
    grey = vae_encode_for_inpaint(pixels, vae, mask, 0)
    for cond in (p2, n2):
        opts = cond[0][1]
        torch.testing.assert_close(opts["concat_latent_image"], grey["samples"])
        assert opts["concat_mask"].shape == (1, 1, 64, 64)
        assert "pooled_output" in opts  # existing options are kept
    torch.testing.assert_close(latent["samples"], vae.encode(pixels))  # the latent is the whole image's
    assert latent["noise_mask"].shape == (1, 1, 64, 64)
    _, _, no_mask_latent = inpaint_model_conditioning(pos, neg, vae, pixels, mask, False)
    assert "noise_mask" not in no_mask_latent

    seen, hook = _capture_unet_input(model.unet)
    try:
        _denoise_once(model, p2, n2, no_mask_latent)  # no noise mask: the conditioning alone carries it
    finally:
        hook.remove()
    x = seen[0]
    torch.testing.assert_close(x[:1, 5:], grey["samples"])
    torch.testing.assert_close(x[:1, 4:5], F.interpolate(mask[:, None], size=(8, 8), mode="bilinear").round())


def test_without_any_mask_the_model_sees_a_blank_image_fully_masked(inpaint_files):
    ckpt = load_checkpoint(inpaint_files / INPAINT_SD2)
    model = DiffusionModelHandle.from_checkpoint(ckpt)
    from nodes.models.text_encoder import ClipHandle
    clip = ClipHandle.from_checkpoint(ckpt)
    latent = {"samples": torch.zeros((2, 4, 8, 8))}
    seen, hook = _capture_unet_input(model.unet)
    try:
        _denoise_once(model, clip.encode_text("x"), clip.encode_text(""), latent)
    finally:
        hook.remove()
    x = seen[0]
    assert torch.equal(x[:, 4], torch.ones_like(x[:, 4]))
    for c, v in enumerate(BLANK_LATENT):
        assert torch.allclose(x[:, 5 + c], torch.full_like(x[:, 5 + c], v))


def _inpaint_prompt(ckpt_name, variant):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example_masked.png"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": "inpaint-model", "images": ["7", 0]}},
    }
    sampler = {"seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
               "model": ["1", 0]}
    if variant == "vae_encode":
        prompt["3"] = {"class_type": "VAEEncodeForInpaint",
                       "inputs": {"pixels": ["2", 0], "vae": ["1", 2], "mask": ["2", 1], "grow_mask_by": 6}}
        sampler.update(positive=["4", 0], negative=["5", 0], latent_image=["3", 0])
    else:
        prompt["3"] = {"class_type": "InpaintModelConditioning",
                       "inputs": {"positive": ["4", 0], "negative": ["5", 0], "vae": ["1", 2], "pixels": ["2", 0],
                                  "mask": ["2", 1], "noise_mask": variant == "conditioning"}}
        sampler.update(positive=["3", 0], negative=["3", 1], latent_image=["3", 2])
    prompt["6"] = {"class_type": "KSampler", "inputs": sampler}
    return prompt


@pytest.mark.parametrize("ckpt", [INPAINT_SD1, INPAINT_SD2, TINY_SD1])
@pytest.mark.parametrize("variant", ["vae_encode", "conditioning", "conditioning_no_noise_mask"])
def test_inpainting_workflows_run_on_inpainting_and_plain_models(sd_env, inpaint_files, ckpt, variant):
    registry, config = sd_env
    result = Executor(registry).execute(_inpaint_prompt(ckpt, variant), f"inpaint-{ckpt}-{variant}")
    assert result.status == "success", result.error
    assert result.outputs["8"]["images"]


def test_inpaint_model_conditioning_rejects_mismatched_mask_batch(inpaint_files):
    ckpt = load_checkpoint(inpaint_files / INPAINT_SD1)
    vae = VaeHandle(ckpt.vae)
    pixels = torch.rand((2, 64, 64, 3))
    mask = torch.zeros((3, 64, 64))
    with pytest.raises(ValueError, match="mask"):
        inpaint_model_conditioning([], [], vae, pixels, mask, True)


def test_pix2pix_models_take_the_concat_image_and_inpainting_models_the_mask(inpaint_files):
    from diffusers import UNet2DConditionModel

    from nodes.models.inpaint import model_concat
    from nodes.models.tiny import tiny_configs

    cfg = tiny_configs("sd1")["unet"]
    cfg["in_channels"] = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ip2p = DiffusionModelHandle(UNet2DConditionModel.from_config(cfg).eval(), "sd1")
    image = torch.randn(1, 4, 8, 8)
    concat = model_concat({"concat_latent_image": image}, None, None, (2, 4, 8, 8))
    assert concat.shape == (2, 9, 8, 8)
    context = torch.randn(1, 77, 32)
    seen, hook = _capture_unet_input(ip2p.unet)
    try:
        ip2p.apply(torch.randn(2, 4, 8, 8), 500.0, {"context": context, "concat": concat})
        ip2p.apply(torch.randn(2, 4, 8, 8), 500.0, {"context": context})
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0][:, 4:], image.expand(2, 4, 8, 8))
    assert torch.equal(seen[1][:, 4:], torch.zeros(2, 4, 8, 8))
    # the same entry on an inpainting model: no mask anywhere, so blank mask + image (as ComfyUI)
    model = DiffusionModelHandle.from_checkpoint(load_checkpoint(inpaint_files / INPAINT_SD1))
    seen, hook = _capture_unet_input(model.unet)
    try:
        model.apply(torch.randn(2, 4, 8, 8), 500.0, {"context": context, "concat": concat})
    finally:
        hook.remove()
    assert torch.equal(seen[0][:, 4], torch.ones(2, 8, 8))

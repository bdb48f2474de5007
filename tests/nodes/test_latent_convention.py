"""LATENT in ComfyUI's convention: raw VAE latents, the model's latent format applied by sampling.

The old sdflow path (scaled latents everywhere, nothing rescaled in sampling) is rebuilt in each test
by calling ``sample`` with model-space inputs and no latent format; the new path must give the same
result up to the scale, including noise masks and the 9-channel inpainting concat.
"""
from __future__ import annotations

import pytest
import torch

from nodes.conditioning import inpaint_model_conditioning
from nodes.latent import vae_encode
from nodes.models.checkpoint import load_checkpoint
from nodes.models.diffusion_model import DiffusionModelHandle
from nodes.models.text_encoder import ClipHandle
from nodes.models.tiny import write_tiny_checkpoint
from nodes.models.vae import VaeHandle
from nodes.sampler_nodes import common_ksampler
from nodes.sampling.sample import prepare_noise, sample

SD1_SCALE = 0.18215


@pytest.fixture(scope="module")
def inpaint_stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("latent-convention") / "tiny-sd1-inpainting.safetensors"
    write_tiny_checkpoint(path, "sd1", seed=3, inpaint=True)
    ckpt = load_checkpoint(path)
    return DiffusionModelHandle.from_checkpoint(ckpt), ClipHandle.from_checkpoint(ckpt), VaeHandle(ckpt.vae)


def _pixels_and_mask(size=64):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((1, size, size, 3), generator=g)
    mask = torch.zeros((1, size, size))
    mask[:, 16:40, 8:48] = 1.0
    return pixels, mask


def _old_path(model, pos, neg, samples, *, seed, denoise, noise_mask=None, scale=SD1_SCALE):
    """What sdflow computed before the switch: every latent (and concat latent) already scaled."""
    def scaled(conds):
        return [[c[0], {**c[1], "concat_latent_image": c[1]["concat_latent_image"] * scale}]
                if "concat_latent_image" in c[1] else c for c in conds]
    return sample(model.apply, model.sampling_schedule(), noise=prepare_noise(samples, seed),
                  latent_image=samples * scale, positive=scaled(pos), negative=scaled(neg), cfg=5.0,
                  sampler_name="euler", scheduler="normal", steps=4, seed=seed, denoise=denoise,
                  noise_mask=noise_mask)


def test_model_latent_formats_are_comfyuis():
    from nodes.models.diffusion_model import LATENT_FORMATS
    assert LATENT_FORMATS["sd1"] == LATENT_FORMATS["sd2"] == (0.18215, 0.0)
    assert LATENT_FORMATS["sdxl"] == LATENT_FORMATS["sdxl_refiner"] == (0.13025, 0.0)
    assert LATENT_FORMATS["sd3"] == (1.5305, 0.0609)


def test_vae_encode_node_gives_the_raw_encoder_mode(inpaint_stack):
    _, _, vae = inpaint_stack
    pixels, _ = _pixels_and_mask()
    with torch.no_grad():
        raw = vae.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(vae_encode(pixels, vae)["samples"], raw, atol=1e-5, rtol=1e-5)


def test_img2img_with_noise_mask_is_unchanged_by_the_switch(inpaint_stack):
    model, clip, vae = inpaint_stack
    pixels, mask = _pixels_and_mask()
    pos, neg = clip.encode_text("a cat"), clip.encode_text("")
    latent = {"samples": vae.encode(pixels), "noise_mask": mask[:, None]}
    new = common_ksampler(model, 11, 4, 5.0, "euler", "normal", pos, neg, latent, denoise=0.6)["samples"]
    old = _old_path(model, pos, neg, latent["samples"], seed=11, denoise=0.6, noise_mask=mask[:, None])
    torch.testing.assert_close(new * SD1_SCALE, old, atol=1e-4, rtol=1e-4)
    # outside the mask the raw input comes back exactly: the blend is undone by the same scale
    keep = (torch.nn.functional.interpolate(mask[:, None], size=new.shape[-2:]) == 0).expand_as(new)
    torch.testing.assert_close(new[keep], latent["samples"][keep], atol=1e-5, rtol=1e-5)
    assert float((new - latent["samples"]).abs().max()) > 1e-2  # the masked part was sampled


def test_nine_channel_concat_reaches_the_unet_scaled_and_output_is_unchanged(inpaint_stack):
    model, clip, vae = inpaint_stack
    pixels, mask = _pixels_and_mask()
    pos, neg = clip.encode_text("a cat"), clip.encode_text("")
    p2, n2, latent = inpaint_model_conditioning(pos, neg, vae, pixels, mask, False)
    raw_concat = p2[0][1]["concat_latent_image"]
    seen = []
    hook = model.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        new = common_ksampler(model, 5, 4, 5.0, "euler", "normal", p2, n2, latent, denoise=1.0)["samples"]
    finally:
        hook.remove()
    assert seen and seen[0].shape[1] == 9
    # the UNet takes the masked image's latent in model space (ComfyUI's process_latent_in on concat)
    torch.testing.assert_close(seen[0][:1, 5:], raw_concat * SD1_SCALE, atol=1e-5, rtol=1e-5)
    old = _old_path(model, p2, n2, latent["samples"], seed=5, denoise=1.0)
    torch.testing.assert_close(new * SD1_SCALE, old, atol=1e-4, rtol=1e-4)


def test_txt2img_decodes_to_the_same_image_as_the_old_path(inpaint_stack):
    model, clip, vae = inpaint_stack
    pos, neg = clip.encode_text("a red cube"), clip.encode_text("")
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    new = common_ksampler(model, 3, 4, 5.0, "euler", "normal", pos, neg, empty)["samples"]
    old = _old_path(model, pos, neg, empty["samples"], seed=3, denoise=1.0)
    image = vae.decode(new)
    with torch.no_grad():  # the old VaeHandle.decode divided the scaled latent by the scaling factor
        ref = ((vae.vae.decode(old / SD1_SCALE).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(image, ref, atol=1e-4, rtol=1e-4)
    assert float(image.std()) > 0.01

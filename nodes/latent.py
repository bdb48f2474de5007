"""Latent nodes: empty latents, VAE encode/decode, inpainting masks and latent resizing."""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F

from engine.inputs import Combo, Float, Int
from engine.node import node

from . import costs
from .imaging import LATENT_METHODS, keep_aspect, resize
from .models.memory import default_device
from .types import MAX_RESOLUTION, Image, Latent, Mask, Vae


@node("EmptyLatentImage", category="latent", cost=costs.empty_latent)
def empty_latent_image(width: Annotated[int, Int(512, min=16, max=MAX_RESOLUTION, step=8, tooltip="The width of the latent images in pixels.")],
                       height: Annotated[int, Int(512, min=16, max=MAX_RESOLUTION, step=8, tooltip="The height of the latent images in pixels.")],
                       batch_size: Annotated[int, Int(1, min=1, max=4096, tooltip="The number of latent images in the batch.")]) -> Latent:
    """Creates a batch of empty latent images to be denoised via sampling."""
    samples = torch.zeros([batch_size, 4, height // 8, width // 8], device=default_device())
    return {"samples": samples}


@node("VAEDecode", category="latent", display_name="VAE Decode", cost=costs.vae_decode)
def vae_decode(samples: Latent, vae: Vae) -> Image:
    """Decodes latent images back into pixel space images."""
    return vae.decode(samples["samples"])   # the VAE flattens video-shaped latents to a batch


@node("VAEEncode", category="latent", display_name="VAE Encode", cost=costs.vae_encode)
def vae_encode(pixels: Image, vae: Vae) -> Latent:
    """Encodes pixel images into latents."""
    return {"samples": vae.encode(pixels)}   # the VAE takes RGB of RGBA and crops to its stride


@node("VAEEncodeForInpaint", category="latent/inpaint", display_name="VAE Encode (for Inpainting)",
      cost=costs.vae_encode)
def vae_encode_for_inpaint(pixels: Image, vae: Vae, mask: Mask,
                           grow_mask_by: Annotated[int, Int(6, min=0, max=64, step=1)]) -> Latent:
    """Encodes an image for inpainting: masked pixels become neutral grey and the mask is grown so the
    sampler can blend the seams."""
    ratio = vae.downscale_ratio
    h = (pixels.shape[1] // ratio) * ratio
    w = (pixels.shape[2] // ratio) * ratio
    mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(),
                         size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = pixels.clone()
    if pixels.shape[1] != h or pixels.shape[2] != w:
        y0, x0 = (pixels.shape[1] % ratio) // 2, (pixels.shape[2] % ratio) // 2
        pixels = pixels[:, y0:y0 + h, x0:x0 + w, :]
        mask = mask[:, :, y0:y0 + h, x0:x0 + w]
    if grow_mask_by > 0:
        kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
        pad = math.ceil((grow_mask_by - 1) / 2)
        grown = torch.clamp(F.conv2d(mask.round(), kernel, padding=pad), 0, 1)[:, :, :h, :w]
    else:
        grown = mask
    keep = (1.0 - mask.round()).squeeze(1)
    pixels = pixels[:, :, :, :3]
    pixels = (pixels - 0.5) * keep.unsqueeze(-1).to(pixels.dtype) + 0.5
    return {"samples": vae.encode(pixels), "noise_mask": grown[:, :, :h, :w].round()}


@node("SetLatentNoiseMask", category="latent/inpaint")
def set_latent_noise_mask(samples: Latent, mask: Mask) -> Latent:
    """Restricts sampling to the masked area of the latent (1 = regenerate)."""
    return {**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))}


@node("LatentUpscale", category="latent", display_name="Upscale Latent", cost=costs.latent_upscale)
def latent_upscale(samples: Latent, upscale_method: Annotated[str, Combo(LATENT_METHODS)],
                   width: Annotated[int, Int(512, min=0, max=MAX_RESOLUTION, step=8)],
                   height: Annotated[int, Int(512, min=0, max=MAX_RESOLUTION, step=8)],
                   crop: Annotated[str, Combo(["disabled", "center"])]) -> Latent:
    """Resizes latents to a pixel size (divided by 8); 0 in one dimension keeps the aspect ratio."""
    s = samples["samples"]
    if width == 0 and height == 0:
        return samples
    # ComfyUI's order: the given side is clamped to 64 px first, the other follows the aspect ratio
    width, height = (max(64, width) if width else 0), (max(64, height) if height else 0)
    w, h = keep_aspect(width, height, s.shape[3] * 8, s.shape[2] * 8)
    w, h = max(64, w), max(64, h)
    return {**samples, "samples": resize(s, w // 8, h // 8, upscale_method, crop)}


@node("LatentUpscaleBy", category="latent", display_name="Upscale Latent By", cost=costs.latent_upscale_by)
def latent_upscale_by(samples: Latent, upscale_method: Annotated[str, Combo(LATENT_METHODS)],
                      scale_by: Annotated[float, Float(1.5, min=0.01, max=8.0, step=0.01)]) -> Latent:
    """Resizes latents by a factor."""
    s = samples["samples"]
    w, h = round(s.shape[3] * scale_by), round(s.shape[2] * scale_by)
    return {**samples, "samples": resize(s, max(1, w), max(1, h), upscale_method, "disabled")}

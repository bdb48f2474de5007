"""InstructPix2Pix conditioning: the input image's latent rides along with both conditionings.

An InstructPix2Pix UNet (Brooks et al. 2023) takes 8 input channels: the noisy latent and the latent of
the image being edited. As in ComfyUI the image latent travels in each conditioning entry under
``concat_latent_image`` (raw, like every LATENT; sampling scales it into model space), and sampling
starts from an empty latent of the same size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from engine.node import node

from .types import Conditioning, Image, Latent, Vae


class Pix2PixOutput(NamedTuple):
    positive: Conditioning
    negative: Conditioning
    latent: Latent


def _with_concat(conditioning: list, latent: torch.Tensor) -> list:
    return [[entry[0], {**(entry[1] if len(entry) > 1 and entry[1] else {}), "concat_latent_image": latent}]
            for entry in conditioning]


@node("InstructPixToPixConditioning", category="conditioning/instructpix2pix")
def instruct_pix_to_pix_conditioning(positive: Conditioning, negative: Conditioning, vae: Vae,
                                     pixels: Image) -> Pix2PixOutput:
    """Attach the image's latent to both conditionings for an InstructPix2Pix model; the latent output is
    the empty latent to sample from."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[-1] not in (3, 4):
        raise ValueError("InstructPixToPixConditioning: input 'pixels' must be an IMAGE [B, H, W, 3]")
    h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
    if h == 0 or w == 0:
        raise ValueError(f"InstructPixToPixConditioning: input 'pixels' is {pixels.shape[2]}x{pixels.shape[1]}, "
                         "smaller than 8x8")
    top, left = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2   # centred crop to a multiple of 8
    latent = vae.encode(pixels[:, top:top + h, left:left + w, :3])
    return Pix2PixOutput(_with_concat(positive, latent), _with_concat(negative, latent),
                         {"samples": torch.zeros_like(latent)})

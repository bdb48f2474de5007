"""The extra input channels of inpainting and InstructPix2Pix models.

An inpainting UNet takes 9 channels: the noisy latent (4), the inpainting mask at latent
resolution (1, 1 = regenerate) and the latent of the image with the masked pixels greyed out (4),
concatenated in that order. As in ComfyUI, each conditioning entry may bring its own mask and
masked latent (`concat_mask`, `concat_latent_image`, set by InpaintModelConditioning); otherwise
the sampler's latent and its noise mask are used (VAEEncodeForInpaint's output is exactly that);
with no mask at all the model sees "everything masked" over a blank image.
An InstructPix2Pix UNet takes 8: the noisy latent and the entry's `concat_latent_image` (zeros
when the entry has none).

The sampler does not know which kind of model it drives, so each conditioning entry carries one
[B, 9, h, w] tensor with both parts (mask, inpainting image, pix2pix image) and the model takes the
channels it needs (`extra_input`). All latents here are in model space: sampling has
already taken the sampler's latent and every entry's `concat_latent_image` through the model's latent
format (nodes/sampling/sample.py), so nothing is rescaled here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..imaging import resize

# The model-space latent of an all-black image, per channel (SD1/SD2/SDXL share the VAE latent
# space up to scaling; ComfyUI uses these values for every inpainting model).
BLANK_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)
CONCAT_CHANNELS = 5  # mask + 4 latent channels


def _to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    reps = -(-batch // t.shape[0])
    return t.repeat((reps,) + (1,) * (t.ndim - 1))[:batch]


def _fit(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear resize to h x w, centre-cropping to the aspect ratio first (ComfyUI's common_upscale)."""
    if tuple(t.shape[-2:]) == (h, w):
        return t
    return resize(t.float(), w, h, "bilinear", "center")


def blank_concat(like: torch.Tensor) -> torch.Tensor:
    """The extra channels when no mask is given: mask all ones, blank masked-image latent."""
    b, _, h, w = like.shape
    blank = torch.tensor(BLANK_LATENT, dtype=like.dtype, device=like.device).view(1, 4, 1, 1)
    return torch.cat([like.new_ones((b, 1, h, w)), blank.expand(b, 4, h, w)], dim=1)


def model_concat(options: Mapping[str, Any], latent_image: torch.Tensor | None,
                 noise_mask: torch.Tensor | None, latent_shape: Sequence[int]) -> torch.Tensor | None:
    """[B, 9, h, w] = (mask, inpainting image latent, pix2pix image latent) for one conditioning entry,
    or None when neither the entry nor the sampler has anything to add (the model then uses blanks).

    `options` is the entry's option dict; `latent_image` (model space) and `noise_mask` are the
    sampler's, used where the entry brings none.
    """
    given = options.get("concat_latent_image")
    if given is None and options.get("concat_mask") is None and noise_mask is None:
        return None
    b, h, w = latent_shape[0], latent_shape[-2], latent_shape[-1]
    inpaint = inpaint_concat(options, latent_image, noise_mask, latent_shape)
    if inpaint is None:
        inpaint = blank_concat(torch.zeros((b, 4, h, w)))
    pix2pix = torch.zeros((b, 4, h, w)) if given is None else _to_batch(_fit(given.float(), h, w), b)
    return torch.cat([inpaint, pix2pix.to(inpaint.device)], dim=1)


def extra_input(concat: torch.Tensor | None, like: torch.Tensor, extra_channels: int) -> torch.Tensor:
    """The channels a model appends to its latent input `like`: 5 for inpainting models, 4 for
    InstructPix2Pix ones; from `model_concat`'s tensor, or blanks when it is None."""
    if extra_channels == CONCAT_CHANNELS:
        return blank_concat(like) if concat is None else concat[:, :CONCAT_CHANNELS]
    if extra_channels == 4:
        return torch.zeros_like(like) if concat is None else concat[:, CONCAT_CHANNELS:]
    raise ValueError(f"a model taking {extra_channels} extra input channels is not supported "
                     "(inpainting models take 5, InstructPix2Pix models 4)")


def inpaint_concat(options: Mapping[str, Any], latent_image: torch.Tensor | None,
                   noise_mask: torch.Tensor | None, latent_shape: Sequence[int]) -> torch.Tensor | None:
    """[B, 5, h, w] (mask, masked latent) for an inpainting model, or None when there is no mask.

    `options` is the entry's option dict; `latent_image` (model space) and `noise_mask` are the
    sampler's, used where the entry brings none.
    """
    mask = options.get("concat_mask")
    if mask is None:
        mask = noise_mask
    image = options.get("concat_latent_image")
    if image is None:
        image = latent_image
    if mask is None or image is None:
        return None
    b, h, w = latent_shape[0], latent_shape[-2], latent_shape[-1]
    image = _to_batch(_fit(image.float(), h, w), b)
    if mask.ndim == 4:
        mask = mask[:, :1]
    mask = mask.float().reshape((-1, 1) + tuple(mask.shape[-2:]))
    mask = _to_batch(_fit(mask, h, w).round(), b)
    return torch.cat([mask.to(image.device), image], dim=1)

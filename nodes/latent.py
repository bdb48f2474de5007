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
def empty_latent_image(width: Annotated[int, Int(512, min=16, max=MAX_RESOLUTION, step=8,
                                                 tooltip="The width of the latent images in pixels.")],
                       height: Annotated[int, Int(512, min=16, max=MAX_RESOLUTION, step=8,
                                                  tooltip="The height of the latent images in pixels.")],
                       batch_size: Annotated[int, Int(1, min=1, max=4096,
                                                      tooltip="The number of latent images in the batch.")]) -> Latent:
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


# ---- compositing, batches and arithmetic (ComfyUI core) -------------------------------------------
# (imports kept with the section: the top of this module is edited by others too)

from engine.inputs import Boolean  # noqa: E402


def _need(ok: bool, message: str) -> None:
    # The executor prefixes the node's class and id; the message names the input.
    if not ok:
        raise ValueError(message)


def _samples(latent: Latent, name: str) -> torch.Tensor:
    s = latent.get("samples") if isinstance(latent, dict) else None
    _need(isinstance(s, torch.Tensor) and s.dim() in (4, 5), f"{name}: not a latent (no 'samples' tensor)")
    assert isinstance(s, torch.Tensor)  # _need raised otherwise
    return s


def _match_size(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`s` resized (bilinear, centre crop) to `like`'s spatial size, as ComfyUI does before combining."""
    if s.shape[-2:] == like.shape[-2:]:
        return s
    return resize(s, like.shape[-1], like.shape[-2], "bilinear", "center")


def _batch_to(s: torch.Tensor, batch: int) -> torch.Tensor:
    if s.shape[0] == batch:
        return s
    reps = math.ceil(batch / s.shape[0])
    return s.repeat((reps,) + (1,) * (s.dim() - 1))[:batch]


def _edge_ramp(length: int, feather: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D weights rising linearly over `feather` cells at each edge that is feathered."""
    w = torch.ones(length)
    for i in range(min(feather, length)):
        f = (i + 1) / feather
        if at_start:
            w[i] = min(w[i].item(), f)
        if at_end:
            w[length - 1 - i] = min(w[length - 1 - i].item(), f)
    return w


@node("LatentComposite", category="latent", display_name="Latent Composite")
def latent_composite(samples_to: Latent, samples_from: Latent,
                     x: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                     y: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                     feather: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)]) -> Latent:
    """Pastes samples_from into samples_to at (x, y) in pixels; feather fades the pasted edges that lie
    inside the destination."""
    dst, src = _samples(samples_to, "samples_to"), _samples(samples_from, "samples_from")
    _need(dst.shape[1] == src.shape[1], f"samples_from: {src.shape[1]} channels, samples_to has {dst.shape[1]}")
    lx, ly, lf = x // 8, y // 8, feather // 8
    out = dst.clone()
    h = min(src.shape[-2], dst.shape[-2] - ly)
    w = min(src.shape[-1], dst.shape[-1] - lx)
    if h <= 0 or w <= 0:
        return {**samples_to, "samples": out}
    piece = _batch_to(src, dst.shape[0])[..., :h, :w].to(out.dtype)
    if lf > 0:
        wy = _edge_ramp(h, lf, ly > 0, ly + h < dst.shape[-2])
        wx = _edge_ramp(w, lf, lx > 0, lx + w < dst.shape[-1])
        m = (wy[:, None] * wx[None, :]).to(out)
        region = out[..., ly:ly + h, lx:lx + w]
        out[..., ly:ly + h, lx:lx + w] = piece * m + region * (1 - m)
    else:
        out[..., ly:ly + h, lx:lx + w] = piece
    return {**samples_to, "samples": out}


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None,
              multiplier: int, resize_source: bool) -> torch.Tensor:
    """[B,C,H,W] source over destination at (x, y) (pixels; `multiplier` pixels per cell), through an
    optional mask at source resolution. Shared by LatentCompositeMasked and ImageCompositeMasked."""
    source = source.to(destination.device, destination.dtype)
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = _batch_to(source, destination.shape[0])
    cx, cy = x // multiplier, y // multiplier
    cx = max(-source.shape[-1], min(cx, destination.shape[-1]))
    cy = max(-source.shape[-2], min(cy, destination.shape[-2]))
    left, top = max(0, cx), max(0, cy)
    right = min(destination.shape[-1], cx + source.shape[-1])
    bottom = min(destination.shape[-2], cy + source.shape[-2])
    out = destination.clone()
    if right <= left or bottom <= top:
        return out
    if mask is None:
        m = torch.ones_like(source[:, :1])
    else:
        m = mask.reshape((-1, 1) + tuple(mask.shape[-2:])).to(source)
        m = F.interpolate(m, size=source.shape[-2:], mode="bilinear")
        m = _batch_to(m, source.shape[0])
    sy, sx = top - cy, left - cx
    piece = source[..., sy:sy + bottom - top, sx:sx + right - left]
    pm = m[..., sy:sy + bottom - top, sx:sx + right - left]
    region = out[..., top:bottom, left:right]
    out[..., top:bottom, left:right] = piece * pm + region * (1 - pm)
    return out


@node("LatentCompositeMasked", category="latent")
def latent_composite_masked(destination: Latent, source: Latent,
                            x: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                            y: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                            resize_source: Annotated[bool, Boolean(False)], mask: Mask | None = None) -> Latent:
    """Pastes source into destination at (x, y) pixels, through an optional mask."""
    dst, src = _samples(destination, "destination"), _samples(source, "source")
    _need(dst.dim() == 4 and src.dim() == 4, "destination/source: video latents are not supported here")
    _need(dst.shape[1] == src.shape[1], f"source: {src.shape[1]} channels, destination has {dst.shape[1]}")
    return {**destination, "samples": composite(dst, src, x, y, mask, 8, resize_source)}


@node("LatentBlend", category="_for_testing", display_name="Latent Blend")
def latent_blend(samples1: Latent, samples2: Latent,
                 blend_factor: Annotated[float, Float(0.5, min=0, max=1, step=0.01)]) -> Latent:
    """samples1 x blend_factor + samples2 x (1 - blend_factor); samples2 is resized to samples1."""
    a, b = _samples(samples1, "samples1"), _samples(samples2, "samples2")
    _need(a.shape[1] == b.shape[1], f"samples2: {b.shape[1]} channels, samples1 has {a.shape[1]}")
    b = _batch_to(_match_size(b, a), a.shape[0])
    return {**samples1, "samples": a * blend_factor + b * (1 - blend_factor)}


def _batch_index(latent: Latent, batch: int) -> list[int]:
    idx = latent.get("batch_index")
    return list(idx) if isinstance(idx, (list, tuple)) and len(idx) == batch else list(range(batch))


@node("LatentFromBatch", category="latent/batch", display_name="Latent From Batch")
def latent_from_batch(samples: Latent, batch_index: Annotated[int, Int(0, min=0, max=63)],
                      length: Annotated[int, Int(1, min=1, max=64)]) -> Latent:
    """Takes `length` latents starting at `batch_index` (their noise seeds follow their original index)."""
    s = _samples(samples, "samples")
    b = s.shape[0]
    _need(batch_index < b, f"batch_index {batch_index} is out of range: the batch has {b} latent(s)")
    length = min(length, b - batch_index)
    out = {**samples, "samples": s[batch_index:batch_index + length].clone()}
    mask = samples.get("noise_mask")
    if isinstance(mask, torch.Tensor):
        out["noise_mask"] = _batch_to(mask, b)[batch_index:batch_index + length].clone() if mask.shape[0] > 1 \
            else mask.clone()
    out["batch_index"] = _batch_index(samples, b)[batch_index:batch_index + length]
    return out


@node("RepeatLatentBatch", category="latent/batch", display_name="Repeat Latent Batch")
def repeat_latent_batch(samples: Latent, amount: Annotated[int, Int(1, min=1, max=64)]) -> Latent:
    """Repeats the batch `amount` times; the copies get their own noise seeds (batch indices continue)."""
    s = _samples(samples, "samples")
    out = {**samples, "samples": s.repeat((amount,) + (1,) * (s.dim() - 1))}
    mask = samples.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] > 1:
        out["noise_mask"] = _batch_to(mask, s.shape[0]).repeat((amount,) + (1,) * (mask.dim() - 1))
    if "batch_index" in samples:
        idx = _batch_index(samples, s.shape[0])
        step = max(idx) - min(idx) + 1
        out["batch_index"] = [i + k * step for k in range(amount) for i in idx]
    return out


@node("LatentBatch", category="latent/batch")
def latent_batch(samples1: Latent, samples2: Latent) -> Latent:
    """Joins two latent batches; samples2 is resized to samples1's size. Each keeps its own noise indices
    (as in ComfyUI, the first latent of each batch gets the same noise)."""
    a, b = _samples(samples1, "samples1"), _samples(samples2, "samples2")
    _need(a.shape[1] == b.shape[1], f"samples2: {b.shape[1]} channels, samples1 has {a.shape[1]}")
    b = _match_size(b, a)
    ia, ib = _batch_index(samples1, a.shape[0]), _batch_index(samples2, b.shape[0])
    return {"samples": torch.cat([a, b.to(a)], dim=0), "batch_index": ia + ib}


def _arith(samples1: Latent, samples2: Latent, op) -> Latent:
    a, b = _samples(samples1, "samples1"), _samples(samples2, "samples2")
    _need(a.shape[1] == b.shape[1], f"samples2: {b.shape[1]} channels, samples1 has {a.shape[1]}")
    b = _batch_to(_match_size(b, a), a.shape[0]).to(a)
    return {**samples1, "samples": op(a, b)}


@node("LatentAdd", category="latent/advanced")
def latent_add(samples1: Latent, samples2: Latent) -> Latent:
    return _arith(samples1, samples2, torch.add)


@node("LatentSubtract", category="latent/advanced")
def latent_subtract(samples1: Latent, samples2: Latent) -> Latent:
    return _arith(samples1, samples2, torch.sub)


@node("LatentMultiply", category="latent/advanced")
def latent_multiply(samples: Latent,
                    multiplier: Annotated[float, Float(1.0, min=-10.0, max=10.0, step=0.01)]) -> Latent:
    return {**samples, "samples": _samples(samples, "samples") * multiplier}


@node("LatentInterpolate", category="latent/advanced")
def latent_interpolate(samples1: Latent, samples2: Latent,
                       ratio: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.01)]) -> Latent:
    """Interpolates the per-pixel latent vectors' directions and lengths separately (ratio 1 = samples1)."""
    def op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
        ua = torch.nan_to_num(a / na)
        ub = torch.nan_to_num(b / nb)
        mixed = ua * ratio + ub * (1.0 - ratio)
        direction = torch.nan_to_num(mixed / mixed.norm(dim=1, keepdim=True))
        return direction * (na * ratio + nb * (1.0 - ratio))
    return _arith(samples1, samples2, op)


@node("LatentCrop", category="latent/transform", display_name="Crop Latent")
def latent_crop(samples: Latent, width: Annotated[int, Int(512, min=64, max=MAX_RESOLUTION, step=8)],
                height: Annotated[int, Int(512, min=64, max=MAX_RESOLUTION, step=8)],
                x: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                y: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)]) -> Latent:
    """Crops a pixel rectangle (in steps of 8); the origin is kept at least 64 px from the far edges."""
    s = _samples(samples, "samples")
    lx = max(0, min(x // 8, s.shape[-1] - 8))
    ly = max(0, min(y // 8, s.shape[-2] - 8))
    out = {**samples, "samples": s[..., ly:ly + height // 8, lx:lx + width // 8]}
    return out


@node("LatentFlip", category="latent/transform", display_name="Flip Latent")
def latent_flip(samples: Latent,
                flip_method: Annotated[str, Combo(["x-axis: vertically", "y-axis: horizontally"])]) -> Latent:
    s = _samples(samples, "samples")
    dim = -2 if flip_method.startswith("x") else -1
    return {**samples, "samples": torch.flip(s, dims=[dim])}


@node("LatentRotate", category="latent/transform", display_name="Rotate Latent")
def latent_rotate(samples: Latent,
                  rotation: Annotated[str, Combo(["none", "90 degrees", "180 degrees", "270 degrees"])]) -> Latent:
    """Rotates clockwise."""
    s = _samples(samples, "samples")
    turns = {"none": 0, "90 degrees": 1, "180 degrees": 2, "270 degrees": 3}[rotation]
    return {**samples, "samples": torch.rot90(s, k=turns, dims=[-1, -2])}


# ---- tiled VAE (big images on small memory) -----------------------------------------------------------

def _tile_overlap(tile_size: int, overlap: int) -> int:
    # ComfyUI's rule: an overlap above a quarter of the tile is cut to a quarter.
    return tile_size // 4 if tile_size < overlap * 4 else overlap


@node("VAEDecodeTiled", category="_for_testing", display_name="VAE Decode (Tiled)")
def vae_decode_tiled(samples: Latent, vae: Vae,
                     tile_size: Annotated[int, Int(512, min=64, max=4096, step=32)],
                     overlap: Annotated[int, Int(64, min=0, max=4096, step=32)],
                     temporal_size: Annotated[int, Int(64, min=8, max=4096, step=4,
                                                       tooltip="Only used for video VAEs: Amount of frames "
                                                               "to decode at a time.")],
                     temporal_overlap: Annotated[int, Int(8, min=4, max=4096, step=4,
                                                          tooltip="Only used for video VAEs: Amount of frames "
                                                                  "to overlap.")]) -> Image:
    """Decodes latents tile by tile (tile_size and overlap in pixels), for images too big to decode at
    once; the temporal inputs only matter for video VAEs, which sdflow does not have."""
    r = vae.downscale_ratio
    overlap = _tile_overlap(tile_size, overlap)
    return vae.decode_tiled(samples["samples"], tile=max(1, tile_size // r), overlap=overlap // r)


@node("VAEEncodeTiled", category="_for_testing", display_name="VAE Encode (Tiled)")
def vae_encode_tiled(pixels: Image, vae: Vae,
                     tile_size: Annotated[int, Int(512, min=64, max=4096, step=64)],
                     overlap: Annotated[int, Int(64, min=0, max=4096, step=32)],
                     temporal_size: Annotated[int, Int(64, min=8, max=4096, step=4,
                                                       tooltip="Only used for video VAEs: Amount of frames "
                                                               "to encode at a time.")],
                     temporal_overlap: Annotated[int, Int(8, min=4, max=4096, step=4,
                                                          tooltip="Only used for video VAEs: Amount of frames "
                                                                  "to overlap.")]) -> Latent:
    """Encodes images tile by tile (tile_size and overlap in pixels)."""
    return {"samples": vae.encode_tiled(pixels, tile=tile_size, overlap=_tile_overlap(tile_size, overlap))}

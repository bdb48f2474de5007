"""Mask nodes (ComfyUI core): conversions between images and masks, solid masks, compositing,
feathering, growing and thresholds. MASK is [B,H,W] float in 0..1 (1 = masked)."""
from __future__ import annotations

import random
import string
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from engine.inputs import Boolean, Combo, Float, Hidden, Int
from engine.node import UI, NodeOutput, node

from .image import save_images
from .runtime import runtime
from .types import MAX_RESOLUTION, Image, Mask

CHANNELS = ["red", "green", "blue", "alpha"]


def need(ok: bool, message: str) -> None:
    # The executor prefixes the node's class and id; the message names the input.
    if not ok:
        raise ValueError(message)


def as_mask(mask: Any, name: str = "mask") -> torch.Tensor:
    """[H,W] / [B,H,W] / [B,1,H,W] -> [B,H,W] float."""
    need(isinstance(mask, torch.Tensor) and mask.dim() in (2, 3, 4) and mask.numel() > 0,
         f"{name}: not a MASK (expected a [batch, height, width] tensor)")
    return mask.reshape((-1,) + tuple(mask.shape[-2:])).float()


def as_image(image: Any, name: str = "image") -> torch.Tensor:
    need(isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[-1] in (1, 3, 4),
         f"{name}: not an IMAGE (expected a [batch, height, width, channels] tensor)")
    return image


@node("ImageToMask", category="mask", display_name="Convert Image to Mask")
def image_to_mask(image: Image, channel: Annotated[str, Combo(CHANNELS)]) -> Mask:
    image = as_image(image)
    index = CHANNELS.index(channel)
    need(index < image.shape[-1], f"channel: the image has no {channel} channel ({image.shape[-1]} channels)")
    return image[..., index].clone()


@node("MaskToImage", category="mask", display_name="Convert Mask to Image")
def mask_to_image(mask: Mask) -> Image:
    m = as_mask(mask)
    return m.unsqueeze(-1).expand(-1, -1, -1, 3).clone()


@node("ImageColorToMask", category="mask", display_name="Convert Image Color to Mask")
def image_color_to_mask(image: Image,
                        color: Annotated[int, Int(0, min=0, max=0xFFFFFF, step=1, display="color")]) -> Mask:
    """1 where the pixel's 8-bit RGB equals `color` (0xRRGGBB)."""
    image = as_image(image)
    need(image.shape[-1] >= 3, "image: needs RGB channels")
    rgb = torch.clamp(image[..., :3], 0, 1).mul(255).round().to(torch.int64)
    packed = (rgb[..., 0] << 16) + (rgb[..., 1] << 8) + rgb[..., 2]
    return (packed == color).float()


@node("SolidMask", category="mask")
def solid_mask(value: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.01)],
               width: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)],
               height: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)]) -> Mask:
    return torch.full((1, height, width), value, dtype=torch.float32)


@node("InvertMask", category="mask")
def invert_mask(mask: Mask) -> Mask:
    return 1.0 - as_mask(mask)


@node("CropMask", category="mask")
def crop_mask(mask: Mask, x: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
              y: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
              width: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)],
              height: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)]) -> Mask:
    m = as_mask(mask)
    need(x < m.shape[-1] and y < m.shape[-2],
         f"x/y: ({x}, {y}) lies outside the {m.shape[-1]}x{m.shape[-2]} mask")
    return m[:, y:y + height, x:x + width].clone()


def _combine(operation: str, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    if operation == "multiply":
        return dst * src
    if operation == "add":
        return dst + src
    if operation == "subtract":
        return dst - src
    a, b = dst.round().bool(), src.round().bool()
    logic = {"and": a & b, "or": a | b, "xor": a ^ b}
    return logic[operation].float()


@node("MaskComposite", category="mask")
def mask_composite(destination: Mask, source: Mask,
                   x: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
                   y: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
                   operation: Annotated[str, Combo(["multiply", "add", "subtract", "and", "or", "xor"])]) -> Mask:
    """Combines source into destination at (x, y) over the overlap; the result is clamped to 0..1."""
    dst, src = as_mask(destination, "destination"), as_mask(source, "source")
    batch = max(dst.shape[0], src.shape[0])
    need(dst.shape[0] in (1, batch) and src.shape[0] in (1, batch),
         f"source: batch of {src.shape[0]} masks does not match destination's {dst.shape[0]}")
    out = dst.expand(batch, -1, -1).clone()
    src = src.expand(batch, -1, -1)
    right, bottom = min(out.shape[-1], x + src.shape[-1]), min(out.shape[-2], y + src.shape[-2])
    if right > x and bottom > y:
        region = out[:, y:bottom, x:right]
        out[:, y:bottom, x:right] = _combine(operation, region, src[:, :bottom - y, :right - x])
    return out.clamp(0.0, 1.0)


@node("FeatherMask", category="mask")
def feather_mask(mask: Mask, left: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
                 top: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
                 right: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
                 bottom: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)]) -> Mask:
    """Fades the mask to zero towards each edge over the given number of pixels (linear ramp)."""
    out = as_mask(mask).clone()
    h, w = out.shape[-2:]

    def ramp(n: int, length: int) -> torch.Tensor:
        steps = torch.ones(length)
        k = min(n, length)
        if k > 0:  # a feather wider than the mask ramps over the whole mask
            steps[:k] = torch.arange(1, k + 1, dtype=torch.float32) / k
        return steps

    cols = ramp(left, w) * ramp(right, w).flip(0)
    rows = ramp(top, h) * ramp(bottom, h).flip(0)
    return out * rows[:, None] * cols[None, :]


@node("GrowMask", category="mask")
def grow_mask(mask: Mask, expand: Annotated[int, Int(0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1)],
              tapered_corners: Annotated[bool, Boolean(True)]) -> Mask:
    """Grows (expand > 0) or shrinks the mask by that many pixels, one 3x3 step at a time; tapered
    corners use a cross-shaped step, which rounds corners off."""
    m = as_mask(mask).unsqueeze(1)
    if expand == 0:
        return m.squeeze(1).clone()
    kernel = torch.ones(3, 3)
    if tapered_corners:
        kernel[0, 0] = kernel[0, 2] = kernel[2, 0] = kernel[2, 2] = 0
    # grey dilation over the kernel's support: the maximum of the neighbours it covers (minimum to shrink)
    offsets = [(dy - 1, dx - 1) for dy in range(3) for dx in range(3) if kernel[dy, dx] > 0]
    grow = expand > 0
    for _ in range(min(abs(expand), max(m.shape[-2:]))):
        padded = F.pad(m, (1, 1, 1, 1), mode="constant", value=0.0 if grow else 1.0)
        h, w = m.shape[-2:]
        shifted = torch.stack([padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in offsets])
        m = shifted.amax(0) if grow else shifted.amin(0)
    return m.squeeze(1)


@node("ThresholdMask", category="mask")
def threshold_mask(mask: Mask, value: Annotated[float, Float(0.5, min=0.0, max=1.0, step=0.01)]) -> Mask:
    """1 where the mask is above `value`, else 0."""
    return (as_mask(mask) > value).float()


@node("MaskPreview", category="mask", display_name="Preview Mask", output_node=True)
def mask_preview(mask: Mask, prompt: Annotated[Any, Hidden("PROMPT")] = None,
                 extra_pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> NodeOutput:
    """Shows the mask as a greyscale image (written to the temp folder)."""
    images = mask_to_image(mask)
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    return UI(**save_images(images, f"ComfyUI_temp_{suffix}", runtime().temp_dir, "temp", 1, prompt, extra_pnginfo))

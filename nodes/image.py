"""Image nodes: load from the input folder, save and preview with ComfyUI's PNG metadata, and resize."""
from __future__ import annotations

import hashlib
import os
import random
import re
import string
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image as PILImage, ImageOps, ImageSequence, PngImagePlugin

from engine.config import current_config
from engine.image_limits import ImageTooLarge, check_image_file, check_pixels, pixel_budget
from engine.inputs import Combo, Float, Hidden, Int, String
from engine.node import UI, NodeOutput, node
from engine.paths import UnsafePathError, contained_path
from engine.png_metadata import png_text_chunks

from . import costs
from .imaging import IMAGE_METHODS, keep_aspect, resize, tensor_to_pil
from .runtime import runtime
from .types import MAX_RESOLUTION, Image, Mask

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_ANNOTATION = re.compile(r"^(.*) \[(input|output|temp)\]$")


# ---- input files ----------------------------------------------------------------------------------

def input_images() -> list[str]:
    """Image files in the input folder (top level and subfolders), sorted, as combo choices."""
    base = runtime().input_dir
    if not base.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("clipspace",))
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/"))
    return sorted(found)


def annotated_path(name: str, default: str = "input") -> Path:
    """`x.png`, `sub/x.png` or `x.png [output]` -> a path inside the right folder (never outside)."""
    kind = default
    match = _ANNOTATION.match(name)
    if match:
        name, kind = match.group(1), match.group(2)
    rt = runtime()
    base = {"input": rt.input_dir, "output": rt.output_dir, "temp": rt.temp_dir}[kind]
    return contained_path(base, name)


def _validate_image(image: str) -> bool | str:
    try:
        path = annotated_path(image)
    except (UnsafePathError, ValueError) as exc:
        return f"Invalid image file: {image} ({exc})"
    if not path.is_file():
        return f"Invalid image file: {image}"
    try:   # the pixel budget, from the header: an image bomb is refused before the prompt is queued
        check_image_file(path, _budget(), f"image {image!r}")
    except ImageTooLarge as exc:
        return str(exc)
    return True


def _budget() -> int | None:
    return pixel_budget(current_config() or runtime().config)


def _file_sha256(image: str) -> str:
    digest = hashlib.sha256()
    with open(annotated_path(image), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(path: Path) -> PILImage.Image:
    try:
        with warnings.catch_warnings():   # PIL's bomb warning: the budget below decides
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            img = PILImage.open(path)
        check_pixels(img.width, img.height, _budget(), f"image {path.name!r}")   # before decoding
        img.load()
        return img
    except ImageTooLarge:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read image {path.name!r}: {exc}") from None


def _frames(img: PILImage.Image) -> Iterator[PILImage.Image]:
    """The frames one at a time (a caller may stop early: each one is decoded only when reached)."""
    for frame in ImageSequence.Iterator(img):
        yield ImageOps.exif_transpose(frame)
        if img.format == "MPO":   # MPO's extra frames are depth maps, not a batch
            break


def _frame_tensor(frame: PILImage.Image) -> torch.Tensor:
    if frame.mode == "I":   # 16-bit greyscale stored as 32-bit ints
        frame = frame.point(lambda v: v * (1 / 255))
    rgb = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)


def _alpha_mask(frame: PILImage.Image) -> torch.Tensor:
    if "A" in frame.getbands() or (frame.mode == "P" and "transparency" in frame.info):
        alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
        return 1.0 - torch.from_numpy(alpha)
    return torch.zeros((64, 64), dtype=torch.float32)


def _load_image_cost(image: str, **_: Any) -> costs.Estimate | None:
    """The size from the file's header, so the nodes downstream (VAEEncode, scaling) can be estimated."""
    from engine.image_limits import image_size
    try:
        size = image_size(annotated_path(image))
    except (UnsafePathError, ValueError, OSError):
        return None
    if size is None:
        return None
    w, h = size
    out = {"shape": (1, h, w, 3)}
    return costs.Estimate(costs.tensor_bytes(out["shape"]), [out, None], ("image",))


@node("LoadImage", category="image", display_name="Load Image", validate=_validate_image,
      fingerprint=_file_sha256, cost=_load_image_cost)
def load_image(image: Annotated[str, Combo(input_images, image_upload=True)]) -> tuple[Image, Mask]:
    """Loads an image from the input folder; its alpha channel becomes the mask (1 = transparent)."""
    img = _open(annotated_path(image))
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    budget, pixels = _budget(), 0
    for frame in _frames(img):
        pixels += frame.width * frame.height   # many frames are a bomb too
        if budget and pixels > budget:
            raise ImageTooLarge(f"image {image!r}: its frames hold more than the budget of "
                                f"{budget:,} pixels (--max-image-pixels)")
        t = _frame_tensor(frame)
        if images and t.shape != images[0].shape:
            continue   # a frame of another size cannot join the batch; later ones still may
        images.append(t)
        masks.append(_alpha_mask(frame))
    return torch.stack(images), torch.stack(masks)


@node("LoadImageMask", category="mask", display_name="Load Image (as Mask)", validate=_validate_image,
      fingerprint=_file_sha256)
def load_image_mask(image: Annotated[str, Combo(input_images, image_upload=True)],
                    channel: Annotated[str, Combo(["alpha", "red", "green", "blue"])]) -> Mask:
    """Loads one channel of an image as a mask (alpha is inverted: transparent = 1)."""
    frame = ImageOps.exif_transpose(_open(annotated_path(image)))
    if frame.getbands() != ("R", "G", "B", "A"):
        if frame.mode == "I":   # 16-bit greyscale stored as 32-bit ints
            frame = frame.point(lambda v: v * (1 / 255))
        frame = frame.convert("RGBA")   # every mode (L, LA, P, I;16, CMYK...) has all four bands after this
    band = {"alpha": "A", "red": "R", "green": "G", "blue": "B"}[channel]
    values = np.asarray(frame.getchannel(band), dtype=np.float32) / 255.0
    mask = torch.from_numpy(values)
    return (1.0 - mask if channel == "alpha" else mask).unsqueeze(0)


# ---- saving ---------------------------------------------------------------------------------------

def expand_prefix(prefix: str, width: int, height: int) -> str:
    """ComfyUI's backend substitutions in filename_prefix."""
    now = time.localtime()
    for key, value in {"%width%": width, "%height%": height, "%year%": now.tm_year,
                       "%month%": f"{now.tm_mon:02d}", "%day%": f"{now.tm_mday:02d}",
                       "%hour%": f"{now.tm_hour:02d}", "%minute%": f"{now.tm_min:02d}",
                       "%second%": f"{now.tm_sec:02d}"}.items():
        prefix = prefix.replace(key, str(value))
    return prefix


def save_images(images: torch.Tensor, prefix: str, base: Path, kind: str, compress_level: int,
                prompt: dict | None, extra_pnginfo: dict | None) -> dict:
    """Write `<prefix>_<counter:05>_.png` files (counter continues after the highest existing one)."""
    height, width = images.shape[1], images.shape[2]
    prefix = expand_prefix(prefix, width, height)
    folder_part, _, stem = prefix.replace("\\", "/").rpartition("/")
    if not stem:
        raise ValueError(f"filename_prefix {prefix!r} has no file name part")
    folder = contained_path(base, folder_part) if folder_part else contained_path(base)
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(stem.replace("%batch_num%", "")) + r"_(\d{5,})_")
    counter = 1 + max((int(m.group(1)) for f in os.listdir(folder)
                       if (m := pattern.match(f.replace("%batch_num%", "")))), default=0)
    info = PngImagePlugin.PngInfo()
    for key, text in png_text_chunks(prompt, extra_pnginfo):
        info.add_text(key, text)
    results = []
    for batch_number, image in enumerate(images):
        name = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        tensor_to_pil(image).save(folder / name, pnginfo=info, compress_level=compress_level)
        results.append({"filename": name, "subfolder": folder_part, "type": kind})
        counter += 1
    return {"images": results}


@node("SaveImage", category="image", display_name="Save Image", output_node=True)
def save_image(images: Image,
               filename_prefix: Annotated[str, String("ComfyUI", tooltip="The prefix for the file to save. May contain "
                                       "%width%, %height%, %year% ... and a subfolder path.")],
               prompt: Annotated[Any, Hidden("PROMPT")] = None,
               extra_pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> NodeOutput:
    """Saves the input images to the output folder, with the workflow in the PNG metadata."""
    ui = save_images(images, filename_prefix, runtime().output_dir, "output", 4, prompt, extra_pnginfo)
    return UI(**ui)


@node("PreviewImage", category="image", display_name="Preview Image", output_node=True)
def preview_image(images: Image, prompt: Annotated[Any, Hidden("PROMPT")] = None,
                  extra_pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> NodeOutput:
    """Shows the input images (written to the temp folder, which is emptied on start)."""
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    ui = save_images(images, f"ComfyUI_temp_{suffix}", runtime().temp_dir, "temp", 1, prompt, extra_pnginfo)
    return UI(**ui)


# ---- resizing -------------------------------------------------------------------------------------

@node("ImageScale", category="image/upscaling", display_name="Upscale Image", cost=costs.image_scale)
def image_scale(image: Image, upscale_method: Annotated[str, Combo(IMAGE_METHODS)],
                width: Annotated[int, Int(512, min=0, max=MAX_RESOLUTION, step=1)],
                height: Annotated[int, Int(512, min=0, max=MAX_RESOLUTION, step=1)],
                crop: Annotated[str, Combo(["disabled", "center"])]) -> Image:
    """Resizes images; 0 in one dimension keeps the aspect ratio, both 0 leaves the image unchanged."""
    if width == 0 and height == 0:
        return image
    w, h = keep_aspect(width, height, image.shape[2], image.shape[1])
    return resize(image.movedim(-1, 1), w, h, upscale_method, crop).movedim(1, -1)


@node("ImageScaleBy", category="image/upscaling", display_name="Upscale Image By",
      cost=costs.image_scale_by)
def image_scale_by(image: Image, upscale_method: Annotated[str, Combo(IMAGE_METHODS)],
                   scale_by: Annotated[float, Float(1.0, min=0.01, max=8.0, step=0.01)]) -> Image:
    """Resizes images by a factor (dimensions rounded)."""
    w, h = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
    return resize(image.movedim(-1, 1), max(1, w), max(1, h), upscale_method, "disabled").movedim(1, -1)


@node("ImageInvert", category="image")
def image_invert(image: Image) -> Image:
    return 1.0 - image


@node("EmptyImage", category="image", cost=costs.empty_image)
def empty_image(width: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)],
                height: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)],
                batch_size: Annotated[int, Int(1, min=1, max=4096)],
                color: Annotated[int, Int(0, min=0, max=0xFFFFFF, step=1, display="color")]) -> Image:
    r, g, b = ((color >> 16) & 0xFF) / 255.0, ((color >> 8) & 0xFF) / 255.0, (color & 0xFF) / 255.0
    return torch.tensor([r, g, b]).expand(batch_size, height, width, 3).clone()


# ---- batches, crops, compositing and filters (ComfyUI core) --------------------------------------
# (imports kept with the section: the top of this module is edited by others too)

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from engine.inputs import Boolean  # noqa: E402

from .latent import composite  # noqa: E402


def _need(ok: bool, message: str) -> None:
    # The executor prefixes the node's class and id; the message names the input.
    if not ok:
        raise ValueError(message)


def _image(image: Any, name: str = "image") -> torch.Tensor:
    _need(isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[-1] in (1, 3, 4)
          and image.numel() > 0, f"{name}: not an IMAGE (expected a [batch, height, width, channels] tensor)")
    return image


def _same_channels(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give both images the larger channel count (RGB gains an opaque alpha, grey is repeated)."""
    def widen(t: torch.Tensor, c: int) -> torch.Tensor:
        if t.shape[-1] == c:
            return t
        if t.shape[-1] == 1:
            t = t.expand(-1, -1, -1, 3)
        if c == 4 and t.shape[-1] == 3:
            t = torch.cat([t, torch.ones_like(t[..., :1])], dim=-1)
        return t
    c = max(a.shape[-1], b.shape[-1], 3 if 1 in (a.shape[-1], b.shape[-1]) and a.shape[-1] != b.shape[-1] else 1)
    return widen(a, c), widen(b, c)


def _resize_image(image: torch.Tensor, width: int, height: int, method: str = "bilinear",
                  crop: str = "disabled") -> torch.Tensor:
    if image.shape[2] == width and image.shape[1] == height:
        return image
    return resize(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


def _repeat_to(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] >= batch:
        return t
    return torch.cat([t, t[-1:].expand((batch - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


@node("ImageScaleToTotalPixels", category="image/upscaling", display_name="Scale Image to Total Pixels")
def image_scale_to_total_pixels(image: Image, upscale_method: Annotated[str, Combo(IMAGE_METHODS)],
                                megapixels: Annotated[float, Float(1.0, min=0.01, max=16.0, step=0.01)],
                                resolution_steps: Annotated[int, Int(1, min=1, max=256)]) -> Image:
    """Resizes to about `megapixels` x 1024 x 1024 pixels, keeping the aspect ratio; each side is rounded
    to a multiple of resolution_steps."""
    image = _image(image)
    h, w = image.shape[1], image.shape[2]
    scale = math.sqrt(megapixels * 1024 * 1024 / (w * h))
    width = max(resolution_steps, round(w * scale / resolution_steps) * resolution_steps)
    height = max(resolution_steps, round(h * scale / resolution_steps) * resolution_steps)
    return _resize_image(image, width, height, upscale_method)


@node("ImagePadForOutpaint", category="image", display_name="Pad Image for Outpainting")
def image_pad_for_outpaint(image: Image, left: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                           top: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                           right: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                           bottom: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                           feathering: Annotated[int, Int(40, min=0, max=MAX_RESOLUTION, step=1)],
                           ) -> tuple[Image, Mask]:
    """Adds grey borders and a mask that is 1 on them; `feathering` pixels of the original along each
    padded side fade into the mask (quadratically), so the outpaint blends in."""
    image = _image(image)
    b, h, w, c = image.shape
    out = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=image.dtype, device=image.device)
    out[:, top:top + h, left:left + w] = image
    mask = torch.ones((h + top + bottom, w + left + right), dtype=torch.float32)
    inner = torch.zeros((h, w), dtype=torch.float32)
    if feathering > 0 and h > 0 and w > 0:
        inf = float("inf")
        ys = torch.arange(h, dtype=torch.float32)[:, None]
        xs = torch.arange(w, dtype=torch.float32)[None, :]
        dist = torch.full((h, w), inf)
        if top:
            dist = torch.minimum(dist, ys.expand(h, w))
        # ComfyUI measures to the far edges from one past the last row/column
        if bottom:
            dist = torch.minimum(dist, (h - ys).expand(h, w))
        if left:
            dist = torch.minimum(dist, xs.expand(h, w))
        if right:
            dist = torch.minimum(dist, (w - xs).expand(h, w))
        near = dist < feathering
        inner[near] = ((feathering - dist[near]) / feathering) ** 2
    mask[top:top + h, left:left + w] = inner
    return out, mask.unsqueeze(0)


@node("ImageCrop", category="image/transform", display_name="Image Crop")
def image_crop(image: Image, width: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)],
               height: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)],
               x: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
               y: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)]) -> Image:
    """Crops a rectangle; an origin past the edge is moved onto the last row/column, as ComfyUI does."""
    image = _image(image)
    x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
    return image[:, y:y + height, x:x + width, :].clone()


@node("ImageBatch", category="image", display_name="Batch Images")
def image_batch(image1: Image, image2: Image) -> Image:
    """Joins two batches; image2 is resized (centre-cropped) to image1's size."""
    a, b = _same_channels(_image(image1, "image1"), _image(image2, "image2"))
    b = _resize_image(b, a.shape[2], a.shape[1], "bilinear", "center")
    return torch.cat([a, b.to(a)], dim=0)


@node("ImageFromBatch", category="image/batch")
def image_from_batch(image: Image, batch_index: Annotated[int, Int(0, min=0, max=4095)],
                     length: Annotated[int, Int(1, min=1, max=4096)]) -> Image:
    image = _image(image)
    b = image.shape[0]
    _need(batch_index < b, f"batch_index {batch_index} is out of range: the batch has {b} image(s)")
    return image[batch_index:batch_index + min(length, b - batch_index)].clone()


@node("RepeatImageBatch", category="image/batch")
def repeat_image_batch(image: Image, amount: Annotated[int, Int(1, min=1, max=4096)]) -> Image:
    return _image(image).repeat((amount, 1, 1, 1))


@node("ImageCompositeMasked", category="image")
def image_composite_masked(destination: Image, source: Image,
                           x: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
                           y: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=1)],
                           resize_source: Annotated[bool, Boolean(False)], mask: Mask | None = None) -> Image:
    """Pastes source over destination at (x, y), through an optional mask (at source resolution)."""
    dst, src = _same_channels(_image(destination, "destination"), _image(source, "source"))
    if mask is not None:
        _need(isinstance(mask, torch.Tensor) and mask.dim() in (2, 3, 4), "mask: not a MASK tensor")
    out = composite(dst.movedim(-1, 1), src.movedim(-1, 1), x, y, mask, 1, resize_source)
    return out.movedim(1, -1)


BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]


def _blend(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "soft_light":
        # the W3C soft-light formula (b lights or darkens a)
        d = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a.clamp_min(0)))
        return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (d - a))
    if mode == "difference":
        return a - b  # ComfyUI's difference is signed; the result is clamped
    raise ValueError(f"blend_mode: unknown mode {mode!r}; expected one of {BLEND_MODES}")


@node("ImageBlend", category="image/postprocessing", display_name="Image Blend")
def image_blend(image1: Image, image2: Image,
                blend_factor: Annotated[float, Float(0.5, min=0.0, max=1.0, step=0.01)],
                blend_mode: Annotated[str, Combo(BLEND_MODES)]) -> Image:
    """Blends image2 onto image1 by a mode, mixed in by blend_factor; image2 is resized to image1."""
    a, b = _same_channels(_image(image1, "image1"), _image(image2, "image2"))
    b = _repeat_to(_resize_image(b, a.shape[2], a.shape[1], "bicubic", "center"), a.shape[0])[:a.shape[0]].to(a)
    a_ = _repeat_to(a, b.shape[0])
    blended = _blend(a_, b, blend_mode)
    return torch.clamp(a_ * (1 - blend_factor) + blended * blend_factor, 0, 1)


def _gaussian(radius: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    # ComfyUI spans the window with coordinates -1..1, so sigma is relative to the radius
    xs = torch.linspace(-1.0, 1.0, 2 * radius + 1)
    g = torch.exp(-(xs ** 2) / (2 * sigma ** 2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).to(like)


def _filter(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    radius = kernel.shape[-1] // 2
    x = image.movedim(-1, 1)
    c = x.shape[1]
    mode = "reflect" if radius < min(x.shape[-2:]) else "replicate"
    padded = F.pad(x, (radius,) * 4, mode=mode)
    weight = kernel.expand(c, 1, -1, -1)
    return F.conv2d(padded, weight, groups=c).movedim(1, -1)


@node("ImageBlur", category="image/postprocessing", display_name="Image Blur")
def image_blur(image: Image, blur_radius: Annotated[int, Int(1, min=1, max=31, step=1)],
               sigma: Annotated[float, Float(1.0, min=0.1, max=10.0, step=0.1)]) -> Image:
    """Gaussian blur over a (2 x radius + 1) square window, edges reflected."""
    image = _image(image)
    return _filter(image, _gaussian(blur_radius, sigma, image)).clamp(0, 1)


@node("ImageSharpen", category="image/postprocessing", display_name="Image Sharpen")
def image_sharpen(image: Image, sharpen_radius: Annotated[int, Int(1, min=1, max=31, step=1)],
                  sigma: Annotated[float, Float(1.0, min=0.1, max=10.0, step=0.01)],
                  alpha: Annotated[float, Float(1.0, min=0.0, max=5.0, step=0.01)]) -> Image:
    """Sharpens by subtracting a Gaussian-weighted neighbourhood (scaled by alpha x 10) from each pixel,
    with the centre weight chosen so flat areas keep their value."""
    image = _image(image)
    kernel = _gaussian(sharpen_radius, sigma, image) * -(alpha * 10)
    centre = sharpen_radius
    kernel[centre, centre] = kernel[centre, centre] - kernel.sum() + 1.0
    return _filter(image, kernel).clamp(0, 1)


DITHERS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]


def _bayer(n: int) -> np.ndarray:
    """The n x n ordered-dither threshold matrix, values in [0, 1)."""
    m = np.zeros((1, 1))
    while m.shape[0] < n:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return m / (n * n)


@node("ImageQuantize", category="image/postprocessing", display_name="Image Quantize")
def image_quantize(image: Image, colors: Annotated[int, Int(256, min=1, max=256, step=1)],
                   dither: Annotated[str, Combo(DITHERS)]) -> Image:
    """Reduces each image to a palette of `colors` colours taken from it, optionally dithered
    (error diffusion, or an ordered Bayer pattern of the given size)."""
    image = _image(image)
    out = []
    for frame in image[..., :3]:
        arr = np.clip(frame.detach().float().cpu().numpy() * 255.0, 0, 255)
        pil = PILImage.fromarray(arr.astype(np.uint8), "RGB")
        palette = pil.quantize(colors=colors)
        if dither.startswith("bayer-"):
            n = int(dither.split("-")[1])
            threshold = _bayer(n) - 0.5
            h, w = arr.shape[:2]
            tiled = np.tile(threshold, (h // n + 1, w // n + 1))[:h, :w, None]
            # the dither amplitude follows the palette size (two palette steps of an even ramp), +0.5 so
            # the cast to 8 bits rounds
            used = max(1, len(palette.getpalette() or []) // 3)
            spread = 2 * 256.0 / used
            pil = PILImage.fromarray(np.clip(arr + tiled * spread + 0.5, 0, 255).astype(np.uint8), "RGB")
            mode = PILImage.Dither.NONE
        else:
            mode = PILImage.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else PILImage.Dither.NONE
        quantized = pil.quantize(palette=palette, dither=mode).convert("RGB")
        out.append(torch.from_numpy(np.asarray(quantized, dtype=np.float32) / 255.0))
    result = torch.stack(out).to(image)
    if image.shape[-1] == 4:
        result = torch.cat([result, image[..., 3:]], dim=-1)
    return result


SPACING_COLORS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0),
                  "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


@node("ImageStitch", category="image/transform", display_name="Image Stitch")
def image_stitch(image1: Image, direction: Annotated[str, Combo(["right", "down", "left", "up"], default="right")],
                 match_image_size: Annotated[bool, Boolean(True)],
                 spacing_width: Annotated[int, Int(0, min=0, max=1024, step=2)],
                 spacing_color: Annotated[str, Combo(list(SPACING_COLORS), default="white")],
                 image2: Image | None = None) -> Image:
    """Places image2 next to image1 (right/left) or above/below it (up/down), optionally scaled to
    share the joining side, with a spacing strip between; without image2 image1 passes through."""
    a = _image(image1, "image1")
    if image2 is None:
        return a
    b = _image(image2, "image2")
    a, b = _same_channels(a, b)
    batch = max(a.shape[0], b.shape[0])
    a, b = _repeat_to(a, batch), _repeat_to(b, batch).to(a)
    horizontal = direction in ("left", "right")
    if match_image_size:
        # ComfyUI truncates the scaled side and resamples with Lanczos
        if horizontal:
            b = _resize_image(b, max(1, int(a.shape[1] * b.shape[2] / b.shape[1])), a.shape[1], "lanczos")
        else:
            b = _resize_image(b, a.shape[2], max(1, int(a.shape[2] * b.shape[1] / b.shape[2])), "lanczos")
    else:
        # pad the smaller one (centred) so the joining sides are the same length; white or black
        # spacing colours also colour the padding, other colours pad with black
        dim = 1 if horizontal else 2
        size = max(a.shape[dim], b.shape[dim])
        fill = {"white": 1.0}.get(spacing_color, 0.0)

        def pad(t: torch.Tensor) -> torch.Tensor:
            extra = size - t.shape[dim]
            if extra == 0:
                return t
            before = extra // 2
            spec = (0, 0, 0, 0, before, extra - before) if horizontal else (0, 0, before, extra - before)
            return F.pad(t, spec, value=fill)
        a, b = pad(a), pad(b)
    spacing_width += spacing_width % 2  # kept even, as ComfyUI does
    first, second = (b, a) if direction in ("left", "up") else (a, b)
    parts = [first]
    if spacing_width > 0:
        color = torch.tensor(SPACING_COLORS[spacing_color] + ((1.0,) if a.shape[-1] == 4 else ()),
                             dtype=a.dtype)[: a.shape[-1]]
        shape = (batch, a.shape[1], spacing_width) if horizontal else (batch, spacing_width, a.shape[2])
        parts.append(color.expand(shape + (a.shape[-1],)).to(a.device))
    parts.append(second)
    return torch.cat(parts, dim=2 if horizontal else 1)


def output_images() -> list[str]:
    """Image files in the output folder, as `name [output]` combo choices."""
    base = runtime().output_dir
    if not base.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/") + " [output]")
    return sorted(found)


def _as_output_name(image: str) -> str:
    return image if _ANNOTATION.match(image) else f"{image} [output]"


@node("LoadImageOutput", category="image", display_name="Load Image (from Outputs)",
      validate=lambda image: _validate_image(_as_output_name(image)),
      fingerprint=lambda image: _file_sha256(_as_output_name(image)))
def load_image_output(image: Annotated[str, Combo(output_images, image_upload=True, image_folder="output")],
                      ) -> tuple[Image, Mask]:
    """Loads an image from the output folder (an earlier result), like LoadImage."""
    return load_image(_as_output_name(image))


# ---- streaming to the client ------------------------------------------------------------------------

@node("SaveImageWebsocket", category="api node/image", display_name="Save Image (Websocket)", output_node=True,
      deterministic=False)
def save_image_websocket(images: Image) -> NodeOutput:
    """Sends each image as a PNG in a binary websocket frame (type 2, as ComfyUI's websocket image example
    expects) to the client that queued the prompt; nothing is written to disk."""
    import io
    import struct

    from engine.events import Event
    from engine.progress import emit_event

    for i, frame in enumerate(images):
        buf = io.BytesIO()
        tensor_to_pil(frame).save(buf, format="PNG", compress_level=1)
        # frame layout: event type (2 = unencoded preview image), image format (2 = PNG), PNG bytes
        emit_event(Event("image_frame", {"frame": struct.pack(">II", 2, 2) + buf.getvalue(), "index": i}))
    return NodeOutput((), None)

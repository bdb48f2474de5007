"""Image nodes: load from the input folder, save and preview with ComfyUI's PNG metadata, and resize."""
from __future__ import annotations

from typing import Annotated, Any

import hashlib
import os
import random
import re
import string
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage, ImageOps, ImageSequence, PngImagePlugin

from engine.inputs import Combo, Float, Hidden, Int, String
from engine.node import UI, NodeOutput, node
from engine.paths import UnsafePathError, contained_path
from engine.png_metadata import png_text_chunks

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
    return True if path.is_file() else f"Invalid image file: {image}"


def _file_sha256(image: str) -> str:
    digest = hashlib.sha256()
    with open(annotated_path(image), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(path: Path) -> PILImage.Image:
    try:
        img = PILImage.open(path)
        img.load()
        return img
    except Exception as exc:
        raise ValueError(f"cannot read image {path.name!r}: {exc}") from None


def _frames(img: PILImage.Image) -> list[PILImage.Image]:
    frames = []
    for frame in ImageSequence.Iterator(img):
        frames.append(ImageOps.exif_transpose(frame))
        if img.format == "MPO":   # MPO's extra frames are depth maps, not a batch
            break
    return frames


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


@node("LoadImage", category="image", display_name="Load Image", validate=_validate_image,
      fingerprint=_file_sha256)
def load_image(image: Annotated[str, Combo(input_images, image_upload=True)]) -> tuple[Image, Mask]:
    """Loads an image from the input folder; its alpha channel becomes the mask (1 = transparent)."""
    img = _open(annotated_path(image))
    images, masks = [], []
    for frame in _frames(img):
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
               prompt: Annotated[Any, Hidden("PROMPT")] = None, extra_pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> NodeOutput:
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

@node("ImageScale", category="image/upscaling", display_name="Upscale Image")
def image_scale(image: Image, upscale_method: Annotated[str, Combo(IMAGE_METHODS)],
                width: Annotated[int, Int(512, min=0, max=MAX_RESOLUTION, step=1)],
                height: Annotated[int, Int(512, min=0, max=MAX_RESOLUTION, step=1)],
                crop: Annotated[str, Combo(["disabled", "center"])]) -> Image:
    """Resizes images; 0 in one dimension keeps the aspect ratio, both 0 leaves the image unchanged."""
    if width == 0 and height == 0:
        return image
    w, h = keep_aspect(width, height, image.shape[2], image.shape[1])
    return resize(image.movedim(-1, 1), w, h, upscale_method, crop).movedim(1, -1)


@node("ImageScaleBy", category="image/upscaling", display_name="Upscale Image By")
def image_scale_by(image: Image, upscale_method: Annotated[str, Combo(IMAGE_METHODS)],
                   scale_by: Annotated[float, Float(1.0, min=0.01, max=8.0, step=0.01)]) -> Image:
    """Resizes images by a factor (dimensions rounded)."""
    w, h = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
    return resize(image.movedim(-1, 1), max(1, w), max(1, h), upscale_method, "disabled").movedim(1, -1)


@node("ImageInvert", category="image")
def image_invert(image: Image) -> Image:
    return 1.0 - image


@node("EmptyImage", category="image")
def empty_image(width: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)], height: Annotated[int, Int(512, min=1, max=MAX_RESOLUTION, step=1)],
                batch_size: Annotated[int, Int(1, min=1, max=4096)], color: Annotated[int, Int(0, min=0, max=0xFFFFFF, step=1, display="color")]) -> Image:
    r, g, b = ((color >> 16) & 0xFF) / 255.0, ((color >> 8) & 0xFF) / 255.0, (color & 0xFF) / 255.0
    return torch.tensor([r, g, b]).expand(batch_size, height, width, 3).clone()


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

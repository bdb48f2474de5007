"""Memory estimates of the SD nodes (`cost=` in their decorators; engine/cost.py runs them at validation).

Sizes flow as `{"shape": (...)}`: latents as (batch, channels, h, w), images as (batch, h, w, channels).
The figures are coarse on purpose: output tensors in float32 plus the working memory of one chunk where the
node works in chunks (VAE decode/encode, tiled upscaling), or of the whole batch where it does not
(sampling). They are there to refuse what cannot fit, not to predict peaks.
"""
from __future__ import annotations

from typing import Any

from engine.cost import Estimate, tensor_bytes  # noqa: F401  (re-exported for node modules)

VAE_WORK_PER_PIXEL = 128 * 4 * 6        # decoder/encoder activations alive at full resolution, per pixel
UNET_WORK_PER_POSITION = 320 * 4 * 24   # UNet activations per latent position and batch entry
LATENT_CHANNELS = 4


def _shape(size: Any) -> tuple[int, ...] | None:
    shape = size.get("shape") if isinstance(size, dict) else None
    return tuple(int(d) for d in shape) if shape else None


def _latent(b: int, h: int, w: int, c: int = LATENT_CHANNELS) -> dict:
    return {"shape": (b, c, h, w)}


def _image(b: int, h: int, w: int, c: int = 3) -> dict:
    return {"shape": (b, h, w, c)}


def empty_latent(width: int, height: int, batch_size: int, **_: Any) -> Estimate:
    out = _latent(batch_size, height // 8, width // 8)
    return Estimate(tensor_bytes(out["shape"]), [out], ("width", "height", "batch_size"))


def empty_image(width: int, height: int, batch_size: int, **_: Any) -> Estimate:
    out = _image(batch_size, height, width)
    return Estimate(tensor_bytes(out["shape"]), [out], ("width", "height", "batch_size"))


def vae_decode(samples: Any = None, **_: Any) -> Estimate | None:
    shape = _shape(samples)
    if shape is None or len(shape) != 4:
        return None
    b, _c, h, w = shape
    out = _image(b, h * 8, w * 8)
    # the whole output, plus one sample's working memory (the decode runs in chunks down to one sample)
    return Estimate(tensor_bytes(out["shape"]) + h * 8 * w * 8 * VAE_WORK_PER_PIXEL, [out], ("samples",))


def vae_encode(pixels: Any = None, **_: Any) -> Estimate | None:
    shape = _shape(pixels)
    if shape is None or len(shape) != 4:
        return None
    b, h, w, _c = shape
    out = _latent(b, h // 8, w // 8)
    return Estimate(tensor_bytes(out["shape"]) + tensor_bytes(shape) + h * w * VAE_WORK_PER_PIXEL, [out],
                    ("pixels",))


def ksampler(latent_image: Any = None, **_: Any) -> Estimate | None:
    shape = _shape(latent_image)
    if shape is None or len(shape) != 4:
        return None
    b, _c, h, w = shape
    # the batch runs at once, positive and negative together
    work = 2 * b * h * w * UNET_WORK_PER_POSITION
    return Estimate(work + 4 * tensor_bytes(shape), [latent_image], ("latent_image",))


def latent_upscale(samples: Any = None, width: int = 0, height: int = 0, **_: Any) -> Estimate | None:
    shape = _shape(samples)
    if shape is None:
        return None
    b, c, h, w = shape
    if width == 0 and height == 0:
        return Estimate(0, [samples])
    nw = width // 8 if width else max(1, round(w * (height / 8) / max(h, 1)))
    nh = height // 8 if height else max(1, round(h * (width / 8) / max(w, 1)))
    out = _latent(b, max(nh, 8), max(nw, 8), c)
    return Estimate(tensor_bytes(out["shape"]) + tensor_bytes(shape), [out], ("width", "height"))


def latent_upscale_by(samples: Any = None, scale_by: float = 1.0, **_: Any) -> Estimate | None:
    shape = _shape(samples)
    if shape is None:
        return None
    b, c, h, w = shape
    out = _latent(b, max(1, round(h * scale_by)), max(1, round(w * scale_by)), c)
    return Estimate(tensor_bytes(out["shape"]) + tensor_bytes(shape), [out], ("scale_by",))


def image_scale(image: Any = None, width: int = 0, height: int = 0, **_: Any) -> Estimate | None:
    shape = _shape(image)
    if shape is None:
        return None
    b, h, w, c = shape
    if width == 0 and height == 0:
        return Estimate(0, [image])
    nw = width or max(1, round(w * height / max(h, 1)))
    nh = height or max(1, round(h * width / max(w, 1)))
    out = _image(b, nh, nw, c)
    return Estimate(tensor_bytes(out["shape"]) + tensor_bytes(shape), [out], ("width", "height"))


def image_scale_by(image: Any = None, scale_by: float = 1.0, **_: Any) -> Estimate | None:
    shape = _shape(image)
    if shape is None:
        return None
    b, h, w, c = shape
    out = _image(b, max(1, round(h * scale_by)), max(1, round(w * scale_by)), c)
    return Estimate(tensor_bytes(out["shape"]) + tensor_bytes(shape), [out], ("scale_by",))


def upscale_with_model(image: Any = None, **_: Any) -> Estimate | None:
    """The model's factor is known only once it is loaded: 4x, the common one, is assumed."""
    shape = _shape(image)
    if shape is None:
        return None
    b, h, w, c = shape
    out = _image(b, h * 4, w * 4, c)
    return Estimate(tensor_bytes(out["shape"]) + tensor_bytes(shape), [out], ("image",))

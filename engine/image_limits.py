"""The pixel budget of an image file, checked from its header before anything is decoded.

A 353 KB PNG can declare 11000x11000 pixels (6.5 GB once decoded as float RGB): uploads and image loaders
read the size from the header first and refuse what exceeds the budget. PIL is imported only when a check
runs (the engine does not need it otherwise).
"""
from __future__ import annotations

import os
import warnings
from typing import IO, Any

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024       # 8192 x 8192


class ImageTooLarge(ValueError):
    """An image declares more pixels than the budget allows."""


def image_size(source: str | os.PathLike | IO[bytes]) -> tuple[int, int] | None:
    """(width, height) from the header, or None when PIL does not recognise the data as an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():        # PIL warns above its own limit; the budget decides here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:    # reads the header only; no pixel data is decoded
                return img.size
    except Image.DecompressionBombError:       # PIL's own hard limit (twice MAX_IMAGE_PIXELS): over any budget
        return (1 << 20, 1 << 20)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def check_pixels(width: int, height: int, budget: int | None, what: str = "image") -> None:
    if budget and width * height > budget:
        raise ImageTooLarge(f"{what} is {width}x{height} = {width * height:,} pixels, over the budget of "
                            f"{budget:,} pixels (--max-image-pixels)")


def check_image_file(source: Any, budget: int | None, what: str = "image") -> tuple[int, int] | None:
    """Refuse (ImageTooLarge) an image whose header declares more than `budget` pixels; returns its size."""
    size = image_size(source)
    if size is not None:
        check_pixels(size[0], size[1], budget, what)
    if hasattr(source, "seek"):
        source.seek(0)
    return size


def pixel_budget(config: Any) -> int | None:
    """The budget of a RuntimeConfig (or anything with `max_image_pixels`); the default without one."""
    value = getattr(config, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS) if config is not None \
        else DEFAULT_MAX_IMAGE_PIXELS
    return value or None

"""ComfyUI's `node_helpers`: conditioning edits and tolerant PIL opening."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any


def conditioning_set_values(conditioning: list, values: dict | None = None, append: bool = False) -> list:
    """A copy of `conditioning` ([[tensor, options], ...]) with `values` set in every entry's options
    (appended to an existing list value with `append`)."""
    out = []
    for tensor, options in conditioning:
        options = dict(options)
        for key, value in (values or {}).items():
            if append and isinstance(options.get(key), list):
                options[key] = options[key] + list(value)
            else:
                options[key] = value
        out.append([tensor, options])
    return out


def pillow(fn: Callable[[Any], Any], arg: Any) -> Any:
    """`fn(arg)`, retried once with truncated images allowed (ComfyUI's tolerance for damaged PNGs)."""
    from PIL import ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        return fn(arg)
    except (OSError, SyntaxError, ValueError):
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return fn(arg)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def hasher() -> Callable[..., Any]:
    return hashlib.sha256

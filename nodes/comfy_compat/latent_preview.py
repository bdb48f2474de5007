"""ComfyUI's `latent_preview`: the sampler callback packs pass to their own sampling loops."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine import progress

# ComfyUI's latent_preview has these from comfy.cli_args in its namespace, and packs reach them there
# (efficiency-nodes sets `args.preview_method = latent_preview.LatentPreviewMethod.TAESD`).
from .cli_args import LatentPreviewMethod, args  # noqa: F401

MAX_PREVIEW_RESOLUTION = 512


def get_previewer(device: Any = None, latent_format: Any = None) -> None:
    """sdflow makes its step previews inside its own samplers; packs get none."""
    return None


def prepare_callback(model: Any, steps: int, x0_output_dict: dict | None = None) -> Callable[..., None]:
    def callback(step: int, x0: Any, x: Any, total_steps: int) -> None:
        if x0_output_dict is not None:
            x0_output_dict["x0"] = x0
        progress.report(step + 1, total_steps or steps)
    return callback

"""Model-based image upscaling: UpscaleModelLoader and ImageUpscaleWithModel.

spandrel (and the torchvision it needs) is imported only inside the loader, so the node set starts
without them and a workflow that never loads an upscaler never needs them.
"""
from __future__ import annotations

from typing import Annotated

import torch

from engine import progress
from engine.inputs import Combo
from engine.node import node

from . import costs
from .models.upscale import UpscaleModelHandle, load_upscale_model, tiled_upscale
from .runtime import model_file_exists, model_file_fingerprint, model_files, runtime
from .types import Image, UpscaleModel

TILE, OVERLAP, MIN_TILE = 512, 32, 128


@node("UpscaleModelLoader", category="loaders", display_name="Load Upscale Model",
      fingerprint=model_file_fingerprint("upscale_models", "model_name"),
      validate=model_file_exists("upscale_models", "model_name", "upscale model"))
def upscale_model_loader(model_name: Annotated[str, Combo(model_files("upscale_models"))]) -> UpscaleModel:
    """Loads an image upscale model (ESRGAN, SwinIR, ... through spandrel)."""
    return load_upscale_model(runtime().folders.require("upscale_models", model_name), "UpscaleModelLoader")


@node("ImageUpscaleWithModel", category="image/upscaling", display_name="Upscale Image (using Model)",
      cost=costs.upscale_with_model)
def image_upscale_with_model(upscale_model: UpscaleModel, image: Image) -> Image:
    """Upscales an image with an upscale model, in 512px tiles (smaller ones if memory runs out)."""
    handle: UpscaleModelHandle = upscale_model
    handle.ensure_loaded()
    device = handle.current_device or torch.device(handle.load_device)
    pixels = image.movedim(-1, -3).to(device)
    out = tiled_upscale(pixels, handle, handle.scale, tile=TILE, overlap=OVERLAP, min_tile=MIN_TILE,
                        dtype=handle.dtype, on_progress=lambda done, total: progress.report(done, total))
    return torch.clamp(out.movedim(-3, -1), min=0.0, max=1.0).cpu()

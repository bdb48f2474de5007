"""Image upscale models (ESRGAN and friends) and tiled upscaling.

Loading is done by the optional `spandrel` package, which recognises the many upscaler
architectures from their state dicts. spandrel imports torchvision, so it is imported only when a
model is actually loaded: nothing here (or in the node module) pulls either in at start-up, and a
missing or broken install becomes one clear error naming the node.

`tiled_upscale` works with any callable model of a known integer scale: the image is cut into
overlapping tiles, each tile is upscaled on its own, and the results are blended with weights
that fade to zero near a tile's inner edges (where the model saw zero padding instead of the
neighbouring pixels), so no seams show.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import progress

from .memory import ResidentMixin, WeightsHolder, default_device, is_out_of_memory
from .state_dict import ModelFileError, read_state_dict

INSTALL_HINT = ("upscale models need the optional 'spandrel' package (pip install 'sdflow[upscale]'), "
                "which needs a working torchvision")


class UpscaleDependencyError(RuntimeError):
    """spandrel (or the torchvision it needs) cannot be imported."""


# `make setup` installs spandrel and its torchvision here, outside site-packages: where the torchvision wheel
# does not match the torch build (PyPI's CUDA torchvision beside a CPU torch), an importable torchvision breaks
# `import diffusers` and `import transformers`, so it is put on sys.path only when an upscaler is loaded.
EXTRAS_DIR = Path(sys.prefix) / "extras" / "upscale"


def import_spandrel(node_name: str = "UpscaleModelLoader") -> Any:
    try:
        return importlib.import_module("spandrel")
    except ImportError as exc:
        if not EXTRAS_DIR.is_dir() or str(EXTRAS_DIR) in sys.path:
            raise UpscaleDependencyError(f"{node_name}: {INSTALL_HINT}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:   # whatever a broken torchvision raises while importing
        raise UpscaleDependencyError(f"{node_name}: {INSTALL_HINT}: {type(exc).__name__}: {exc}") from exc
    sys.path.append(str(EXTRAS_DIR))
    try:
        return importlib.import_module("spandrel")
    except Exception as exc:
        # leave nothing half-imported behind: a later find_spec("torchvision") must not find a broken one
        sys.path.remove(str(EXTRAS_DIR))
        for name in [m for m in sys.modules if m.split(".")[0] in ("spandrel", "torchvision", "einops")]:
            del sys.modules[name]
        raise UpscaleDependencyError(f"{node_name}: {INSTALL_HINT} (tried {EXTRAS_DIR}): "
                                     f"{type(exc).__name__}: {exc}") from exc


class UpscaleModelHandle(ResidentMixin):
    """What the UPSCALE_MODEL socket carries: a module, its scale, and how to call it."""

    def __init__(self, module: nn.Module, scale: int, call: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: str | None = None, source: str | Path | None = None) -> None:
        if int(scale) != scale or scale < 1:
            raise ValueError(f"upscale factor must be a positive integer, got {scale!r}")
        self._weights = WeightsHolder({"model": module})
        self.scale = int(scale)
        self._call = call
        self.load_device = device or default_device()
        self.source = source

    @property
    def module(self) -> nn.Module:
        return self._weights.modules["model"]  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        param = next(self.module.parameters(), None)
        return param.dtype if param is not None else torch.float32

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self._call or self.module)(x)


def load_upscale_model(path: str | Path, node_name: str = "UpscaleModelLoader") -> UpscaleModelHandle:
    """Load an upscaler through spandrel (safe weight loading; single-image models only)."""
    spandrel = import_spandrel(node_name)
    path = Path(path)
    sd = read_state_dict(path)
    # Some SwinIR/HAT releases were saved from a DataParallel wrapper.
    if "module.layers.0.residual_group.blocks.0.norm1.weight" in sd:
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(sd)
    except Exception as exc:   # spandrel raises its own error types for unknown architectures
        raise ModelFileError(path, f"not a recognised upscale model: {type(exc).__name__}: {exc}") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ModelFileError(path, "Upscale model must be a single-image model.")
    descriptor.eval()
    return UpscaleModelHandle(descriptor.model, descriptor.scale, call=descriptor, source=path)


# ------------------------------------------------------------------------------------------ tiling

def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return sorted(set(starts))


def _ramp(length: int, fade: int, left: bool, right: bool, device: torch.device) -> torch.Tensor:
    """1-D blend weights for one tile axis: 1 inside, fading over `fade` pixels at inner edges and
    exactly zero over the outermost quarter of the fade (pixels that saw padding)."""
    w = torch.ones(length, device=device)
    if fade <= 0:
        return w
    margin = fade // 4
    idx = torch.arange(length, device=device, dtype=torch.float32)
    ramp = ((idx + 1 - margin) / max(fade - margin, 1)).clamp(0.0, 1.0)
    if left:
        w = torch.minimum(w, ramp)
    if right:
        w = torch.minimum(w, ramp.flip(0))
    return w


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    overlap = min(overlap, tile // 4)
    return len(_starts(height, tile, overlap)) * len(_starts(width, tile, overlap))


@torch.no_grad()
def upscale_tiles(image: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor], scale: int,
                  tile: int = 512, overlap: int = 32, dtype: torch.dtype | None = None,
                  on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """`image` [B,C,H,W] -> [B,C',H*scale,W*scale] in float32, one tile size, no OOM handling."""
    b, _, h, w = image.shape
    overlap = min(overlap, tile // 4)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    fade = overlap * scale
    out: torch.Tensor | None = None
    weight = torch.zeros(1, 1, h * scale, w * scale, device=image.device)
    for y in ys:
        th = min(tile, h - y)
        wy = _ramp(th * scale, fade, y > 0, y + th < h, image.device)
        for x in xs:
            tw = min(tile, w - x)
            wx = _ramp(tw * scale, fade, x > 0, x + tw < w, image.device)
            piece = image[:, :, y: y + th, x: x + tw]
            if dtype is not None:
                piece = piece.to(dtype)
            res = model(piece).float()
            if tuple(res.shape[-2:]) != (th * scale, tw * scale):
                raise ValueError(f"upscale model returned {tuple(res.shape[-2:])} for a {th}x{tw} tile; "
                                 f"expected x{scale}")
            if out is None:
                out = torch.zeros(b, res.shape[1], h * scale, w * scale, device=image.device)
            mask = wy[:, None] * wx[None, :]
            oy, ox = y * scale, x * scale
            out[:, :, oy: oy + th * scale, ox: ox + tw * scale] += res.to(image.device) * mask
            weight[:, :, oy: oy + th * scale, ox: ox + tw * scale] += mask
            if on_tile is not None:
                on_tile()
    assert out is not None
    return out / weight


def tiled_upscale(image: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor], scale: int,
                  tile: int = 512, overlap: int = 32, min_tile: int = 128, dtype: torch.dtype | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Tiled upscale with ComfyUI's out-of-memory fallback: on OOM the tile size is halved and the
    whole image redone, down to `min_tile` (below that the error is raised)."""
    while True:
        total = image.shape[0] * tile_count(image.shape[2], image.shape[3], tile, overlap)
        done = [0]

        def step(done: list[int] = done, total: int = total) -> None:
            progress.check_interrupt()   # after every tile, whoever called (the node reports progress too)
            done[0] += 1
            if on_progress is not None:
                on_progress(done[0], total)

        try:
            # One image at a time keeps the peak memory of a tile independent of the batch size.
            return torch.cat([upscale_tiles(image[i: i + 1], model, scale, tile, overlap, dtype, step)
                              for i in range(image.shape[0])])
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            tile //= 2
            if tile < min_tile:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

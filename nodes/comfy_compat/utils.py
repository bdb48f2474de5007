"""ComfyUI's `comfy.utils`: image resizing, weights-only file loading and a progress bar for packs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine import progress

from ..imaging import resize

PROGRESS_BAR_ENABLED = True
MAX_RESOLUTION = 16384


def set_progress_bar_enabled(enabled: bool) -> None:
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = enabled


def common_upscale(samples: torch.Tensor, width: int, height: int, upscale_method: str,
                   crop: str) -> torch.Tensor:
    """Resize [B,C,H,W] samples (ComfyUI's methods: nearest-exact, bilinear, area, bicubic, lanczos, bislerp)."""
    return resize(samples, int(width), int(height), upscale_method, crop)


def load_torch_file(ckpt: str | Path, safe_load: bool = False, device: Any = None,
                    return_metadata: bool = False) -> Any:
    """A weights file as a state dict; pickle files are read weights-only whatever `safe_load` says."""
    from ..models.state_dict import read_metadata, read_state_dict

    sd = read_state_dict(ckpt)
    if device is not None:
        sd = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    if return_metadata:
        meta = read_metadata(ckpt) if str(ckpt).endswith((".safetensors", ".sft")) else None
        return sd, meta
    return sd


def state_dict_prefix_replace(state_dict: dict, replace_prefix: dict, filter_keys: bool = False) -> dict:
    out = {} if filter_keys else state_dict
    for old, new in replace_prefix.items():
        for key in [k for k in state_dict if k.startswith(old)]:
            out[new + key[len(old):]] = state_dict.pop(key)
    return out


class ProgressBar:
    """Reports through sdflow's progress events (the node's `progress` messages, interrupt checks)."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = total
        self.current = 0
        self.node_id = node_id

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total) if self.total else value
        if PROGRESS_BAR_ENABLED:
            progress.report(self.current, self.total, _preview_image(preview))

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


def _preview_image(preview: Any) -> Any:
    # ComfyUI passes ("JPEG", PIL image, max size); sdflow's previews take the image itself.
    if isinstance(preview, tuple) and len(preview) >= 2:
        return preview[1]
    return preview


def __getattr__(name: str) -> Any:
    # What sdflow does not offer of comfy.utils is a placeholder that says so when called.
    if name.startswith("__"):
        raise AttributeError(name)
    from .stubs import placeholder
    return placeholder("comfy.utils", name)

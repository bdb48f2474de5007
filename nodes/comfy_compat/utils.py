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



# The key-name correspondences between the original (LDM) SD UNet layout and diffusers' layout, as
# comfy.utils exposes them: packs import these tables at load time to map ControlNet and UNet weights.
_WB = ("weight", "bias")
UNET_MAP_ATTENTIONS = {f"{part}.{p}" for part in ("proj_in", "proj_out", "norm") for p in _WB}
TRANSFORMER_BLOCKS = (
    {f"norm{i}.{p}" for i in (1, 2, 3) for p in _WB}
    | {f"attn{a}.to_{x}.weight" for a in (1, 2) for x in "qkv"}
    | {f"attn{a}.to_out.0.{p}" for a in (1, 2) for p in _WB}
    | {f"ff.net.{part}.{p}" for part in ("0.proj", "2") for p in _WB}
)
# LDM resnet key -> diffusers resnet key.
UNET_MAP_RESNET = {
    f"{ldm}.{p}": f"{diffusers}.{p}"
    for ldm, diffusers in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
    for p in _WB
}
# (LDM key, diffusers key) of the UNet's top-level layers; the label embedding has two diffusers names.
UNET_MAP_BASIC = {
    (f"{ldm}.{p}", f"{diffusers}.{p}")
    for ldm, diffusers in (("label_emb.0.0", "class_embedding.linear_1"), ("label_emb.0.2", "class_embedding.linear_2"),
                           ("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"),
                           ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
                           ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"))
    for p in _WB
}

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

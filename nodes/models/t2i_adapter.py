"""T2I-Adapters: small networks that turn a hint image into features added inside the UNet's
down blocks (diffusers' `down_intrablock_additional_residuals`). They load through the same
ControlNet loader nodes as in ComfyUI, and are applied like a ControlNet (strength, start/end).

Files come in two layouts:
- diffusers (`adapter.conv_in.*`, `adapter.body.I.resnets.J.block1.*`, ...), as a folder with a
  T2IAdapter config.json or as a bare file;
- the original TencentARC one (`conv_in.*`, `body.N.block1.*` with N = 2*I + J for the full adapter;
  `body.I.in_conv`, `body.I.body.J.*`, `body.I.out_conv` for the light one), optionally under an
  `adapter` key.
The config is inferred from the tensor shapes: channels and block counts from the convs, the
pixel-unshuffle factor from conv_in's width (16 for the SDXL adapters, whose input is 256 or 768
wide, 8 otherwise). diffusers' classes cover the full, light and SDXL full adapters; the style
adapter (a CLIP-vision token adapter) and original files with learned down-sampling convs are not
built by diffusers and are refused with a clear error.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import _materialize
from .memory import ResidentMixin, WeightsHolder, default_device
from .state_dict import ModelFileError, read_state_dict

if TYPE_CHECKING:
    from diffusers.models.adapter import T2IAdapter  # not diffusers' no-torch placeholder

_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors")


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    inner = sd.get("adapter") if isinstance(sd, Mapping) else None
    return inner if isinstance(inner, Mapping) else sd


def is_t2i_adapter(sd: Mapping[str, torch.Tensor]) -> bool:
    """Either layout of a T2I-Adapter (the style adapter included, so that it gets a clear refusal)."""
    sd = _unwrap(sd)
    if any(k.startswith("adapter.body.") for k in sd) or "style_embedding" in sd:
        return True
    return "body.0.in_conv.weight" in sd or ("conv_in.weight" in sd and "body.0.block1.weight" in sd)


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TencentARC keys -> diffusers T2IAdapter keys (diffusers files pass through)."""
    sd = _unwrap(sd)
    if any(k.startswith("adapter.") for k in sd):
        return dict(sd)
    if "style_embedding" in sd:
        raise ValueError("style T2I-Adapters (CLIP-vision tokens) are not supported")
    if any(".down_opt." in k or ".skep." in k for k in sd):
        raise ValueError("T2I-Adapters with learned down-sampling or skip convs are not supported "
                         "(diffusers' adapters down-sample by average pooling)")
    out: dict[str, torch.Tensor] = {}
    light = "body.0.in_conv.weight" in sd
    per = 0 if light else _blocks_per_level(sd)
    for key, value in sd.items():
        if light:
            m = re.match(r"body\.(\d+)\.body\.(\d+)\.(.+)", key)
            new = f"adapter.body.{m.group(1)}.resnets.{m.group(2)}.{m.group(3)}" if m else "adapter." + key
        else:
            m = re.match(r"body\.(\d+)\.(.+)", key)
            if m:
                i, j = divmod(int(m.group(1)), per)
                leaf = m.group(2)
                new = (f"adapter.body.{i}.{leaf}" if leaf.startswith("in_conv.")
                       else f"adapter.body.{i}.resnets.{j}.{leaf}")
            else:
                new = "adapter." + key
        out[new] = value
    return out


def _blocks_per_level(sd: Mapping[str, torch.Tensor]) -> int:
    """Resnet blocks per level of an original full adapter: level 1 opens with the first width change
    (its block has an in_conv), so that block's index is the count; 2 (every released adapter) otherwise."""
    firsts = _indices(sd, r"body\.(\d+)\.in_conv\.weight$")
    return firsts[0] if firsts and firsts[0] > 0 else 2


def diffusers_to_original(sd: Mapping[str, torch.Tensor], num_res_blocks: int, light: bool) -> dict[str, torch.Tensor]:
    """diffusers T2IAdapter keys -> TencentARC keys (for writing files in the original layout)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        rest = key.removeprefix("adapter.")
        m = re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
        if m and light:
            rest = f"body.{m.group(1)}.body.{m.group(2)}.{m.group(3)}"
        elif m:
            rest = f"body.{int(m.group(1)) * num_res_blocks + int(m.group(2))}.{m.group(3)}"
        elif (m := re.match(r"body\.(\d+)\.in_conv\.(.+)", rest)) and not light:
            rest = f"body.{int(m.group(1)) * num_res_blocks}.in_conv.{m.group(2)}"
        out[rest] = value
    return out


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """T2IAdapter config from diffusers-layout keys."""
    blocks = _indices(sd, r"adapter\.body\.(\d+)\.")
    res = _indices(sd, r"adapter\.body\.0\.resnets\.(\d+)\.")
    if not blocks or not res:
        raise ValueError("no adapter blocks")
    if "adapter.conv_in.weight" in sd:
        width = int(sd["adapter.conv_in.weight"].shape[1])
        factor = 16 if width in (256, 768) else 8
        channels = [int(sd[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0]) for i in blocks]
        adapter_type = "full_adapter_xl" if factor == 16 else "full_adapter"
    else:
        width = int(sd["adapter.body.0.in_conv.weight"].shape[1])
        factor = 8
        # the light adapter repeats its last width in one more down-sampling block
        channels = [int(sd[f"adapter.body.{i}.out_conv.weight"].shape[0]) for i in blocks[:-1]]
        adapter_type = "light_adapter"
    if width % (factor * factor):
        raise ValueError(f"adapter input width {width} is not a multiple of {factor}x{factor}")
    return {"in_channels": width // (factor * factor), "channels": channels, "num_res_blocks": len(res),
            "downscale_factor": factor, "adapter_type": adapter_type}


def _sidecar(path: Path) -> dict | None:
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileError(cfg_path, "not valid JSON") from None
    return cfg if cfg.get("_class_name") == "T2IAdapter" else None


def is_t2i_adapter_folder(path: Path) -> bool:
    return path.is_dir() and _sidecar(path) is not None


def load_t2i_adapter(path: str | Path, *, dtype: torch.dtype = torch.float32,
                     sd: Mapping[str, torch.Tensor] | None = None) -> T2IAdapter:
    """A diffusers T2IAdapter from a folder, a diffusers-layout file or an original-layout file."""
    from diffusers.models.adapter import T2IAdapter

    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in _WEIGHTS if (path / n).is_file()), None)
        if weights is None:
            raise ModelFileError(path, "T2I-Adapter folder has no diffusion_pytorch_model weights")
        return load_t2i_adapter(weights, dtype=dtype)
    if sd is None:
        sd = read_state_dict(path)
    try:
        diff = original_to_diffusers(sd)
        config = _sidecar(path) or infer_config(diff)
        args = ("in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type")
        cfg = {k: config[k] for k in args if k in config}
        model = _materialize(lambda: T2IAdapter(**cfg), diff, dtype, path, "T2I-Adapter")
    except (KeyError, ValueError, IndexError, TypeError, AttributeError, RuntimeError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(path, f"unsupported T2I-Adapter: {e}") from None
    unused = set(diff) - set(model.state_dict())
    if unused:
        raise ModelFileError(path, f"T2I-Adapter has {len(unused)} tensors the model does not use, "
                                   f"e.g. {sorted(unused)[0]!r}")
    return model


class T2IAdapterHandle(ResidentMixin):
    """What the CONTROL_NET socket carries for a T2I-Adapter; `apply_hint` as for a ControlNet."""

    def __init__(self, model: T2IAdapter, device: str | None = None, source: str | Path | None = None) -> None:
        self._weights = WeightsHolder({"adapter": model})
        self.load_device = device or default_device()
        self.source = source

    @property
    def model(self) -> T2IAdapter:
        return self._weights.modules["adapter"]  # type: ignore[return-value]

    @property
    def in_channels(self) -> int:
        return int(self.model.config["in_channels"])

    def apply_hint(self, image: torch.Tensor, strength: float, percent_range: tuple[float, float] = (0.0, 1.0),
                   previous: Any = None):
        from .controlnet import AdapterApplication

        return AdapterApplication(self, image, strength, percent_range, previous)

    @torch.no_grad()
    def features(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """Adapter features of a hint [B,C,H,W] in 0..1 (H, W multiples of the unshuffle factor)."""
        self.ensure_loaded()
        param = next(self.model.parameters())
        if self.in_channels == 1 and hint.shape[1] > 1:
            hint = hint.mean(dim=1, keepdim=True)  # sketch/canny adapters read one channel
        return [f.float() for f in self.model(hint.to(param.device, param.dtype))]

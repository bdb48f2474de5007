"""A bare UNet file (ComfyUI's `diffusion_models`/`unet` folder): only the diffusion model, no text encoder
or VAE, in the original LDM layout (`input_blocks.*`, optionally under `model.diffusion_model.`) or the
diffusers layout (`down_blocks.*`, as `unet/diffusion_pytorch_model.safetensors`).

Both layouts go through the checkpoint loader's own path: diffusers keys are renamed to LDM keys first,
so architecture detection and config inference are the ones single-file checkpoints use.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import detect, ldm_keys
from .checkpoint import _build_unet
from .state_dict import ModelFileError, read_metadata, read_state_dict

# ComfyUI's weight_dtype choices for UNETLoader
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
_FP8 = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e4m3fn_fast": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
SDXL_POOLED_DIM = 1280   # OpenCLIP-G's projection width: a bare SDXL UNet file does not carry it


def _is_diffusers_layout(sd) -> bool:
    return "conv_in.weight" in sd and any(k.startswith("down_blocks.") for k in sd)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _diffusers_to_ldm(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Rename diffusers UNet keys to LDM keys. The renaming needs only the block structure, which the
    keys themselves carry (a `config.json` beside the file is used when present)."""
    cfg_file = path.with_name("config.json")
    layout: dict = {}
    if cfg_file.is_file():
        try:
            layout = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            layout = {}
    keys = list(sd)
    if "layers_per_block" not in layout or "up_block_types" not in layout:
        levels = _count(keys, r"up_blocks\.(\d+)\.")
        layout = {
            "layers_per_block": _count(keys, r"down_blocks\.0\.resnets\.(\d+)\."),
            "up_block_types": ["CrossAttnUpBlock2D" if any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
                               else "UpBlock2D" for i in range(levels)],
        }
    try:
        return ldm_keys.unet_diffusers_to_ldm(sd, layout)
    except KeyError as e:
        raise ModelFileError(path, f"not a Stable Diffusion UNet in diffusers layout: {e}") from None


def _fp8_round_trip(model: torch.nn.Module, weight_dtype: str) -> None:
    """Round every floating weight through the chosen fp8 format, as ComfyUI's fp8 storage does to its
    weights. The values are then held in the compute dtype, because CPU kernels cannot multiply fp8."""
    fp8 = getattr(torch, _FP8[weight_dtype])
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.to(fp8).to(p.dtype))


def load_unet_file(path: str | Path, *, weight_dtype: str = "default",
                   dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, str, str]:
    """(UNet2DConditionModel, arch, prediction_type) from a bare UNet file."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    path = Path(path)
    sd = read_state_dict(path)
    metadata = read_metadata(path)
    if _is_diffusers_layout(sd):
        ldm = _diffusers_to_ldm(sd, path)
    else:
        # a whole checkpoint in the UNet folder: take only its diffusion model
        prefixed_only = any(k.startswith(ldm_keys.UNET_PREFIX) for k in sd)
        ldm = {k.removeprefix(ldm_keys.UNET_PREFIX): v for k, v in sd.items()
               if not prefixed_only or k.startswith(ldm_keys.UNET_PREFIX)}
    del sd
    prefixed = {ldm_keys.UNET_PREFIX + k: v for k, v in ldm.items()}
    arch = detect.detect_arch(prefixed)
    if arch is None:
        raise ModelFileError(path, "not a Stable Diffusion UNet: no input_blocks.0.0.weight / conv_in.weight")
    prediction_type = detect.detect_prediction_type(prefixed, metadata, arch)
    del prefixed
    try:
        pooled = SDXL_POOLED_DIM if arch == "sdxl" else None
        cfg = detect.infer_unet_config(ldm, arch, pooled_dim=pooled)
        unet = _build_unet(cfg, ldm_keys.unet_ldm_to_diffusers(ldm, cfg), dtype, path)
    except ModelFileError:
        raise
    except (KeyError, ValueError, StopIteration, IndexError, TypeError, AttributeError, RuntimeError) as e:
        raise ModelFileError(path, f"unrecognised {arch} UNet layout: {type(e).__name__}: {e}") from None
    if weight_dtype != "default":
        _fp8_round_trip(unet, weight_dtype)
    return unet, arch, prediction_type

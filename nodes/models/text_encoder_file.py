"""Standalone text-encoder files (CLIPLoader / DualCLIPLoader): CLIP-L, OpenCLIP-H and OpenCLIP-G in the
transformers layout (`text_model.*`, possibly under a prefix such as `transformer.` or
`cond_stage_model.transformer.`) or the original OpenCLIP layout (`token_embedding.weight`,
`transformer.resblocks.*`, possibly under `model.` / `cond_stage_model.model.`).

Which encoder a file holds comes from its shapes: 12 layers = CLIP-L, 24 = OpenCLIP-H, 32 = OpenCLIP-G,
else the width (768 / 1024 / 1280). Towers of other sizes (the tiny test ones) are told apart by what
else the file shows: the OpenCLIP layout marks H for a single encoder, a text projection G (SD checkpoints'
CLIP-L and SD2's H in the transformers layout have none), otherwise CLIP-L.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from . import detect, ldm_keys
from .checkpoint import CLIP_LAYER_DEFAULTS, _build_clip
from .state_dict import ModelFileError, read_state_dict

_HF_PROBE = "text_model.encoder.layers.0.layer_norm1.weight"
_OC_PROBE = "transformer.resblocks.0.attn.in_proj_weight"
BY_LAYERS = {12: "l", 24: "h", 32: "g"}
BY_WIDTH = {768: "l", 1024: "h", 1280: "g"}


def to_hf(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str] | None:
    """(transformers-layout tensors, "hf" | "openclip") of the text encoder in `sd`, None if there is none."""
    for key in sd:
        if key.endswith(_HF_PROBE):
            prefix = key[: -len(_HF_PROBE)]
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)
                    and k[len(prefix):].startswith(("text_model.", "text_projection."))}, "hf"
        if key.endswith(_OC_PROBE) and key[: -len(_OC_PROBE)] + "token_embedding.weight" in sd:
            return ldm_keys.openclip_to_hf(sd, key[: -len(_OC_PROBE)]), "openclip"
    return None


def encoder_kind(sd: Mapping[str, torch.Tensor], layout: str, pair: bool) -> str:
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
    width = int(sd["text_model.embeddings.token_embedding.weight"].shape[1])
    if layers in BY_LAYERS:
        return BY_LAYERS[layers]
    if width in BY_WIDTH:
        return BY_WIDTH[width]
    if layout == "openclip" and not pair:
        return "h"
    return "g" if "text_projection.weight" in sd else "l"


def read_text_encoder(path: str | Path, *, pair: bool = False) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, transformers-layout tensors) of a text-encoder file; ModelFileError if it holds none."""
    sd = read_state_dict(path)
    found = to_hf(sd)
    if found is None:
        hint = "a LoRA" if any("lora" in k for k in sd) else "no text_model.* or OpenCLIP transformer.* keys"
        raise ModelFileError(path, f"not a CLIP text encoder ({hint})")
    hf, layout = found
    return encoder_kind(hf, layout, pair), hf


def build_text_encoders(parts: Mapping[str, tuple[Path, dict[str, torch.Tensor]]], arch: str,
                        dtype: torch.dtype) -> dict:
    """{kind: encoder} for `arch` from {kind: (path, tensors)}."""
    out = {}
    for kind, (path, sd) in parts.items():
        try:
            cfg = detect.infer_clip_config(sd, arch, kind)
        except (KeyError, ValueError, StopIteration) as e:
            raise ModelFileError(path, f"unusable text encoder: {type(e).__name__}: {e}") from None
        out[kind] = _build_clip(cfg, sd, dtype, path, kind)
    return out


__all__ = ["CLIP_LAYER_DEFAULTS", "build_text_encoders", "encoder_kind", "read_text_encoder", "to_hf"]

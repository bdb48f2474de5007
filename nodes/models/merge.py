"""Model merging as recorded weight patches.

A merge node does not compute anything: it returns a clone of its first model with one `MergePatch`
added to `weight_patches` (the other model, the kind of merge and its ratios). The merged weights
are computed when the model is first used (`merged_unet`), into one module kept next to the base
weights in their WeightsHolder: a handle with different patches (another ratio) replaces it, so a
graph re-run with a new ratio holds the base plus one merged copy, never one UNet per ratio tried.
The base tensors are never written to, so LoRA copies, clones and other handles that share storage
with them stay correct (LoRA's own merge, nodes/models/lora.py, builds copies the same way).

Ratios follow ComfyUI: simple `ratio * W1 + (1 - ratio) * W2`; add `W1 + W2`; subtract
`multiplier * (W1 - W2)`; block merges pick the ratio of the longest LDM key prefix that matches
(`input_blocks.4.`, `middle_block.`, `out.` ...), the first given ratio otherwise.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import ldm_keys


@dataclass(frozen=True)
class MergePatch:
    other: Any  # a DiffusionModelHandle (its own patches count)
    kind: str  # "simple" | "add" | "subtract" | "blocks"
    ratio: float = 1.0  # simple: model1's share; subtract: the multiplier
    blocks: tuple[tuple[str, float], ...] = ()  # blocks: (LDM key prefix, model1's share), in declared order


def _ldm_names(unet: nn.Module) -> dict[str, str]:
    """diffusers parameter name -> LDM name (the names ComfyUI's block ratios are written in)."""
    config: Any = unet.config
    empty = torch.empty(0)
    out: dict[str, str] = {}
    for name in unet.state_dict():
        converted = ldm_keys.unet_diffusers_to_ldm({name: empty}, config)
        out[name] = next(iter(converted), name)
    return out


def _block_ratio(ldm_name: str, blocks: tuple[tuple[str, float], ...]) -> float:
    ratio, best = blocks[0][1], 0
    for prefix, value in blocks:
        if ldm_name.startswith(prefix) and len(prefix) > best:
            ratio, best = value, len(prefix)
    return ratio


def merged_state(handle: Any) -> dict[str, torch.Tensor]:
    """The effective weights of a handle: its base UNet's with every recorded patch applied in order."""
    base = handle.base_unet
    state = {k: v for k, v in base.state_dict().items()}
    if not handle.weight_patches:
        return state
    ldm_names = _ldm_names(base) if any(p.kind == "blocks" for p in handle.weight_patches) else {}
    for patch in handle.weight_patches:
        other = merged_state(patch.other)
        for key, w in state.items():
            w2 = other.get(key)
            if w2 is None or w2.shape != w.shape or not w.is_floating_point():
                continue
            w2 = w2.to(device=w.device, dtype=w.dtype)
            if patch.kind == "simple":
                state[key] = w * patch.ratio + w2 * (1.0 - patch.ratio)
            elif patch.kind == "add":
                state[key] = w + w2
            elif patch.kind == "subtract":
                state[key] = (w - w2) * patch.ratio
            elif patch.kind == "blocks":
                r = _block_ratio(ldm_names.get(key, key), patch.blocks)
                state[key] = w * r + w2 * (1.0 - r)
            else:
                raise ValueError(f"unknown merge kind {patch.kind!r}")
    return state


def module_with_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` holding `state` (tensors that are unchanged keep their storage)."""
    from .lora import copy_with_weights

    names = {name for name, _ in model.named_parameters()}
    return copy_with_weights(model, {k: v for k, v in state.items() if k in names})


def patch_key(handle: Any) -> tuple:
    """Identifies the weights a handle stands for: its base weights and its patches, recursively."""
    return (id(handle._weights), tuple((patch_key(p.other), p.kind, p.ratio, p.blocks)
                                       for p in handle.weight_patches))

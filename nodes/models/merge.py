"""Model merging as recorded weight patches.

A merge node does not compute anything: it returns a clone of its first model with one `MergePatch`
added to `weight_patches` (the other model, the kind of merge and its ratios); a LoRA adds a
`lora.LoraPatch` the same way. When a handle's UNet is used, the base's `InPlacePatcher`
(weight_patch.py) writes that handle's merged weights into the shared base module, keeping the
originals of the changed tensors; another handle on the same base (another ratio, another LoRA, the
base itself) first gets those originals back. Every merge reads the other model's weights from its
originals too (`merged_state`), so what another handle has applied never leaks in.

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


def _merge(patch: MergePatch, current: Mapping[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    other = merged_state(patch.other)
    ldm_names = _ldm_names(module) if patch.kind == "blocks" else {}
    out: dict[str, torch.Tensor] = {}
    for key, w in current.items():
        w2 = other.get(key)
        if w2 is None or w2.shape != w.shape or not w.is_floating_point():
            continue
        w2 = w2.to(device=w.device, dtype=w.dtype)
        if patch.kind == "simple":
            out[key] = w * patch.ratio + w2 * (1.0 - patch.ratio)
        elif patch.kind == "add":
            out[key] = w + w2
        elif patch.kind == "subtract":
            out[key] = (w - w2) * patch.ratio
        elif patch.kind == "blocks":
            r = _block_ratio(ldm_names.get(key, key), patch.blocks)
            out[key] = w * r + w2 * (1.0 - r)
        else:
            raise ValueError(f"unknown merge kind {patch.kind!r}")
    return out


def handle_patch_fn(handle: Any):
    """The handle's patch list as one `weight_patch.PatchFn`: given its base UNet's original parameters,
    the new values of those its merges and LoRAs change, each patch seeing what the previous left."""
    patches = tuple(handle.weight_patches)
    module = handle.base_unet

    def apply(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        current = dict(weights)
        changed: dict[str, torch.Tensor] = {}
        for patch in patches:
            new = _merge(patch, current, module) if isinstance(patch, MergePatch) else patch.apply(current)
            current.update(new)
            changed.update(new)
        return changed
    return apply


def merged_state(handle: Any) -> dict[str, torch.Tensor]:
    """The effective parameters of a handle (new tensors where patched), computed from its base UNet's
    originals whatever patch the shared module holds now; nothing is written."""
    base = handle._weights.patcher("unet").base_weights()
    if not handle.weight_patches:
        return base
    base.update(handle_patch_fn(handle)(base))
    return base


def module_with_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` holding `state` (tensors that are unchanged keep their storage)."""
    from .lora import copy_with_weights

    names = {name for name, _ in model.named_parameters()}
    return copy_with_weights(model, {k: v for k, v in state.items() if k in names})


def patch_key(handle: Any) -> tuple:
    """Identifies the weights a handle stands for: its base weights and its patches, recursively;
    () for the unpatched base (the patcher's "no patch")."""
    if not handle.weight_patches:
        return ()
    return (handle._weights.serial,
            tuple((patch_key(p.other) or (p.other._weights.serial,), p.kind, p.ratio, p.blocks)
                  if isinstance(p, MergePatch) else p.key for p in handle.weight_patches))

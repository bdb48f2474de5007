"""LoRA files: reading the common layouts, mapping them onto diffusers/transformers modules, merging.

Layouts read (every one is a flat state dict of low-rank pairs, one pair per adapted layer):
- kohya / A1111: `lora_unet_<module>`, `lora_te_<module>` (SD1/SD2 text encoder), `lora_te1_` /
  `lora_te2_` (SDXL's CLIP-L / OpenCLIP-G), each with `.lora_down.weight`, `.lora_up.weight` and an
  optional `.alpha`. `<module>` is a module path with dots written as underscores, either in diffusers
  naming (`down_blocks_0_attentions_0_...`) or in the original LDM naming (`input_blocks_1_1_...`,
  used by most SDXL LoRAs); both resolve here.
- diffusers / PEFT: `unet.<module>` / `text_encoder.<module>` / `text_encoder_2.<module>` with
  `.lora_A.weight` + `.lora_B.weight` (PEFT), `.lora.down.weight` + `.lora.up.weight`,
  `.lora_linear_layer.down/up.weight`, or attention-processor names (`attn1.processor.to_q_lora.down`).
- ComfyUI's own prefixes `diffusion_model.` / `model.diffusion_model.` with LDM module names.

Merging computes `W + strength * (alpha / rank) * (up @ down)` for each adapted weight (conv LoRAs
are flattened to a matrix product and reshaped back). The result is a *copy* of the model whose
untouched parameters share storage with the original; only the adapted tensors are new. Base
weights are never modified: other handles (and the cache) share them.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import ldm_keys
from .state_dict import ModelFileError, read_state_dict

log = logging.getLogger(__name__)

# (suffix, part) — longest first so that ".lora.down.weight" is not mistaken for something shorter.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),        # attention processors: attn1.processor.to_q_lora.down.weight
    ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
    (".dora_scale", "dora"),
)

UNET = "unet"
_KOHYA_TE = {"lora_te_": None, "lora_te1_": "l", "lora_te2_": "g"}   # None = the first encoder
_DIFFUSERS_TE = {"text_encoder.": None, "text_encoder_2.": "g"}
_LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass
class LoraPair:
    """One adapted layer as stored in the file (before it is resolved to a module)."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    mid: torch.Tensor | None = None
    dora: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)


@dataclass
class LoraFile:
    path: Path
    pairs: dict[str, LoraPair]    # base name (the key without its suffix) -> pair
    stray: list[str]              # keys that are not part of any low-rank pair


def parse_lora(sd: Mapping[str, torch.Tensor], path: str | Path = "<memory>") -> LoraFile:
    """Group a LoRA state dict into low-rank pairs by base name."""
    pairs: dict[str, LoraPair] = {}
    stray: list[str] = []
    for key, value in sd.items():
        for suffix, part in _SUFFIXES:
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                pair = pairs.setdefault(base, LoraPair())
                pair.keys.append(key)
                if part == "alpha":
                    pair.alpha = float(value.float().reshape(-1)[0])
                else:
                    setattr(pair, part, value)
                break
        else:
            stray.append(key)
    return LoraFile(Path(path), pairs, stray)


# ----------------------------------------------------------------------------------- the cache

_CACHE_LOCK = threading.Lock()
_LAST: tuple[tuple, LoraFile] | None = None


def load_lora_file(path: str | Path) -> LoraFile:
    """Read and parse a LoRA file; the last one read is kept (keyed by path, size and mtime), so a
    workflow that re-runs with other strengths does not read it again."""
    global _LAST
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        raise ModelFileError(path, "file not found") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        if _LAST is not None and _LAST[0] == key:
            return _LAST[1]
    lora = parse_lora(read_state_dict(path), path)
    if not lora.pairs:
        raise ModelFileError(path, "not a LoRA file: no lora_down/lora_up (or lora_A/lora_B) tensors")
    with _CACHE_LOCK:
        _LAST = (key, lora)
    return lora


def clear_cache() -> None:
    global _LAST
    with _CACHE_LOCK:
        _LAST = None


# ------------------------------------------------------------------------------- name resolution

def _module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and getattr(m, "weight", None) is not None]


def unet_name_map(unet: nn.Module) -> dict[str, str]:
    """Every way a LoRA may name a UNet layer -> its diffusers module name: diffusers and LDM names,
    dotted and with underscores (kohya)."""
    names = _module_names(unet)
    out: dict[str, str] = {}
    for name in names:
        out[name] = name
        out[name.replace(".", "_")] = name
    config = getattr(unet, "config", None)
    if config is not None and "layers_per_block" in config:
        for d_key, _ in unet.named_parameters():
            try:
                (l_key,) = ldm_keys.unet_diffusers_to_ldm({d_key: None}, config)  # type: ignore[dict-item]  # keys only
            except (KeyError, TypeError, ValueError):
                continue
            d_mod, _, d_leaf = d_key.rpartition(".")
            l_mod, _, l_leaf = l_key.rpartition(".")
            if d_leaf == l_leaf and d_mod in out:
                out[l_mod] = d_mod
                out[l_mod.replace(".", "_")] = d_mod
    return out


def text_encoder_name_map(encoder: nn.Module) -> dict[str, str]:
    """LoRA names of a CLIP text encoder's layers (always spelled `text_model.*`, as in the files)
    -> module names of this encoder (transformers 5's CLIPTextModel has no `text_model` level)."""
    nested = hasattr(encoder, "text_model")
    out: dict[str, str] = {}
    for name in _module_names(encoder):
        canonical = name if nested or name == "text_projection" else "text_model." + name
        out[canonical] = name
        out[canonical.replace(".", "_")] = name
    return out


def _clean_diffusers_name(name: str) -> str:
    """Attention-processor spellings -> module names (`attn1.processor.to_out` -> `attn1.to_out.0`)."""
    name = name.replace(".processor.", ".")
    if name.endswith(".to_out"):
        name += ".0"
    return name


@dataclass
class ResolvedPatch:
    target: str        # "unet" or a text encoder key ("l", "h", "g")
    module: str        # module name inside that model
    pair: LoraPair


def resolve(lora: LoraFile, unet: nn.Module | None,
            encoders: Mapping[str, nn.Module] | None) -> tuple[list[ResolvedPatch], list[str]]:
    """Match the file's pairs to modules. Returns (patches, keys that matched nothing)."""
    encoders = dict(encoders or {})
    first_encoder = next(iter(encoders), None)
    unet_map = unet_name_map(unet) if unet is not None else {}
    enc_maps = {k: text_encoder_name_map(m) for k, m in encoders.items()}
    patches: list[ResolvedPatch] = []
    unknown: list[str] = list(lora.stray)
    for base, pair in lora.pairs.items():
        hit = _resolve_one(base, unet_map, enc_maps, first_encoder)
        if hit is None:
            unknown.extend(pair.keys)
        else:
            patches.append(ResolvedPatch(hit[0], hit[1], pair))
    return patches, unknown


def _resolve_one(base: str, unet_map: dict[str, str], enc_maps: dict[str, dict[str, str]],
                 first_encoder: str | None) -> tuple[str, str] | None:
    name = base.removeprefix("base_model.model.")
    if name.startswith("lora_unet_"):
        hit = unet_map.get(name[len("lora_unet_"):])
        return (UNET, hit) if hit else None
    for prefix, which in _KOHYA_TE.items():
        if name.startswith(prefix):
            key = which or first_encoder
            hit = enc_maps.get(key, {}).get(name[len(prefix):]) if key else None
            return (key, hit) if key and hit else None
    for prefix in _LDM_PREFIXES:
        if name.startswith(prefix):
            hit = unet_map.get(name[len(prefix):])
            return (UNET, hit) if hit else None
    if name.startswith("unet."):
        hit = unet_map.get(_clean_diffusers_name(name[len("unet."):]))
        return (UNET, hit) if hit else None
    for prefix, which in _DIFFUSERS_TE.items():
        if name.startswith(prefix):
            key = which or first_encoder
            rest = _clean_diffusers_name(name[len(prefix):])
            emap = enc_maps.get(key, {}) if key else {}
            hit = emap.get(rest) or emap.get("text_model." + rest)
            return (key, hit) if key and hit else None
    # A bare PEFT save of one model: try the UNet, then the first text encoder.
    bare = _clean_diffusers_name(name)
    if bare in unet_map:
        return (UNET, unet_map[bare])
    if first_encoder is not None and bare in enc_maps.get(first_encoder, {}):
        return (first_encoder, enc_maps[first_encoder][bare])
    return None


# ------------------------------------------------------------------------------------- merging

def lora_delta(pair: LoraPair, weight: torch.Tensor) -> torch.Tensor:
    """`(alpha / rank) * up @ down` shaped like `weight`, in float32 on the weight's device."""
    if pair.down is None or pair.up is None:
        raise ValueError("incomplete pair (needs both down and up)")
    if pair.mid is not None:
        raise ValueError("LoCon tucker decomposition (lora_mid) is not supported")
    if pair.dora is not None:
        raise ValueError("DoRA (dora_scale) is not supported")
    down = pair.down.to(weight.device, torch.float32)
    up = pair.up.to(weight.device, torch.float32)
    rank = down.shape[0]
    scale = (pair.alpha / rank) if pair.alpha is not None else 1.0
    delta = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
    if delta.numel() != weight.numel():
        raise ValueError(f"shape {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    return (delta * scale).reshape(weight.shape)


def merged_weights(model: nn.Module, patches: Iterable[ResolvedPatch], strength: float) -> dict[str, torch.Tensor]:
    """New tensors `{param name: W + strength * delta}` for the patched layers of one model.
    Patches that cannot apply are logged and skipped."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for patch in patches:
        module = modules[patch.module]
        pname = f"{patch.module}.weight"
        weight = out.get(pname, module.weight.detach())
        try:
            delta = lora_delta(patch.pair, weight)
        except ValueError as exc:
            log.warning("lora key not loaded: %s (%s)", patch.pair.keys[0] if patch.pair.keys else patch.module, exc)
            continue
        out[pname] = (weight.float() + strength * delta).to(weight.dtype)
    return out


def copy_with_weights(model: nn.Module, new_weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A structural copy of `model` holding `new_weights`; every other parameter shares its storage
    with `model` (through a new Parameter object, so moving the copy between devices never moves
    the original's tensors), and buffers are shared as they are."""
    memo: dict[int, object] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in memo:
            continue
        data = new_weights[name] if name in new_weights else param.detach()
        memo[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
    for buf in model.buffers():
        memo[id(buf)] = buf
    return copy.deepcopy(model, memo)


def apply_lora(lora: LoraFile, unet: nn.Module | None, encoders: Mapping[str, nn.Module] | None,
               strength_model: float, strength_clip: float
               ) -> tuple[nn.Module | None, dict[str, nn.Module], list[str]]:
    """Merge `lora` into copies of the models it touches.

    Returns (new unet or None when untouched/strength 0, {encoder key: new encoder} for the touched
    encoders, keys that were not loaded). Unloaded keys are also logged as warnings.
    """
    patches, unknown = resolve(lora, unet, encoders)
    for key in unknown:
        log.warning("lora key not loaded: %s", key)
    new_unet = None
    if unet is not None and strength_model != 0:
        mine = [p for p in patches if p.target == UNET]
        weights = merged_weights(unet, mine, strength_model)
        if weights:
            new_unet = copy_with_weights(unet, weights)
    new_encoders: dict[str, nn.Module] = {}
    if encoders and strength_clip != 0:
        for key, encoder in encoders.items():
            mine = [p for p in patches if p.target == key]
            weights = merged_weights(encoder, mine, strength_clip)
            if weights:
                new_encoders[key] = copy_with_weights(encoder, weights)
    return new_unet, new_encoders, unknown


# ------------------------------------------------------------------------------- writing (tests)

def kohya_key(target: str, module: str, arch: str = "sd1") -> str:
    """The kohya base name of a module (`lora_unet_...` / `lora_te_...` / `lora_te1_...`)."""
    if target == UNET:
        return "lora_unet_" + module.replace(".", "_")
    canonical = module if module.startswith(("text_model.", "text_projection")) else "text_model." + module
    prefix = "lora_te_" if arch != "sdxl" else ("lora_te1_" if target == "l" else "lora_te2_")
    return prefix + canonical.replace(".", "_")


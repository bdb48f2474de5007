"""LoRA files: reading the common layouts, mapping them onto diffusers/transformers modules, merging.

Layouts read (every one is a flat state dict of low-rank pairs, one pair per adapted layer):
- kohya / A1111: `lora_unet_<module>`, `lora_te_<module>` (SD1/SD2 text encoder), `lora_te1_` /
  `lora_te2_` (SDXL's CLIP-L / OpenCLIP-G), each with `.lora_down.weight`, `.lora_up.weight` and an
  optional `.alpha`. `<module>` is a module path with dots written as underscores, either in diffusers
  naming (`down_blocks_0_attentions_0_...`) or in the original LDM naming (`input_blocks_1_1_...`,
  used by most SDXL LoRAs); both resolve here.
- diffusers / PEFT: `unet.<module>` / `transformer.<module>` (SD3) / `text_encoder[_2].<module>` with
  `.lora_A.weight` + `.lora_B.weight` (PEFT), `.lora.down.weight` + `.lora.up.weight`,
  `.lora_linear_layer.down/up.weight`, or attention-processor names (`attn1.processor.to_q_lora.down`).
- ComfyUI's own prefixes `diffusion_model.` / `model.diffusion_model.` with LDM module names, and
  `text_encoders.clip_l.transformer.` / `clip_g` / `clip_h` / `t5xxl` for the text encoders.
- SD3 kohya files: `lora_te1_` / `lora_te2_` / `lora_te3_` for CLIP-L, CLIP-G and T5-XXL.

Layer formats (per base name, as ComfyUI's LoraLoader reads them):
- LoRA / LoCon: `up @ down` (convs flattened), with LoCon's Tucker core `lora_mid` folded into `down`.
- LoHa: `(hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)`, or with Tucker cores `hada_t1/t2`.
- LoKr: `kron(w1, w2)`, each factor whole (`lokr_w1`) or low-rank (`lokr_w1_a @ lokr_w1_b`), `lokr_t2`
  a Tucker core for w2. With both factors whole alpha does not apply (LyCORIS' convention).
- alpha scales by `alpha / rank`; DoRA's `dora_scale` renormalises the adapted weight (see
  `patched_weight` for the axis rule).

The deltas are computed here rather than through peft: peft's layers want to wrap a module and own
its forward, and its LoKr scales a whole-factor layer by alpha/r where ComfyUI/LyCORIS use 1, and its
DoRA norms the adapted weight's rows where ComfyUI's loader uses the base weight's rows. peft stays the
independent reference in the tests (its LoHa / LoKr / LoRA `get_delta_weight` on the same tensors).

Merging computes `W + strength * delta` for each adapted weight. On the MODEL side that is a
`LoraPatch` recorded on the handle and written in place into the shared UNet when the handle runs
(weight_patch.InPlacePatcher, through DiffusionModelHandle.unet), so a strength change or a second
LoRA costs the originals of the adapted tensors, not a UNet. On the CLIP side the result is still a
*copy* of the encoder whose untouched parameters share storage with the original (`apply_lora`).
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
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
    # LyCORIS LoHa (Hadamard product of two low-rank products, optionally Tucker-factored convs)
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"), (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    # LyCORIS LoKr (Kronecker product; each factor full or low-rank)
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w1", "lokr_w1"),
    (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "lokr_t2"),
)
_LYCORIS_PARTS = {part for _, part in _SUFFIXES if part.startswith(("hada_", "lokr_"))}

UNET = "unet"
# SD3's kohya files number T5 after the two CLIPs (lora_te3_), as ComfyUI's key map does when both are present.
_KOHYA_TE = {"lora_te_": None, "lora_te1_": "l", "lora_te2_": "g", "lora_te3_": "t5"}   # None = the first encoder
_DIFFUSERS_TE = {"text_encoder.": None, "text_encoder_2.": "g"}
# ComfyUI's generic layout: "text_encoders." + the key of the weight in ComfyUI's CLIP state dict.
_COMFY_TE = {f"text_encoders.{name}.transformer.": key
             for name, key in (("clip_l", "l"), ("clip_h", "h"), ("clip_g", "g"), ("t5xxl", "t5"))}
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
    lycoris: dict[str, torch.Tensor] = field(default_factory=dict)   # hada_* / lokr_* tensors by part

    @property
    def kind(self) -> str:
        if any(k.startswith("hada_") for k in self.lycoris):
            return "loha"
        if any(k.startswith("lokr_") for k in self.lycoris):
            return "lokr"
        return "lora"


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
                elif part in _LYCORIS_PARTS:
                    pair.lycoris[part] = value
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
        raise ModelFileError(path, "not a LoRA file: no lora_down/lora_up, lora_A/lora_B, hada_* (LoHa) "
                                   "or lokr_* (LoKr) tensors")
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
    """LoRA names of a text encoder's layers -> module names of this encoder. CLIP names are always
    spelled `text_model.*` in the files (transformers 5's CLIPTextModel has no `text_model` level); T5's
    are its own module names (`encoder.block.0.layer.0.SelfAttention.q`)."""
    nested = hasattr(encoder, "text_model") or not _is_clip(encoder)
    out: dict[str, str] = {}
    for name in _module_names(encoder):
        canonical = name if nested or name == "text_projection" else "text_model." + name
        out[canonical] = name
        out[canonical.replace(".", "_")] = name
    return out


def _is_clip(encoder: nn.Module) -> bool:
    return str(getattr(getattr(encoder, "config", None), "model_type", "clip")).startswith("clip")


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
    for prefix, key in _COMFY_TE.items():
        if name.startswith(prefix):
            hit = enc_maps.get(key, {}).get(name[len(prefix):])
            return (key, hit) if hit else None
    for prefix in _LDM_PREFIXES:
        if name.startswith(prefix):
            hit = unet_map.get(name[len(prefix):])
            return (UNET, hit) if hit else None
    for prefix in ("unet.", "transformer."):    # diffusers: UNet pipelines / SD3-style transformers
        if name.startswith(prefix):
            hit = unet_map.get(_clean_diffusers_name(name[len(prefix):]))
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

def _f32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, torch.float32)


def _tucker(core: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Rebuild a Tucker-factored conv kernel: core (r, r, k, k), b (r, in), a (r, out) -> (out, in, k, k)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, b, a)


def _scale(alpha: float | None, rank: int | None) -> float:
    return alpha / rank if alpha is not None and rank else 1.0


def _lora_matrix(pair: LoraPair, device: torch.device) -> torch.Tensor:
    if pair.down is None or pair.up is None:
        raise ValueError("incomplete pair (needs both down and up)")
    down, up = _f32(pair.down, device), _f32(pair.up, device)
    rank = down.shape[0]
    if pair.mid is not None:
        # LoCon Tucker: down (r, in, 1, 1) and mid (r, r, k, k) -> an equivalent (r, in, k, k) down conv
        mid = _f32(pair.mid, device)
        shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
        down = (down.transpose(0, 1).flatten(1) @ mid.transpose(0, 1).flatten(1)).reshape(shape).transpose(0, 1)
    return (up.flatten(1) @ down.flatten(1)) * _scale(pair.alpha, rank)


def _loha_matrix(pair: LoraPair, device: torch.device) -> torch.Tensor:
    p = {k: _f32(v, device) for k, v in pair.lycoris.items()}
    try:
        w1a, w1b, w2a, w2b = p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"]
    except KeyError as exc:
        raise ValueError(f"incomplete LoHa layer (missing {exc.args[0]})") from None
    if "hada_t1" in p and "hada_t2" in p:
        m1, m2 = _tucker(p["hada_t1"], w1b, w1a), _tucker(p["hada_t2"], w2b, w2a)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b
    return m1 * m2 * _scale(pair.alpha, w1b.shape[0])


def _lokr_matrix(pair: LoraPair, device: torch.device) -> torch.Tensor:
    p = {k: _f32(v, device) for k, v in pair.lycoris.items()}
    rank = None
    if "lokr_w1" in p:
        w1 = p["lokr_w1"]
    elif "lokr_w1_a" in p and "lokr_w1_b" in p:
        w1, rank = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
    else:
        raise ValueError("incomplete LoKr layer (needs lokr_w1 or lokr_w1_a/lokr_w1_b)")
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_w2_a" in p and "lokr_w2_b" in p:
        a, b = p["lokr_w2_a"], p["lokr_w2_b"]
        rank = b.shape[0]
        w2 = _tucker(p["lokr_t2"], b, a) if "lokr_t2" in p else a @ b.flatten(1)
    else:
        raise ValueError("incomplete LoKr layer (needs lokr_w2 or lokr_w2_a/lokr_w2_b)")
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    # With both factors stored whole there is no rank, and alpha does not apply (LyCORIS' convention).
    return torch.kron(w1.contiguous(), w2.contiguous()) * _scale(pair.alpha, rank)


def lora_delta(pair: LoraPair, weight: torch.Tensor) -> torch.Tensor:
    """The low-rank update of one layer, shaped like `weight`, in float32 on the weight's device
    (alpha/rank applied; strength and DoRA not)."""
    kind = pair.kind
    builder = {"lora": _lora_matrix, "loha": _loha_matrix, "lokr": _lokr_matrix}[kind]
    delta = builder(pair, weight.device)
    if delta.numel() != weight.numel():
        raise ValueError(f"{kind} shape {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    return delta.reshape(weight.shape)


def patched_weight(pair: LoraPair, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """`weight` with this layer's update at `strength`, in float32.

    DoRA (`dora_scale`): the adapted weight `W' = W + delta` is renormalised so that its norm along
    one axis equals the stored magnitude. The axis follows the magnitude's shape, as ComfyUI does:
    one value per output channel (PEFT's `lora_magnitude_vector`, shape (out,)) normalises each output
    row; kohya/LyCORIS files store (1, in, ...) and normalise each input column. Strength then
    interpolates between W and the renormalised W'.
    """
    w = weight.float()
    delta = lora_delta(pair, weight)
    if pair.dora is None:
        return w + strength * delta
    magnitude = _f32(pair.dora, weight.device)
    adapted = w + delta
    if magnitude.shape[0] == adapted.shape[0] and magnitude.numel() == adapted.shape[0]:
        # per output channel; ComfyUI takes this norm from the base weight, not the adapted one
        norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
        magnitude = magnitude.reshape(norm.shape)
    else:
        norm = adapted.transpose(0, 1).flatten(1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (w.ndim - 2))
        magnitude = magnitude.reshape(norm.shape)
    renormed = adapted * (magnitude / (norm + torch.finfo(weight.dtype).eps))
    return w + strength * (renormed - w)


def merged_weights(model: nn.Module, patches: Iterable[ResolvedPatch], strength: float) -> dict[str, torch.Tensor]:
    """New tensors `{param name: W + strength * delta}` for the patched layers of one model.
    Patches that cannot apply are logged and skipped."""
    return lora_patch_fn(patches, strength)({name: p.detach() for name, p in model.named_parameters()})


def lora_patch_fn(patches: Iterable[ResolvedPatch], strength: float
                  ) -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The same merge as `merged_weights`, as a patch for `weight_patch.InPlacePatcher`: it reads the
    weights it is given (the module's originals, or what earlier patches in a chain left)."""
    patches = list(patches)

    def apply(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for patch in patches:
            pname = f"{patch.module}.weight"
            weight = out.get(pname, weights[pname])
            try:
                new = patched_weight(patch.pair, weight, strength)
            except ValueError as exc:
                log.warning("lora key not loaded: %s (%s)", patch.pair.keys[0] if patch.pair.keys else patch.module,
                            exc)
                continue
            out[pname] = new.to(weight.dtype)
        return out
    return apply


_PATCH_SERIALS = itertools.count(1)


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """One LoRA at one strength on a UNet, as a recorded weight patch (see merge.handle_patch_fn)."""

    patches: tuple[ResolvedPatch, ...]
    strength: float
    # Names this patch in patch keys; a serial, not id(), so a later patch never takes its key.
    key: tuple = field(default_factory=lambda: ("lora", next(_PATCH_SERIALS)))

    def apply(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return lora_patch_fn(self.patches, self.strength)(weights)


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


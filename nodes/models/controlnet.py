"""ControlNets: loading diffusers ControlNetModel weights, and applying them while sampling.

Files come in two layouts:
- the original one (`control_model.*` keys, or the same keys without the prefix): a copy of the
  UNet's encoder (`input_blocks`, `middle_block`, `time_embed`) plus `zero_convs.N.0`,
  `middle_block_out.0` and the hint encoder `input_hint_block.*`. The config is inferred from the
  tensor shapes the same way a checkpoint's UNet config is (detect.py, starting from the shipped
  SD1/SD2/SDXL UNet config);
- diffusers (`controlnet_cond_embedding.*`, `controlnet_down_blocks.*`, ...): a folder with
  config.json, a weights file next to a ControlNetModel config.json, or a bare file (its config is
  inferred by renaming it to the original layout first).

While sampling, a CONDITIONING entry's "control" is a `ControlApplication` (hint image, strength,
start/end percent, previous application in the chain). The model handle asks it for residuals
(`get_control`) for each evaluation and adds them inside the UNet.
"""
from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from . import detect, ldm_keys
from .checkpoint import _materialize
from .memory import ResidentMixin, WeightsHolder, default_device
from .state_dict import ModelFileError, read_state_dict

if TYPE_CHECKING:  # diffusers is imported when a ControlNet is built: importing it costs seconds
    from diffusers.models.controlnets.controlnet import ControlNetModel  # not diffusers' no-torch placeholder

    from .t2i_adapter import T2IAdapterHandle

LDM_PREFIX = "control_model."


@cache
def _controlnet_args() -> frozenset[str]:
    """The config keys ControlNetModel accepts (UNet configs carry more)."""
    from diffusers import ControlNetModel

    return frozenset(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}


# ------------------------------------------------------------------------------------ key layouts

def is_diffusers_controlnet(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("controlnet_cond_embedding.") for k in sd)


def ldm_controlnet_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The original-layout tensors without their `control_model.` prefix, or None if it is not one."""
    if any(k.startswith(LDM_PREFIX) for k in sd):
        return {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    if "input_hint_block.0.weight" in sd and "input_blocks.0.0.weight" in sd:
        return dict(sd)
    return None


def _hint_indices(keys) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))})


def controlnet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers ControlNetModel keys -> original-layout keys (without `control_model.`)."""
    shared: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    n_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
    for key, value in sd.items():
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
            out[f"zero_convs.{m.group(1)}.0.{m.group(2)}"] = value
        elif key.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + key[len("controlnet_mid_block."):]] = value
        elif key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            if rest.startswith("conv_in."):
                out["input_hint_block.0." + rest[len("conv_in."):]] = value
            elif rest.startswith("conv_out."):
                out[f"input_hint_block.{2 * n_blocks + 2}." + rest[len("conv_out."):]] = value
            else:
                j, _, leaf = rest[len("blocks."):].partition(".")
                out[f"input_hint_block.{2 * int(j) + 2}.{leaf}"] = value
        else:
            shared[key] = value
    # The encoder half is named exactly like the UNet's; the converter needs no up blocks for it.
    unet_like = {"layers_per_block": config["layers_per_block"], "up_block_types": []}
    out.update(ldm_keys.unet_diffusers_to_ldm(shared, unet_like))
    return out


def controlnet_ldm_to_diffusers(ldm: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Original-layout keys (no prefix) -> diffusers keys. The encoder half goes through diffusers'
    converter; the hint encoder is renamed here so that any number of hint convs is handled."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    out = convert_controlnet_checkpoint(dict(ldm), dict(config))
    out = {k: v for k, v in out.items() if v is not None and not k.startswith("controlnet_cond_embedding.")}
    idx = _hint_indices(ldm)
    names = ["conv_in"] + [f"blocks.{j}" for j in range(len(idx) - 2)] + ["conv_out"]
    for i, name in zip(idx, names):
        for leaf in ("weight", "bias"):
            if f"input_hint_block.{i}.{leaf}" in ldm:
                out[f"controlnet_cond_embedding.{name}.{leaf}"] = ldm[f"input_hint_block.{i}.{leaf}"]
    return out


def infer_controlnet_config(ldm: Mapping[str, torch.Tensor]) -> dict:
    """ControlNetModel config from original-layout tensors (no prefix)."""
    prefixed = {ldm_keys.UNET_PREFIX + k: v for k, v in ldm.items()}
    arch = detect.detect_arch(prefixed) or "sd1"
    # A ControlNet has no output head; infer_unet_config only reads the UNet's out-channel count
    # from it, which the ControlNet config does not use.
    probe = dict(ldm)
    probe.setdefault("out.2.weight", ldm["input_blocks.0.0.weight"])
    unet_cfg = detect.infer_unet_config(probe, arch)
    cfg = {k: v for k, v in unet_cfg.items() if k in _controlnet_args()}
    idx = _hint_indices(ldm)
    if len(idx) < 2 or (len(idx) - 2) % 2:
        raise ValueError(f"unexpected hint encoder layout (convs at {idx})")
    channels = [int(ldm[f"input_hint_block.{idx[0]}.weight"].shape[0])]
    channels += [int(ldm[f"input_hint_block.{i}.weight"].shape[0]) for i in idx[2:-1:2]]
    cfg.update(conditioning_channels=int(ldm[f"input_hint_block.{idx[0]}.weight"].shape[1]),
               conditioning_embedding_out_channels=channels)
    return cfg


# ----------------------------------------------------------------------------------------- loading

def _build(config: Mapping, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, path: Path) -> ControlNetModel:
    from diffusers import ControlNetModel

    args = _controlnet_args()
    cfg = {k: v for k, v in config.items() if k in args}
    if "conditioning_embedding_out_channels" in cfg:
        cfg["conditioning_embedding_out_channels"] = tuple(cfg["conditioning_embedding_out_channels"])
    model = _materialize(lambda: ControlNetModel.from_config(cfg), sd, dtype, path, "ControlNet")
    unused = set(sd) - set(model.state_dict())
    if unused:
        raise ModelFileError(path, f"ControlNet has {len(unused)} tensors the model does not use, "
                                   f"e.g. {sorted(unused)[0]!r}")
    return model


def _sidecar_config(path: Path) -> dict | None:
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileError(cfg_path, "not valid JSON") from None
    return cfg if cfg.get("_class_name", "ControlNetModel") == "ControlNetModel" else None


def load_controlnet_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
                          base_unet: torch.nn.Module | None = None,
                          sd: Mapping[str, torch.Tensor] | None = None) -> ControlNetModel:
    """A diffusers ControlNetModel from a single file (either layout) or a diffusers folder.

    A "diff" ControlNet (a `difference` marker tensor; its encoder weights are stored as differences
    to the UNet they were trained from) gets `base_unet`'s weights added back (DiffControlNetLoader)."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                           "diffusion_pytorch_model.fp16.safetensors") if (path / n).is_file()), None)
        if weights is None:
            raise ModelFileError(path, "ControlNet folder has no diffusion_pytorch_model weights")
        if _sidecar_config(path) is None:
            raise ModelFileError(path, "ControlNet folder has no ControlNetModel config.json")
        return load_controlnet_model(weights, dtype=dtype, base_unet=base_unet)
    if sd is None:
        sd = read_state_dict(path)
    if "difference" in sd:
        sd = {k: v for k, v in sd.items() if k != "difference"}
        if base_unet is not None:
            sd = _add_base_weights(sd, base_unet)
    try:
        if is_diffusers_controlnet(sd):
            sd = {k.removeprefix("controlnet."): v for k, v in sd.items()}
            config = _sidecar_config(path)
            if config is None:
                config = infer_controlnet_config(controlnet_diffusers_to_ldm(sd, _layers_per_block(sd)))
            return _build(config, sd, dtype, path)
        ldm = ldm_controlnet_keys(sd)
        if ldm is None:
            raise ModelFileError(path, "not a ControlNet: no control_model.*, controlnet_cond_embedding.* or (SD3) "
                                       "controlnet_blocks.* + pos_embed_input.* keys")
        config = infer_controlnet_config(ldm)
        return _build(config, controlnet_ldm_to_diffusers(ldm, config), dtype, path)
    except (KeyError, ValueError, StopIteration, IndexError, TypeError, AttributeError, RuntimeError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(path, f"unrecognised ControlNet layout: {type(e).__name__}: {e}") from None


def _add_base_weights(sd: Mapping[str, torch.Tensor], unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Diff ControlNet tensors plus the UNet's matching ones (original layout, both)."""
    base = ldm_keys.unet_diffusers_to_ldm(unet.state_dict(), cast("Mapping[str, Any]", unet.config))
    out = dict(sd)
    for key, value in sd.items():
        name = key[len(LDM_PREFIX):] if key.startswith(LDM_PREFIX) else key
        ref = base.get(name)
        if ref is not None and ref.shape == value.shape:
            out[key] = value.float() + ref.to(value.device).float()
    return out


def load_control_handle(path: str | Path, *, dtype: torch.dtype = torch.float32,
                        base_unet: torch.nn.Module | None = None) -> Any:
    """What ComfyUI's ControlNet loaders accept: a ControlNet (either layout, file or folder), an SD3 /
    SD3.5 ControlNet (Stability's or diffusers' layout) or a T2I-Adapter (either layout); returns a
    ControlNetHandle, an SD3ControlNetHandle or a T2IAdapterHandle."""
    from . import controlnet_sd3 as sd3cn
    from .t2i_adapter import T2IAdapterHandle, is_t2i_adapter, is_t2i_adapter_folder, load_t2i_adapter

    path = Path(path)
    if is_t2i_adapter_folder(path):
        return T2IAdapterHandle(load_t2i_adapter(path, dtype=dtype), source=path)
    if sd3cn.is_sd3_controlnet_folder(path):
        return sd3cn.SD3ControlNetHandle(*sd3cn.load_sd3_controlnet(path, dtype=dtype), source=path)
    sd = read_state_dict(path) if path.is_file() else None
    if sd is not None and is_t2i_adapter(sd):
        return T2IAdapterHandle(load_t2i_adapter(path, dtype=dtype, sd=sd), source=path)
    if sd is not None and sd3cn.is_sd3_controlnet(sd):
        return sd3cn.SD3ControlNetHandle(*sd3cn.load_sd3_controlnet(path, dtype=dtype, sd=sd), source=path)
    return ControlNetHandle(load_controlnet_model(path, dtype=dtype, base_unet=base_unet, sd=sd), source=path)


def _layers_per_block(sd: Mapping[str, torch.Tensor]) -> dict:
    n = len({int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))})
    return {"layers_per_block": n}


# ------------------------------------------------------------------------------------------ runtime

class ControlNetHandle(ResidentMixin):
    """What the CONTROL_NET socket carries: the weights. `apply_hint` makes a per-conditioning use."""

    def __init__(self, model: ControlNetModel, device: str | None = None, source: str | Path | None = None) -> None:
        self._weights = WeightsHolder({"controlnet": model})
        self.load_device = device or default_device()
        self.source = source

    @property
    def model(self) -> ControlNetModel:
        return self._weights.modules["controlnet"]  # type: ignore[return-value]

    def apply_hint(self, image: torch.Tensor, strength: float, percent_range: tuple[float, float] = (0.0, 1.0),
                   previous: Any = None) -> ControlApplication:
        """`image` is IMAGE [B,H,W,C] in 0..1."""
        return ControlApplication(self, image, strength, percent_range, previous)

    @torch.no_grad()
    def residuals(self, x: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor, hint: torch.Tensor,
                  scale: float, added: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        self.ensure_loaded()
        model = self.model
        param = next(model.parameters())
        dev, dtype = param.device, param.dtype
        kwargs: dict[str, Any] = {}
        if getattr(model.config, "addition_embed_type", None) == "text_time":
            if not added:
                raise ValueError("this ControlNet (SDXL) needs 'pooled' and 'size_cond' in the conditioning")
            kwargs["added_cond_kwargs"] = {k: v.to(dev, dtype) for k, v in added.items()}
        t = torch.as_tensor(timestep, device=dev, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        down, mid = model(x.to(dev, dtype), t, encoder_hidden_states=context.to(dev, dtype),
                          controlnet_cond=hint.to(dev, dtype), conditioning_scale=float(scale),
                          return_dict=False, **kwargs)
        return {"down": [d.to(x.device, x.dtype) for d in down], "mid": mid.to(x.device, x.dtype)}


def fit_hint(hint: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B,C,H,W] -> [B,C,height,width]: centre crop to the target's aspect ratio, then nearest-exact
    scaling (ComfyUI's treatment of ControlNet hints)."""
    _, _, h, w = hint.shape
    if (h, w) == (height, width):
        return hint
    old, new = w / h, width / height
    if old > new:
        cut = round((w - w * new / old) / 2)
        hint = hint[:, :, :, cut: w - cut]
    elif old < new:
        cut = round((h - h * old / new) / 2)
        hint = hint[:, :, cut: h - cut, :]
    return F.interpolate(hint, size=(height, width), mode="nearest-exact")


def _tile_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    reps = -(-batch // t.shape[0])
    return t.repeat((reps,) + (1,) * (t.ndim - 1))[:batch]


class ControlApplication:
    """One ControlNet applied to a conditioning: hint, strength, active range and the previous
    application in the chain (whose residuals are added to this one's)."""

    def __init__(self, controlnet: ControlNetHandle, image: torch.Tensor, strength: float,
                 percent_range: tuple[float, float] = (0.0, 1.0), previous: Any = None) -> None:
        self.controlnet = controlnet
        self.image = image
        self.strength = float(strength)
        self.start_percent, self.end_percent = (float(p) for p in percent_range)
        self.previous = previous
        self._hint_cache: tuple[tuple, torch.Tensor] | None = None
        from ..sampling.model_sampling import DiscreteSchedule  # SD1/SD2/SDXL share this schedule
        schedule = DiscreteSchedule()
        self.sigma_start = schedule.percent_to_sigma(self.start_percent)
        self.sigma_end = schedule.percent_to_sigma(self.end_percent)

    def chain(self) -> list[ControlApplication]:
        out, node = [], self
        while isinstance(node, ControlApplication):
            out.append(node)
            node = node.previous
        return out

    def active(self, sigma: torch.Tensor | float | None) -> bool:
        if sigma is None:
            return True
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        return not (s > self.sigma_start or s < self.sigma_end)

    def hint_for(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """The hint at 8x the latent's size, batched like `x` (which stacks `groups` equal chunks)."""
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        key = (height, width, x.shape[0], groups, x.device)
        if self._hint_cache is not None and self._hint_cache[0] == key:
            return self._hint_cache[1]
        image = self.image
        hint = image.movedim(-1, 1)[:, :3] if image.shape[-1] in (1, 3, 4) else image
        hint = fit_hint(hint.float(), height, width).to(x.device)
        batch = x.shape[0]
        if groups > 1 and batch % groups == 0:
            hint = _tile_batch(hint, batch // groups).repeat(groups, 1, 1, 1)
        else:
            hint = _tile_batch(hint, batch)
        self._hint_cache = (key, hint)
        return hint

    def residuals_for(self, x: torch.Tensor, timestep: torch.Tensor | float, cond: Mapping[str, Any],
                      groups: int) -> dict[str, Any]:
        """This application's own residuals for the UNet input `x`."""
        added = None
        if cond.get("pooled") is not None and cond.get("size_cond") is not None:
            added = {"text_embeds": _tile_batch(cond["pooled"], x.shape[0]),
                     "time_ids": _tile_batch(cond["size_cond"], x.shape[0])}
        context = _tile_batch(cond["context"], x.shape[0])
        return self.controlnet.residuals(x, timestep, context, self.hint_for(x, groups), self.strength, added)

    def get_control(self, x: torch.Tensor, timestep: torch.Tensor | float, cond: Mapping[str, Any]) -> dict | None:
        """Residuals {"down": [...], "mid": t} and/or {"intrablock": [...]} (T2I-Adapters) for the UNet
        input `x` (this application plus every previous one in the chain, summed), or None when none
        of them is active at this sigma."""
        total: dict | None = None
        for app in self.chain():
            if app.strength == 0 or not app.active(cond.get("sigma")):
                continue
            groups = len(cond.get("cond_or_uncond") or [1])
            total = merge_controls(total, app.residuals_for(x, timestep, cond, groups))
        return total


def merge_controls(a: dict | None, b: dict) -> dict:
    """Sum two residual dicts key by key (a ControlNet and a T2I-Adapter fill different keys)."""
    if a is None:
        return b
    out = dict(a)
    for key, value in b.items():
        if out.get(key) is None:
            out[key] = value
        elif key == "mid":
            out[key] = out[key] + value
        else:
            out[key] = [p + q for p, q in zip(out[key], value)]
    return out


class AdapterApplication(ControlApplication):
    """A T2I-Adapter applied to a conditioning. Its features depend on the hint alone, so they are
    computed once per hint size and batch and scaled by the strength."""

    _features: tuple[tuple | None, list[torch.Tensor]] | None = None

    def __init__(self, adapter: T2IAdapterHandle, image: torch.Tensor, strength: float,
                 percent_range: tuple[float, float] = (0.0, 1.0), previous: Any = None) -> None:
        # the base class uses its handle only in residuals_for, which this class replaces
        super().__init__(cast("ControlNetHandle", adapter), image, strength, percent_range, previous)
        self.adapter = adapter

    def residuals_for(self, x: torch.Tensor, timestep: torch.Tensor | float, cond: Mapping[str, Any],
                      groups: int) -> dict[str, Any]:
        hint = self.hint_for(x, groups)
        key = self._hint_cache[0] if self._hint_cache is not None else None
        if self._features is None or self._features[0] != key:
            factor = int(self.adapter.model.config["downscale_factor"])
            if hint.shape[-1] % factor or hint.shape[-2] % factor:
                raise ValueError(f"this T2I-Adapter needs image sides that are multiples of {factor} pixels, "
                                 f"got {hint.shape[-1]}x{hint.shape[-2]}")
            self._features = (key, self.adapter.features(hint))
        return {"intrablock": [f.to(x.device, x.dtype) * self.strength for f in self._features[1]]}

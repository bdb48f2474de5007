"""SD3 / SD3.5 ControlNets: diffusers' SD3ControlNetModel, loaded from either file layout, and its
residuals added to the MMDiT's joint blocks while sampling.

Layouts:
- Stability's SD3.5 Large ControlNets (sd3.5_large_controlnet_{blur,canny,depth}.safetensors):
  `controlnet_blocks.N`, `pos_embed_input.proj`, `time_text_embed.*` (diffusers names already) and
  `transformer_blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}` of blocks
  without a text stream; an optional scalar `control_type` (0 blur, 1 canny, 2 depth). They have no
  patch embedding of their own (the base model's is used) and no context input; they take the real
  pooled projection and hint latents with the SD3 latent format's shift.
- diffusers (`transformer_blocks.N.norm1.linear`, `attn.to_q`, ...): a folder with an
  SD3ControlNetModel config.json, or a bare file (config inferred from the shapes). Those with a
  context embedder (InstantX's SD3 ControlNets) get zero pooled projections and hints without the
  shift, as diffusers' StableDiffusion3ControlNetPipeline does (`force_zeros_for_pooled_projection`).

The hint image is fitted to the latent's pixel size, preprocessed by control type (ComfyUI's canny
and depth conventions), VAE-encoded and put into model space; the ControlNet's block outputs, times
the strength, are added after the MMDiT's joint blocks (`block_controlnet_hidden_states`).
"""
from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from .checkpoint import _materialize
from .memory import ResidentMixin, WeightsHolder, default_device
from .state_dict import ModelFileError, read_state_dict

if TYPE_CHECKING:
    from diffusers.models.controlnets.controlnet_sd3 import SD3ControlNetModel

    from .sd3_handles import SD3ModelHandle
    from .vae import VaeHandle

HEAD_DIM = 64
CLASS_NAME = "SD3ControlNetModel"
CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}


@cache
def _config_args() -> frozenset[str]:
    from diffusers import SD3ControlNetModel

    return frozenset(inspect.signature(SD3ControlNetModel.__init__).parameters) - {"self"}


# ------------------------------------------------------------------------------------ key layouts

def is_sd3_controlnet(sd: Mapping[str, Any]) -> bool:
    """An SD3 ControlNet in either layout (a key set, e.g. a safetensors header, is enough)."""
    return "controlnet_blocks.0.weight" in sd and "pos_embed_input.proj.weight" in sd


def is_stability_layout(sd: Mapping[str, Any]) -> bool:
    return "transformer_blocks.0.adaLN_modulation.1.weight" in sd


def is_sd3_controlnet_folder(path: Path) -> bool:
    return path.is_dir() and _sidecar_config(path) is not None


def _block_count(sd: Mapping[str, Any]) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def stability_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stability's SD3.5 ControlNet names -> SD3ControlNetModel names (without `control_type`)."""
    renames = {"attn.proj.": "attn.to_out.0.", "mlp.fc1.": "ff.net.0.proj.", "mlp.fc2.": "ff.net.2.",
               "adaLN_modulation.1.": "norm1.linear."}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "control_type":
            continue
        m = re.match(r"(transformer_blocks\.\d+\.)(.+)", key)
        if m is None:
            out[key] = value
            continue
        head, rest = m.groups()
        if rest.startswith("attn.qkv."):
            leaf = rest[len("attn.qkv."):]
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{head}attn.to_{name}.{leaf}"] = part
            continue
        for old, new in renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[head + rest] = value
    return out


def diffusers_to_stability(sd: Mapping[str, torch.Tensor], control_type: int | None = None) -> dict[str, torch.Tensor]:
    """The inverse of `stability_to_diffusers` (to write files in Stability's layout)."""
    renames = {"attn.to_out.0.": "attn.proj.", "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2.",
               "norm1.linear.": "adaLN_modulation.1."}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"(transformer_blocks\.\d+\.)(.+)", key)
        if m is None:
            out[key] = value
            continue
        head, rest = m.groups()
        if rest.startswith(("attn.to_k.", "attn.to_v.")):
            continue
        if rest.startswith("attn.to_q."):
            leaf = rest[len("attn.to_q."):]
            out[f"{head}attn.qkv.{leaf}"] = torch.cat([sd[f"{head}attn.to_{c}.{leaf}"] for c in "qkv"])
            continue
        for old, new in renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[head + rest] = value
    if control_type is not None:
        out["control_type"] = torch.tensor(float(control_type))
    return out


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """SD3ControlNetModel config from diffusers-named tensors."""
    hidden = int(sd["controlnet_blocks.0.weight"].shape[0])
    if hidden % HEAD_DIM:
        raise ValueError(f"ControlNet width {hidden} is not a multiple of the head width {HEAD_DIM}")
    hint = sd["pos_embed_input.proj.weight"]
    cfg: dict[str, Any] = {
        "patch_size": int(hint.shape[-1]),
        "num_layers": _block_count(sd),
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": hidden // HEAD_DIM,
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "dual_attention_layers": sorted({int(m.group(1)) for k in sd
                                         if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", k))}),
        "qk_norm": "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in sd else None,
    }
    ctx = sd.get("context_embedder.weight")
    cfg.update(joint_attention_dim=int(ctx.shape[1]) if ctx is not None else None,
               caption_projection_dim=int(ctx.shape[0]) if ctx is not None else hidden)
    proj = sd.get("pos_embed.proj.weight")
    if proj is None:
        # Stability's: the base model's patch embedding is used.
        cfg.update(use_pos_embed=False, pos_embed_type=None, pos_embed_max_size=None, in_channels=int(hint.shape[1]))
    else:
        pos = sd.get("pos_embed.pos_embed")
        cfg.update(in_channels=int(proj.shape[1]),
                   pos_embed_max_size=round(int(pos.shape[1]) ** 0.5) if pos is not None else None)
    cfg["extra_conditioning_channels"] = int(hint.shape[1]) - int(cfg["in_channels"])
    cfg["out_channels"] = cfg["in_channels"]
    # InstantX's SD3 ControlNets (with a text stream) were trained on zero pooled projections.
    cfg["force_zeros_for_pooled_projection"] = ctx is not None
    return cfg


# ----------------------------------------------------------------------------------------- loading

def _sidecar_config(path: Path) -> dict | None:
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileError(cfg_path, "not valid JSON") from None
    return cfg if isinstance(cfg, dict) and cfg.get("_class_name") == CLASS_NAME else None


def _build(config: Mapping, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, path: Path) -> SD3ControlNetModel:
    from diffusers import SD3ControlNetModel

    cfg = {k: v for k, v in config.items() if k in _config_args()}
    model = _materialize(lambda: SD3ControlNetModel.from_config(cfg), sd, dtype, path, "SD3 ControlNet")
    unused = set(sd) - set(model.state_dict())
    if unused:
        raise ModelFileError(path, f"SD3 ControlNet has {len(unused)} tensors the model does not use, "
                                   f"e.g. {sorted(unused)[0]!r}")
    return model


def load_sd3_controlnet(path: str | Path, *, dtype: torch.dtype = torch.float32,
                        sd: Mapping[str, torch.Tensor] | None = None) -> tuple[SD3ControlNetModel, int | None]:
    """(SD3ControlNetModel, control type or None) from a file of either layout or a diffusers folder."""
    path = Path(path)
    config = _sidecar_config(path)
    if path.is_dir():
        weights = next((path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                           "diffusion_pytorch_model.fp16.safetensors") if (path / n).is_file()), None)
        if weights is None:
            raise ModelFileError(path, "SD3 ControlNet folder has no diffusion_pytorch_model weights")
        path = weights
    if sd is None:
        sd = read_state_dict(path)
    if not is_sd3_controlnet(sd):
        raise ModelFileError(path, "not an SD3 ControlNet: no controlnet_blocks.* / pos_embed_input.* keys")
    control_type = None
    if "control_type" in sd:
        control_type = round(float(sd["control_type"].float().reshape(-1)[0]))
    try:
        weights_sd = stability_to_diffusers(sd) if is_stability_layout(sd) else {
            k: v for k, v in sd.items() if k != "control_type"}
        cfg = dict(config) if config is not None else infer_config(weights_sd)
        return _build(cfg, weights_sd, dtype, path), control_type
    except (KeyError, ValueError, IndexError, TypeError, AttributeError, RuntimeError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(path, f"unrecognised SD3 ControlNet layout: {type(e).__name__}: {e}") from None


def preprocess_for(control_type: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The hint transform of Stability's ControlNets by type (ComfyUI's conventions): canny edges
    scaled as `a * 255 * 0.5 + 0.5`, depth inverted; blur (and untyped files) as they are."""
    if control_type == 1:
        return lambda a: a * 255 * 0.5 + 0.5
    if control_type == 2:
        return lambda a: 1.0 - a
    return lambda a: a


# ------------------------------------------------------------------------------------------ runtime

class SD3ControlNetHandle(ResidentMixin):
    """What the CONTROL_NET socket carries for an SD3 ControlNet."""

    needs_vae = True

    def __init__(self, model: SD3ControlNetModel, control_type: int | None = None, device: str | None = None,
                 source: str | Path | None = None) -> None:
        self._weights = WeightsHolder({"controlnet": model})
        self.control_type = control_type
        self.load_device = device or default_device()
        self.source = source

    @property
    def model(self) -> SD3ControlNetModel:
        return self._weights.modules["controlnet"]  # type: ignore[return-value]

    @property
    def zero_pooled(self) -> bool:
        return bool(getattr(self.model.config, "force_zeros_for_pooled_projection", False))

    def apply_hint(self, image: torch.Tensor, strength: float, percent_range: tuple[float, float] = (0.0, 1.0),
                   previous: Any = None, vae: VaeHandle | None = None) -> SD3ControlApplication:
        if vae is None:
            raise ValueError("an SD3 ControlNet needs a VAE to encode its hint image: connect the `vae` input")
        return SD3ControlApplication(self, image, strength, percent_range, previous, vae)

    @torch.no_grad()
    def block_outputs(self, transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      pooled: torch.Tensor, hint: torch.Tensor, scale: float) -> list[torch.Tensor]:
        """The ControlNet's per-block residuals (times `scale`) for the MMDiT input `x` [B,16,h,w]."""
        self.ensure_loaded()
        model = self.model
        param = next(model.parameters())
        dev, dtype = param.device, param.dtype
        want = int(model.config["pooled_projection_dim"])
        if pooled.shape[-1] != want:
            raise ValueError(f"this SD3 ControlNet takes pooled projections of width {want}, the conditioning has "
                             f"{pooled.shape[-1]}: use it with the SD3 model it was trained for")
        if self.zero_pooled:
            pooled = torch.zeros_like(pooled)
        kwargs: dict[str, Any] = {}
        if model.pos_embed is None:
            # Stability's ControlNets share the base model's patch embedding (diffusers' pipeline copies it).
            hidden = transformer.pos_embed(x).to(dev, dtype)
        else:
            hidden = x.to(dev, dtype)
        if model.context_embedder is not None:
            kwargs["encoder_hidden_states"] = context.to(dev, dtype)
        out = model(hidden_states=hidden, controlnet_cond=hint.to(dev, dtype), conditioning_scale=float(scale),
                    pooled_projections=pooled.to(dev, dtype), timestep=t.to(dev), return_dict=False, **kwargs)[0]
        return [o.to(x.device, x.dtype) for o in out]


def per_block(outputs: list[torch.Tensor], blocks: int) -> list[torch.Tensor]:
    """A ControlNet's outputs spread over `blocks` joint blocks the way diffusers' SD3 transformer
    indexes them (block i takes output int(i / (blocks / len(outputs))))."""
    interval = blocks / len(outputs)
    return [outputs[int(i / interval)] for i in range(blocks)]


class SD3ControlApplication:
    """One SD3 ControlNet applied to a conditioning: hint image, strength, active range, VAE and the
    previous application in the chain (whose residuals are added to this one's)."""

    def __init__(self, controlnet: SD3ControlNetHandle, image: torch.Tensor, strength: float,
                 percent_range: tuple[float, float], previous: Any, vae: VaeHandle) -> None:
        self.controlnet = controlnet
        self.image = image
        self.strength = float(strength)
        self.start_percent, self.end_percent = (float(p) for p in percent_range)
        self.previous = previous
        self.vae = vae
        self._latent_cache: tuple[tuple, torch.Tensor] | None = None

    def chain(self) -> list[SD3ControlApplication]:
        out: list[SD3ControlApplication] = []
        node: Any = self
        while node is not None:
            if not isinstance(node, SD3ControlApplication):
                raise ValueError("an SD1/SD2/SDXL ControlNet or T2I-Adapter is chained with an SD3 ControlNet; "
                                 "SD3 models take SD3 ControlNets only")
            out.append(node)
            node = node.previous
        return out

    def get_control(self, x: torch.Tensor, timestep: Any, cond: Mapping[str, Any]) -> dict | None:
        # What UNet models call: an SD3 ControlNet cannot guide them.
        raise ValueError("an SD3 ControlNet was applied to the conditioning of an SD1/SD2/SDXL model; "
                         "use a ControlNet made for that model")

    def active(self, sigma: Any, schedule: Any) -> bool:
        if sigma is None:
            return True
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        start, end = schedule.percent_to_sigma(self.start_percent), schedule.percent_to_sigma(self.end_percent)
        return not (s > start or s < end)

    def hint_latent(self, x: torch.Tensor, groups: int, latent_format: tuple[float, float]) -> torch.Tensor:
        """The hint in model space at `x`'s latent size, batched like `x` (`groups` equal chunks)."""
        from .controlnet import _tile_batch, fit_hint

        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        key = (height, width, latent_format)
        if self._latent_cache is None or self._latent_cache[0] != key:
            image = self.image
            pixels = image.movedim(-1, 1)[:, :3] if image.shape[-1] in (1, 3, 4) else image[:, :3]
            if pixels.shape[1] == 1:
                pixels = pixels.repeat(1, 3, 1, 1)
            pixels = fit_hint(pixels.float(), height, width)
            pixels = preprocess_for(self.controlnet.control_type)(pixels)
            raw = self.vae.encode(pixels.movedim(1, -1))
            scale, shift = latent_format
            if self.controlnet.zero_pooled:
                shift = 0.0   # InstantX's SD3 ControlNets were trained on unshifted hint latents
            self._latent_cache = (key, (raw.float() - shift) * scale)
        latent = self._latent_cache[1].to(x.device)
        batch = x.shape[0]
        if groups > 1 and batch % groups == 0:
            return _tile_batch(latent, batch // groups).repeat(groups, 1, 1, 1)
        return _tile_batch(latent, batch)

    def block_residuals(self, model: SD3ModelHandle, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        pooled: torch.Tensor, cond: Mapping[str, Any]) -> list[torch.Tensor] | None:
        """Residuals for each joint block of `model` (this application plus the previous ones,
        summed), or None when none is active at this sigma."""
        transformer = model.unet
        blocks = len(cast("torch.nn.ModuleList", transformer.transformer_blocks))
        schedule = model.sampling_schedule()
        groups = len(cond.get("cond_or_uncond") or [1])
        total: list[torch.Tensor] | None = None
        for app in self.chain():
            if app.strength == 0 or not app.active(cond.get("sigma"), schedule):
                continue
            hint = app.hint_latent(x, groups, model.latent_format)
            outs = per_block(app.controlnet.block_outputs(transformer, x, t, context, pooled, hint, app.strength),
                             blocks)
            total = outs if total is None else [a + b for a, b in zip(total, outs)]
        return total

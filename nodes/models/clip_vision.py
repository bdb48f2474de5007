"""CLIP vision towers (the CLIP_VISION socket): transformers' CLIPVisionModelWithProjection loaded from
a file in the HF layout (`vision_model.*`, `visual_projection.weight`) or the original OpenCLIP one
(`visual.*`, also found inside checkpoints under a longer prefix).

The architecture is read from the tensor shapes: width, depth, patch size, image size, MLP width and
projection width. Full-size towers match a shipped config (CLIP ViT-L/14, OpenCLIP ViT-H/14 and
ViT-bigG/14, in `configs/clip_vision/`), which supplies what shapes cannot show (head count,
activation); any other shape (the tiny test towers) gets 64-wide heads and GELU.

Encoding follows ComfyUI's preprocessing: resize the shortest side to the tower's image size (bicubic,
antialiased) and center-crop, or squash to a square (crop "none"), quantise to 8 bits, normalise with
CLIP's mean/std. The output carries ComfyUI's fields: `last_hidden_state`, `penultimate_hidden_states`
and `image_embeds` (the projected pooled embedding).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .detect import CONFIG_DIR, clip_heads
from .ldm_keys import _OPENCLIP_LAYER_TO_HF, hf_layer_to_openclip
from .memory import ResidentMixin, WeightsHolder, default_device
from .state_dict import ModelFileError, read_state_dict

if TYPE_CHECKING:
    from transformers import CLIPVisionModelWithProjection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SHIPPED = ("vit_l", "vit_h", "vit_g")
HF_LAYER0 = "vision_model.encoder.layers.0.layer_norm1.weight"
# Where a vision tower sits in the files people have: a bare OpenCLIP export, an SD2.1 unCLIP
# checkpoint, an SVD checkpoint.
OPENCLIP_PREFIXES = ("visual.", "embedder.model.visual.", "conditioner.embedders.0.open_clip.model.visual.")

_OPENCLIP_TOP = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}


@cache
def shipped_config(name: str) -> dict:
    return cast(dict, json.loads((CONFIG_DIR / "clip_vision" / f"{name}.json").read_text()))


def openclip_prefix(sd: Mapping[str, torch.Tensor]) -> str | None:
    for prefix in OPENCLIP_PREFIXES:
        if prefix + "transformer.resblocks.0.attn.in_proj_weight" in sd and prefix + "conv1.weight" in sd:
            return prefix
    return None


def is_clip_vision(sd: Mapping[str, torch.Tensor]) -> bool:
    return HF_LAYER0 in sd or openclip_prefix(sd) is not None


def openclip_vision_to_hf(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenCLIP visual tower under `prefix` -> CLIPVisionModelWithProjection keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[rest]] = value
        elif rest == "proj":  # OpenCLIP computes x @ proj; a Linear stores the transpose
            out["visual_projection.weight"] = value.t().contiguous()
        else:
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", rest)
            if m is None:
                continue
            base, sub = f"vision_model.encoder.layers.{m.group(1)}.", m.group(2)
            if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = sub.rsplit("_", 1)[1]
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for o_name, h_name in _OPENCLIP_LAYER_TO_HF.items():
                if sub.startswith(o_name + "."):
                    out[base + h_name + sub[len(o_name):]] = value
                    break
    return out


def hf_vision_to_openclip(sd: Mapping[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """CLIPVisionModelWithProjection keys -> the OpenCLIP layout (writes test files in the original layout)."""
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in top:
            out[prefix + top[key]] = value
            continue
        if key == "visual_projection.weight":
            out[prefix + "proj"] = value.t().contiguous()
            continue
        m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            continue  # position_ids buffers
        hf_layer_to_openclip(f"{prefix}transformer.resblocks.{m.group(1)}.", m.group(2), value, out, qkv)
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_hf_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The HF-layout vision tower in `sd` (converted when it is OpenCLIP), or None when there is none."""
    prefix = openclip_prefix(sd)
    if prefix is not None:
        return openclip_vision_to_hf(sd, prefix)
    if HF_LAYER0 in sd:
        return {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    return None


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """A CLIPVisionConfig dict from the shapes of an HF-layout vision tower."""
    patch = sd["vision_model.embeddings.patch_embedding.weight"]
    hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ValueError(f"{positions} position embeddings do not form a square patch grid plus a class token")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)))
    if "visual_projection.weight" not in sd:
        raise ValueError("the tower has no image projection (visual_projection / proj)")
    shapes = {
        "hidden_size": hidden,
        "patch_size": patch_size,
        "image_size": grid * patch_size,
        "num_hidden_layers": layers,
        "intermediate_size": int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "projection_dim": int(sd["visual_projection.weight"].shape[0]),
    }
    for name in SHIPPED:
        cfg = dict(shipped_config(name))
        if all(cfg[k] == v for k, v in shapes.items()):
            return cfg
    cfg = dict(shipped_config("vit_h"))
    cfg.update(shapes, num_attention_heads=clip_heads(hidden))
    return cfg


def build_model(sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> CLIPVisionModelWithProjection:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = infer_config(sd)
    config = CLIPVisionConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    missing, unexpected = model.load_state_dict(dict(sd), strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"tensors missing: {missing[:5]}, unexpected: {unexpected[:5]}")
    # position_ids is a non-persistent buffer: meta-initialised, so rebuilt here.
    emb = model.vision_model.embeddings
    emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand((1, -1)), persistent=False)
    cast(nn.Module, model).to(dtype)  # transformers wraps .to in a way mypy cannot call
    return model.eval().requires_grad_(False)


def _kind_hint(sd: Mapping[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any("lora_" in k or ".lora." in k or k.endswith(".alpha") for k in keys):
        return "a LoRA"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a checkpoint without a CLIP vision tower"
    if any(k.startswith(("down_blocks.", "input_blocks.", "conv_in.")) for k in keys):
        return "a diffusion model or VAE"
    if any("text_model." in k or "token_embedding" in k for k in keys):
        return "a CLIP text encoder"
    return "not a CLIP vision model"


def load_clip_vision_file(path: str | Path, dtype: torch.dtype = torch.float32) -> CLIPVisionModelWithProjection:
    """Load the vision tower in a file; ModelFileError (naming the file and what it looks like) otherwise."""
    sd = read_state_dict(path)
    return clip_vision_from_state_dict(sd, path, dtype)


def clip_vision_from_state_dict(sd: Mapping[str, torch.Tensor], path: str | Path,
                                dtype: torch.dtype = torch.float32) -> CLIPVisionModelWithProjection:
    hf = to_hf_layout(sd)
    if hf is None:
        raise ModelFileError(path, f"not a CLIP vision model ({_kind_hint(sd)}); expected a CLIP vision tower "
                                   "(OpenCLIP 'visual.*' or transformers 'vision_model.*' keys)")
    try:
        return build_model(hf, dtype)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelFileError(path, f"unusable CLIP vision tower: {e}") from None


@dataclass
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: ComfyUI's field names; item access too, as custom nodes use it."""

    last_hidden_state: torch.Tensor
    penultimate_hidden_states: torch.Tensor
    image_embeds: torch.Tensor
    image_sizes: list | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def clip_preprocess(image: torch.Tensor, size: int, crop: bool = True) -> torch.Tensor:
    """IMAGE [B,H,W,C] in 0..1 -> normalised pixel values [B,3,size,size] (ComfyUI's recipe)."""
    x = image[..., :3].movedim(-1, 1).float()
    if x.shape[2] != size or x.shape[3] != size:
        if crop:
            scale = size / min(x.shape[2], x.shape[3])
            target = (round(scale * x.shape[2]), round(scale * x.shape[3]))
        else:
            target = (size, size)
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipVisionHandle(ResidentMixin):
    """What the CLIP_VISION socket carries."""

    def __init__(self, model: nn.Module, device: str | None = None, name: str | None = None) -> None:
        self._weights = WeightsHolder({"clip_vision": model})
        self.load_device = device or default_device()
        self.name = name

    @property
    def model(self) -> CLIPVisionModelWithProjection:
        return cast("CLIPVisionModelWithProjection", self._weights.modules["clip_vision"])

    @property
    def image_size(self) -> int:
        return int(cast(int, self.model.config.image_size))

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.endswith("position_ids")}

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
        self.ensure_loaded()
        param = next(self.model.parameters())
        pixels = clip_preprocess(image, self.image_size, crop).to(device=param.device, dtype=param.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        assert out.hidden_states is not None and out.last_hidden_state is not None  # asked for above
        return ClipVisionOutput(
            last_hidden_state=out.last_hidden_state.float().cpu(),
            penultimate_hidden_states=out.hidden_states[-2].float().cpu(),
            image_embeds=out.image_embeds.float().cpu(),
        )

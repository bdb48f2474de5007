"""Architecture detection and config inference from the tensors of a checkpoint.

A config starts from the shipped diffusers config of the detected architecture and is then
overridden by everything the tensor shapes reveal (channels, depths, context width, layer
counts, ...). Values that shapes cannot reveal (GroupNorm group count, activation, attention
head count) come from the shipped config or from the fixed rules below, which match the real
models: SD1 uses 8 heads everywhere, SD2/SDXL and all CLIP text encoders use 64-wide heads.
The same code therefore loads full-size checkpoints and the tiny test ones.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import torch

from .ldm_keys import UNET_PREFIX

ARCHES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
CONFIG_DIR = Path(__file__).parent / "configs"

# Where each text encoder lives in a single-file checkpoint, and in which layout.
CLIP_LOCATIONS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"l": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"h": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "l": ("conditioner.embedders.0.transformer.", "hf"),
        "g": ("conditioner.embedders.1.model.", "openclip"),
    },
    # The refiner conditions on OpenCLIP-G alone.
    "sdxl_refiner": {"g": ("conditioner.embedders.0.model.", "openclip")},
}
# The diffusers folder component holding each text encoder.
CLIP_COMPONENTS: dict[str, dict[str, str]] = {
    "sd1": {"l": "text_encoder"},
    "sd2": {"h": "text_encoder"},
    "sdxl": {"l": "text_encoder", "g": "text_encoder_2"},
    "sdxl_refiner": {"g": "text_encoder_2"},
}
# Numbers Fourier-embedded into the added conditioning next to the pooled text embedding:
# base (height, width, crop_h, crop_w, target_height, target_width); refiner (height, width, crop_h,
# crop_w, aesthetic_score).
SIZE_CONDS = {"sdxl": 6, "sdxl_refiner": 5}
VAE_PREFIX = "first_stage_model."

# Heuristic used for SD2 checkpoints without metadata: the v-prediction 768 models have a
# markedly wider spread in this late norm bias than the epsilon 512 ones.
_SD2_VPRED_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


@cache
def _shipped(arch: str, component: str) -> dict:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    if component == "model_index":
        path = CONFIG_DIR / arch / "model_index.json"
    else:
        path = CONFIG_DIR / arch / component / name
    return json.loads(path.read_text(encoding="utf-8"))


def shipped_config(arch: str, component: str) -> dict:
    """A fresh copy of a shipped diffusers config (`unet`, `vae`, `text_encoder`, `text_encoder_2`,
    `scheduler`, `model_index`)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}")
    return copy.deepcopy(_shipped(arch, component))


def _indices(keys, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


# ------------------------------------------------------------------------------ arch detection

def has_unet(sd: Mapping[str, torch.Tensor]) -> bool:
    return UNET_PREFIX + "input_blocks.0.0.weight" in sd


def detect_arch(sd: Mapping[str, torch.Tensor]) -> str | None:
    """"sd1", "sd2", "sdxl" or "sdxl_refiner" for a single-file LDM checkpoint, None if it is none of them."""
    if not has_unet(sd):
        return None
    if is_unclip(sd):
        return "sd2"
    if UNET_PREFIX + "label_emb.0.0.weight" in sd or any(k.startswith("conditioner.embedders.") for k in sd):
        return "sdxl_refiner" if is_refiner(sd) else "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in sd):
        return "sd1"
    # No text encoder in the file: SD2 switched the transformer projections to linear layers.
    proj = next((v for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")), None)
    if proj is not None and proj.ndim == 2:
        return "sd2"
    return "sd1"


def is_unclip(sd: Mapping[str, torch.Tensor]) -> bool:
    """An SD2.1 unCLIP checkpoint: an SD2 text encoder (or the unCLIP image embedder / noise augmentor) next
    to a UNet with a class-embedding input (LDM's label_emb, which SDXL uses for its added conditioning)."""
    if UNET_PREFIX + "label_emb.0.0.weight" not in sd:
        return False
    return any(k.startswith(("cond_stage_model.model.", "embedder.model.visual.", "noise_augmentor.")) for k in sd)


def is_refiner(sd: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX) -> bool:
    """An SDXL refiner: OpenCLIP-G as the only (first) embedder, or, for a UNet without text encoders,
    an added-conditioning width of context + 5 embedded numbers (the base has context = L + G, and
    pooled G + 6 numbers never leaves a multiple of 5 over the context)."""
    if any(k.startswith("conditioner.embedders.0.model.") for k in sd):
        return True
    if any(k.startswith("conditioner.embedders.") for k in sd):
        return False
    adm = sd.get(prefix + "label_emb.0.0.weight")
    ctx = next((v for k, v in sd.items() if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    if adm is None or ctx is None:
        return False
    extra = int(adm.shape[1]) - int(ctx.shape[1])
    return extra > 0 and extra % 5 == 0 and extra % 6 != 0


def detect_prediction_type(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], arch: str) -> str:
    """"v_prediction" or "epsilon"."""
    declared = str(metadata.get("modelspec.prediction_type", "")).lower()
    if declared:
        return "v_prediction" if "v" in declared else "epsilon"
    if "v_pred" in sd or (arch == "sd2" and is_unclip(sd)):  # the SD2.1 unCLIP releases are v-prediction
        return "v_prediction"
    probe = sd.get(_SD2_VPRED_PROBE)
    if arch == "sd2" and probe is not None and float(torch.std(probe.float(), unbiased=False)) > 0.09:
        return "v_prediction"
    return "epsilon"


# ---------------------------------------------------------------------------- config inference

def unet_heads(arch: str, channels: int) -> int:
    """Attention head count for a level of `channels` (not recoverable from weights)."""
    if arch == "sd1":
        return 8 if channels % 8 == 0 else 1
    return channels // 64 if channels >= 64 and channels % 64 == 0 else 1


def clip_heads(hidden: int) -> int:
    return hidden // 64 if hidden >= 64 and hidden % 64 == 0 else 1


def infer_unet_config(ldm: Mapping[str, torch.Tensor], arch: str, *, pooled_dim: int | None = None) -> dict:
    """UNet2DConditionModel config from LDM UNet keys without prefix."""
    cfg = shipped_config(arch, "unet")
    keys = list(ldm)
    conv_in = ldm["input_blocks.0.0.weight"]
    n_inputs = max(_indices(keys, r"input_blocks\.(\d+)\.")) + 1
    n_down = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight"))
    levels = n_down + 1
    per_level = (n_inputs - 1 - n_down) // levels
    if per_level < 1 or levels * per_level + n_down + 1 != n_inputs:
        raise ValueError("UNet input blocks do not form a regular level structure")

    channels, has_attn, depths = [], [], []
    for i in range(levels):
        k = 1 + i * (per_level + 1)
        channels.append(int(ldm[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0]))
        attn = f"input_blocks.{k}.1."
        has_attn.append(any(key.startswith(attn) for key in keys))
        depths.append(len(_indices(keys, re.escape(attn) + r"transformer_blocks\.(\d+)\.")) or 1)
    mid_depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    if not has_attn[-1]:
        depths[-1] = mid_depth  # diffusers sizes the mid block from the last entry
    elif depths[-1] != mid_depth:
        raise ValueError("UNet mid block depth differs from the last level's")

    ctx = next(v for k, v in ldm.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in ldm.items() if k.endswith(".proj_in.weight"))
    cfg.update(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(ldm["out.2.weight"].shape[0]),
        block_out_channels=channels,
        layers_per_block=per_level,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        cross_attention_dim=int(ctx.shape[1]),
        use_linear_projection=proj_in.ndim == 2,
        transformer_layers_per_block=depths,
    )
    if arch == "sd1":
        heads = {unet_heads(arch, c) for c in channels}
        cfg["attention_head_dim"] = heads.pop() if len(heads) == 1 else [unet_heads(arch, c) for c in channels]
    else:
        cfg["attention_head_dim"] = [unet_heads(arch, c) for c in channels]
    time_dim = int(ldm["time_embed.0.weight"].shape[0])
    if time_dim != 4 * channels[0]:
        cfg["time_embedding_dim"] = time_dim
    if "label_emb.0.0.weight" in ldm and arch == "sd2":
        # SD2.1 unCLIP: noise-augmented image embedding + its noise-level embedding as class labels
        for name in ("addition_embed_type", "addition_time_embed_dim", "addition_embed_type_num_heads"):
            cfg.pop(name, None)
        cfg["class_embed_type"] = "projection"
        cfg["projection_class_embeddings_input_dim"] = int(ldm["label_emb.0.0.weight"].shape[1])
    elif "label_emb.0.0.weight" in ldm:
        adm_in = int(ldm["label_emb.0.0.weight"].shape[1])
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = adm_in
        # adm input = pooled text embedding + 6 (refiner: 5) Fourier-embedded size/crop/score numbers.
        n = SIZE_CONDS.get(arch, 6)
        if pooled_dim is None and arch == "sdxl_refiner":
            pooled_dim = int(ctx.shape[1])  # the refiner pools from the encoder it conditions on
        if pooled_dim is not None and (adm_in - pooled_dim) > 0 and (adm_in - pooled_dim) % n == 0:
            cfg["addition_time_embed_dim"] = (adm_in - pooled_dim) // n
    else:
        for name in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                     "addition_embed_type_num_heads"):
            cfg.pop(name, None)
    return cfg


def infer_vae_config(sd: Mapping[str, torch.Tensor], arch: str) -> dict:
    """AutoencoderKL config from diffusers-layout VAE keys."""
    cfg = shipped_config(arch, "vae")
    keys = list(sd)
    levels = max(_indices(keys, r"encoder\.down_blocks\.(\d+)\.")) + 1
    cfg.update(
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        latent_channels=int(sd["decoder.conv_in.weight"].shape[1]),
        block_out_channels=[int(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(levels)],
        layers_per_block=len(_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.") for k in keys),
    )
    return cfg


def count_vae_levels_ldm(keys) -> int:
    return max(_indices(keys, r"(?:first_stage_model\.|vae\.)?encoder\.down\.(\d+)\.")) + 1


def clip_component(arch: str, kind: str) -> str:
    return CLIP_COMPONENTS[arch][kind]


def infer_clip_config(sd: Mapping[str, torch.Tensor], arch: str, kind: str) -> dict:
    """CLIPTextConfig kwargs from transformers-layout text encoder keys."""
    cfg = shipped_config(arch, clip_component(arch, kind))
    tok = sd["text_model.embeddings.token_embedding.weight"]
    hidden = int(tok.shape[1])
    cfg.update(
        vocab_size=int(tok.shape[0]),
        hidden_size=hidden,
        max_position_embeddings=int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
        num_hidden_layers=len(_indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")),
        intermediate_size=int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
    )
    if hidden != shipped_config(arch, clip_component(arch, kind))["hidden_size"]:
        cfg["num_attention_heads"] = clip_heads(hidden)
    if "text_projection.weight" in sd:
        cfg["projection_dim"] = int(sd["text_projection.weight"].shape[0])
        cfg["architectures"] = ["CLIPTextModelWithProjection"]
    else:
        cfg["projection_dim"] = hidden
        cfg["architectures"] = ["CLIPTextModel"]
    return cfg

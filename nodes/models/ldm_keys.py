"""Key layout conversion between original LDM single-file checkpoints and diffusers/transformers.

Loading (LDM -> diffusers) reuses diffusers' own converters for the UNet and VAE, which only need
an explicit config dict and work offline. The CLIP text encoders are renamed here: HF-layout CLIP
(SD1, SDXL-L) is a prefix change, OpenCLIP (SD2-H, SDXL-G) needs renames, a fused qkv split
and a transposed projection. Writing (diffusers -> LDM) is implemented here for all parts; it
exists to produce checkpoints in the original layout (tiny test models), and is tested to
round-trip exactly through the loading direction.

All functions take and return flat `{key: tensor}` dicts; UNet/VAE functions work on keys
*without* the `model.diffusion_model.` / `first_stage_model.` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")

# ---------------------------------------------------------------------------------------- UNet

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    # unCLIP models feed the image embedding through the same LDM slot as a class embedding
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_TO_LDM.get(head, head)}.{tail}"


def unet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> LDM `openaimodel` keys (no prefix)."""
    per = int(config["layers_per_block"]) + 1  # LDM input slots per level (resnets + downsample)
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = None
        for d_prefix, l_prefix in _UNET_TOP_TO_LDM.items():
            if key.startswith(d_prefix + "."):
                new = l_prefix + key[len(d_prefix):]
                break
        if new is None:
            m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
            mm = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
            if m:
                side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
                if side == "down":
                    if kind == "resnets":
                        new = f"input_blocks.{1 + i * per + j}.0.{_resnet_rest(rest)}"
                    elif kind == "attentions":
                        new = f"input_blocks.{1 + i * per + j}.1.{rest}"
                    else:  # downsamplers.0.conv.*
                        new = f"input_blocks.{1 + i * per + per - 1}.0.op.{rest.removeprefix('conv.')}"
                else:
                    if kind == "resnets":
                        new = f"output_blocks.{i * per + j}.0.{_resnet_rest(rest)}"
                    elif kind == "attentions":
                        new = f"output_blocks.{i * per + j}.1.{rest}"
                    else:  # upsamplers.0.conv.*: after the attention when the level has one
                        slot = 2 if up_has_attn[i] else 1
                        new = f"output_blocks.{i * per + per - 1}.{slot}.{rest}"
            elif mm:
                kind, j, rest = mm.group(1), int(mm.group(2)), mm.group(3)
                new = f"middle_block.{2 * j}.{_resnet_rest(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        if new is None:
            raise KeyError(f"no LDM name for UNet key {key!r}")
        out[new] = value
    return out


def unet_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """LDM UNet keys (prefix optional) -> diffusers keys, via diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    prefixed = {k if k.startswith(UNET_PREFIX) else UNET_PREFIX + k: v for k, v in sd.items()}
    return convert_ldm_unet_checkpoint(prefixed, dict(config))


# ----------------------------------------------------------------------------------------- VAE

_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet_rest(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM keys (no prefix). Attention linears become 1x1 convs."""
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = None
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
        mm = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            part, side, i, kind, j, rest = m.groups()
            i = int(i) if side == "down" else n_up - 1 - int(i)  # LDM numbers decoder levels bottom-up
            if kind == "resnets":
                new = f"{part}.{side}.{i}.block.{j}.{_vae_resnet_rest(rest)}"
            else:
                new = f"{part}.{side}.{i}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        elif mm:
            part, kind, j, rest = mm.groups()
            if kind == "resnets":
                new = f"{part}.mid.block_{int(j) + 1}.{_vae_resnet_rest(rest)}"
            else:
                for d_name, l_name in _VAE_ATTN_TO_LDM.items():
                    if rest.startswith(d_name + "."):
                        new = f"{part}.mid.attn_1.{l_name}.{rest[len(d_name) + 1:]}"
                        if l_name != "norm" and value.ndim == 2:
                            value = value[:, :, None, None]
                        break
        elif key.endswith(("conv_norm_out.weight", "conv_norm_out.bias")):
            new = key.replace("conv_norm_out", "norm_out")
        elif re.match(r"(encoder|decoder)\.conv_(in|out)\.|(post_)?quant_conv\.", key):
            new = key
        if new is None:
            raise KeyError(f"no LDM name for VAE key {key!r}")
        out[new] = value
    return out


def vae_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """LDM VAE keys (with `first_stage_model.`/`vae.` prefix or none) -> diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    stripped = dict(sd)
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return convert_ldm_vae_checkpoint(stripped, dict(config))


def is_diffusers_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("encoder.down_blocks.") for k in sd)


def is_ldm_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(re.match(r"(first_stage_model\.|vae\.)?encoder\.down\.\d+\.", k) for k in sd)


# ---------------------------------------------------------------------------------------- CLIP

# Buffers some checkpoints carry that the current transformers CLIP does not persist.
_CLIP_IGNORED = ("text_model.embeddings.position_ids",)


def hf_clip_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF-layout CLIP stored under `prefix` (SD1 / SDXL-L) -> transformers CLIPTextModel keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        # Checkpoints saved with old transformers lack the `text_model.` level.
        if rest.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            rest = "text_model." + rest
        if rest in _CLIP_IGNORED:
            continue
        out[rest] = value
    return out


def hf_clip_to_ldm(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items() if k not in _CLIP_IGNORED}


_OPENCLIP_LAYER_TO_HF = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_TOP_TO_HF = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}


def openclip_to_hf(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower under `prefix` (SD2-H, SDXL-G) -> CLIPTextModelWithProjection keys.

    Every layer is kept (diffusers' SD2 conversion drops the last one); `logit_scale` and the
    causal `attn_mask` buffer have no counterpart and are skipped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in _OPENCLIP_TOP_TO_HF:
            out[_OPENCLIP_TOP_TO_HF[rest]] = value
        elif rest == "text_projection":
            # OpenCLIP multiplies x @ P; a Linear stores the transpose.
            out["text_projection.weight"] = value.t().contiguous()
        elif rest.startswith("transformer.resblocks."):
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", rest)
            if m is None:  # no layer index: skipped like the other keys without a counterpart
                continue
            i, sub = m.group(1), m.group(2)
            base = f"text_model.encoder.layers.{i}."
            if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if sub.endswith("weight") else "bias"
                q, k, v = value.chunk(3, dim=0)
                for name, part in (("q", q), ("k", k), ("v", v)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for o_name, h_name in _OPENCLIP_LAYER_TO_HF.items():
                if sub.startswith(o_name + "."):
                    out[base + h_name + sub[len(o_name):]] = value
                    break
    return out


def hf_layer_to_openclip(base: str, sub: str, value: torch.Tensor, out: dict[str, torch.Tensor],
                         pending: dict[str, dict[str, torch.Tensor]]) -> bool:
    """One key `sub` of an HF CLIP encoder layer (text or vision tower) under the OpenCLIP resblock `base`:
    q/k/v projections are collected in `pending` (OpenCLIP fuses them into in_proj, see fuse_qkv), the rest
    renamed into `out`. False when the key has no OpenCLIP name."""
    qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", sub)
    if qkv:
        pending.setdefault(f"{base}attn.in_proj_{qkv.group(2)}", {})[qkv.group(1)] = value
        return True
    for o_name, h_name in _OPENCLIP_LAYER_TO_HF.items():
        if sub.startswith(h_name + "."):
            out[base + o_name + sub[len(h_name):]] = value
            return True
    return False


def hf_to_openclip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection keys -> OpenCLIP text tower keys under `prefix`."""
    top = {v: k for k, v in _OPENCLIP_TOP_TO_HF.items()}
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _CLIP_IGNORED:
            continue
        if key in top:
            out[prefix + top[key]] = value
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.t().contiguous()
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if not m:
            raise KeyError(f"no OpenCLIP name for CLIP key {key!r}")
        if not hf_layer_to_openclip(f"{prefix}transformer.resblocks.{m.group(1)}.", m.group(2), value, out, pending):
            raise KeyError(f"no OpenCLIP name for CLIP key {key!r}")
    for name, parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"incomplete q/k/v for {name!r}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out

"""Tiny random-weight SD3 / SD3.5 models for tests, written in the real file layouts.

The real classes (diffusers' SD3Transformer2DModel and 16-channel AutoencoderKL, transformers'
CLIPTextModelWithProjection x2 and T5EncoderModel) at tiny widths, keeping the real structure:
64-wide heads, CLIP L and G concatenated and zero-padded to the T5 width, pooled = L + G
projections; `sd35=True` gives MMDiT-X (dual attention in the first layers, q/k RMS norms).
CLIP-L is 32 wide and G 64 wide, so a separate file's kind is told from its width (sd3.encoder_kind).

The T5 tokenizer of these models is a tiny unigram vocabulary built here (T5's special-token
ids: pad 0, EOS 1, unk 2); full-size models use the shipped one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .sd3 import (
    ENCODER_NAMES,
    ENCODER_PREFIXES,
    MMDIT_PREFIX,
    checkpoint_state_dict,
    encoder_state_dict,
    shipped_config,
)
from .tiny import _jitter

CLIP_WIDTH = {"l": 32, "g": 64}
T5_WIDTH = 128
WORDS = ("a photo of cat dog red blue green house tree sky sunset mountain river city night portrait "
         "painting beautiful landscape ocean forest flower car robot astronaut horse watercolor blurry "
         "ugly bad quality low best detailed").split()


def tiny_t5_tokenizer():
    """A T5Tokenizer over a small unigram vocabulary (T5's special ids, EOS appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>"] + ["\u2581" + w for w in WORDS] + ["\u2581"]
    pieces += list("abcdefghijklmnopqrstuvwxyz,.!")
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5Tokenizer(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def tiny_sd3_configs(*, sd35: bool = False) -> dict[str, dict]:
    """Configs of the tiny models: transformer, vae, l, g, t5."""
    from .detect import shipped_config as sdxl_config

    clips: dict[str, dict] = {}
    for kind, component in (("l", "text_encoder"), ("g", "text_encoder_2")):
        cfg = sdxl_config("sdxl", component)
        width = CLIP_WIDTH[kind]
        cfg.update(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                   num_attention_heads=max(1, width // 64) if width >= 64 else 1, projection_dim=width)
        clips[kind] = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    t5 = shipped_config("text_encoder_3")
    t5.update(vocab_size=len(tiny_t5_tokenizer()), d_model=T5_WIDTH, d_ff=2 * T5_WIDTH, num_layers=2,
              num_decoder_layers=2, num_heads=2, d_kv=T5_WIDTH // 2)
    t5 = {k: v for k, v in t5.items() if k not in ("architectures", "model_type")}
    tr = shipped_config("transformer")
    tr.pop("_class_name", None)
    tr.update(sample_size=32, num_layers=3 if sd35 else 2, num_attention_heads=2, attention_head_dim=64,
              joint_attention_dim=T5_WIDTH, caption_projection_dim=128,
              pooled_projection_dim=CLIP_WIDTH["l"] + CLIP_WIDTH["g"], pos_embed_max_size=16)
    if sd35:
        tr.update(dual_attention_layers=[0, 1], qk_norm="rms_norm")
    vae = shipped_config("vae")
    vae.pop("_class_name", None)
    vae.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    return {"transformer": tr, "vae": vae, **clips, "t5": t5}


def tiny_sd3_models(*, sd35: bool = False, seed: int = 0) -> dict[str, Any]:
    """In-memory tiny models (keys transformer, vae, l, g, t5), deterministic for a seed."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfgs = tiny_sd3_configs(sd35=sd35)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models: dict[str, Any] = {
            "transformer": SD3Transformer2DModel.from_config(cfgs["transformer"]),
            "vae": AutoencoderKL.from_config(cfgs["vae"]),
            "l": CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["l"])),
            "g": CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["g"])),
            "t5": T5EncoderModel(T5Config(**cfgs["t5"])),
        }
    for model in models.values():
        _jitter(model, gen)
        model.eval().requires_grad_(False)
    return models


def _save(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], dtype: torch.dtype | None) -> Path:
    from safetensors.torch import save_file

    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def fp8_storage(sd: dict[str, torch.Tensor], *, scaled: bool = False, prefixes: tuple[str, ...] = ("",)
                ) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8 storage: the 2-D weights under `prefixes` as float8_e4m3fn, cast as they are
    (`*_fp8_e4m3fn` files) or `scaled` (`*_fp8_scaled`: a per-tensor `.scale_weight` with the fp8 weight
    divided by it, and one `scaled_fp8` marker per prefix)."""
    out = dict(sd)
    fp8 = torch.float8_e4m3fn
    for k, v in sd.items():
        if not (k.startswith(prefixes) and k.endswith(".weight") and v.ndim == 2 and v.is_floating_point()):
            continue
        if scaled:
            scale = (v.float().abs().max() / torch.finfo(fp8).max).clamp(min=1e-12)
            out[k] = (v.float() / scale).to(fp8)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            out[k] = v.to(fp8)
    if scaled:
        out.update({p + "scaled_fp8": torch.zeros(0, dtype=fp8) for p in prefixes})
    return out


def write_tiny_sd3_checkpoint(path: str | Path, *, sd35: bool = False, seed: int = 0, with_encoders: bool = True,
                              with_t5: bool = True, dtype: torch.dtype | None = None, fp8: str | None = None) -> Path:
    """A single file in the original layout; `with_encoders=False` gives the transformer + VAE only
    (as sd3_medium.safetensors), `with_t5=False` the CLIP-only variant. `fp8="t5"` stores T5 as plain
    float8_e4m3fn (sd3_medium_incl_clips_t5xxlfp8), `fp8="scaled"` the MMDiT and the encoders in ComfyUI's
    fp8-scaled form (sd3.5_large_fp8_scaled); the rest is in `dtype`."""
    m = tiny_sd3_models(sd35=sd35, seed=seed)
    encoders = {k: m[k] for k in ("l", "g", "t5") if with_encoders and (k != "t5" or with_t5)}
    meta = {"sdflow.random_weights": "true",
            "modelspec.architecture": "stable-diffusion-v3-5-medium" if sd35 else "stable-diffusion-v3-medium",
            "modelspec.title": f"sdflow tiny {'sd35' if sd35 else 'sd3'} (random weights)"}
    sd = checkpoint_state_dict(m["transformer"], m["vae"], encoders)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if fp8 == "t5":
        sd = fp8_storage(sd, prefixes=(ENCODER_PREFIXES["t5"],))
    elif fp8 == "scaled":
        sd = fp8_storage(sd, scaled=True, prefixes=(MMDIT_PREFIX, *(ENCODER_PREFIXES[k] for k in encoders)))
    elif fp8 is not None:
        raise ValueError(f"fp8 must be None, 't5' or 'scaled', got {fp8!r}")
    return _save(sd, Path(path), meta, None)


def write_tiny_sd3_encoders(folder: str | Path, *, sd35: bool = False, seed: int = 0,
                            dtype: torch.dtype | None = None, fp8: str | None = None) -> dict[str, Path]:
    """Separate clip_l / clip_g / t5xxl files (transformers names), as text_encoders/ holds them;
    `fp8="fp8"` as t5xxl_fp8_e4m3fn.safetensors, `fp8="scaled"` as t5xxl_fp8_e4m3fn_scaled.safetensors."""
    if fp8 not in (None, "fp8", "scaled"):
        raise ValueError(f"fp8 must be None, 'fp8' or 'scaled', got {fp8!r}")
    m = tiny_sd3_models(sd35=sd35, seed=seed)
    folder = Path(folder)
    suffix = {None: "", torch.float16: "_fp16", torch.bfloat16: "_bf16"}.get(dtype, "")
    if fp8 is not None:
        suffix = "_fp8_e4m3fn" + ("_scaled" if fp8 == "scaled" else "")
    out = {}
    for kind in ("l", "g", "t5"):
        sd = encoder_state_dict(kind, m[kind])
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        if fp8 is not None:
            sd = fp8_storage(sd, scaled=fp8 == "scaled")
        out[kind] = _save(sd, folder / f"tiny_{ENCODER_NAMES[kind]}{suffix}.safetensors",
                          {"sdflow.random_weights": "true"}, None)
    return out


# SD3 ControlNets: "sd35" is shaped like Stability's SD3.5 Large ControlNets (no text stream, no patch
# embedding of its own, real pooled projections), "instantx" like InstantX's SD3 ControlNets (joint
# blocks with the text stream, own patch embedding, zero pooled projections).
def tiny_sd3_controlnet_config(kind: str = "sd35") -> dict[str, Any]:
    common = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2, "attention_head_dim": 64,
              "num_attention_heads": 2, "caption_projection_dim": 128,
              "pooled_projection_dim": CLIP_WIDTH["l"] + CLIP_WIDTH["g"]}
    if kind == "sd35":
        return {**common, "joint_attention_dim": None, "pos_embed_max_size": None, "pos_embed_type": None,
                "use_pos_embed": False, "force_zeros_for_pooled_projection": False}
    if kind == "instantx":
        return {**common, "sample_size": 32, "joint_attention_dim": T5_WIDTH, "pos_embed_max_size": 16,
                "force_zeros_for_pooled_projection": True}
    raise ValueError(f"unknown tiny SD3 ControlNet kind {kind!r}")


def tiny_sd3_controlnet(kind: str = "sd35", *, seed: int = 1) -> Any:
    """An in-memory tiny SD3ControlNetModel (its zero-initialised layers jittered too)."""
    from diffusers import SD3ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3ControlNetModel.from_config(tiny_sd3_controlnet_config(kind))
    _jitter(model, torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def write_tiny_sd3_controlnet(path: str | Path, *, kind: str = "sd35", layout: str = "stability", seed: int = 1,
                              control_type: int | None = None, dtype: torch.dtype | None = None) -> Path:
    """A tiny SD3 ControlNet as Stability ships them (`layout="stability"`, one file, optional
    `control_type`), as a diffusers folder (`"diffusers"`, config.json + weights) or as a bare file
    under diffusers names (`"diffusers_file"`)."""
    from .controlnet_sd3 import diffusers_to_stability

    model = tiny_sd3_controlnet(kind, seed=seed)
    path = Path(path)
    meta = {"sdflow.random_weights": "true"}
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if layout == "stability":
        return _save(diffusers_to_stability(sd, control_type), path, meta, dtype)
    if layout == "diffusers_file":
        return _save(sd, path, meta, dtype)
    if layout == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"_class_name": "SD3ControlNetModel", **dict(model.config)}),
                                          encoding="utf-8")
        _save(sd, path / "diffusion_pytorch_model.safetensors", meta, dtype)
        return path
    raise ValueError(f"unknown SD3 ControlNet layout {layout!r}")

"""Stable Diffusion 3 / 3.5 (MMDiT, MMDiT-X): single-file checkpoints and separate text-encoder files.

Layout of an original single file (as Stability and ComfyUI's templates distribute them):
`model.diffusion_model.*` (the MMDiT), `first_stage_model.*` (the 16-channel VAE, LDM names) and,
optionally, `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*` (transformers names). Separate
encoder files hold the same transformers names without the prefix.

The transformer config is read off the tensor shapes, so Medium, 3.5 Medium (MMDiT-X: dual
attention layers and q/k RMS norms) and Large load from one code path, as do the tiny test models;
the head width is 64 in every released model (not recoverable from weights). The original-to-
diffusers key mapping is diffusers' own (`convert_sd3_transformer_checkpoint_to_diffusers`);
`transformer_to_original` is its inverse, used to write checkpoints.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import detect, ldm_keys
from .checkpoint import _build_vae, _materialize, clip_file_state_dict
from .state_dict import ModelFileError, read_metadata, read_state_dict

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

CONFIG_DIR = Path(__file__).parent / "configs" / "sd3"
MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
ENCODER_PREFIXES = {
    "l": "text_encoders.clip_l.transformer.",
    "g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}
ENCODER_NAMES = {"l": "clip_l", "g": "clip_g", "t5": "t5xxl"}
HEAD_DIM = 64
T5_WIDTH = 4096  # T5-XXL's d_model: the released transformers' joint_attention_dim


@cache
def _shipped(component: str) -> dict:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((CONFIG_DIR / component / name).read_text(encoding="utf-8"))


def shipped_config(component: str) -> dict:
    """A fresh copy of a shipped SD3 config: `transformer`, `vae`, `scheduler`, `text_encoder_3`."""
    return copy.deepcopy(_shipped(component))


def is_sd3(sd: Mapping[str, Any]) -> bool:
    """An SD3-family single file (or bare MMDiT file, with or without the prefix)."""
    return any(p + "joint_blocks.0.x_block.attn.qkv.weight" in sd for p in (MMDIT_PREFIX, ""))


def is_sd3_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds an SD3 MMDiT (read from its header only)."""
    from .state_dict import _read_safetensors_header

    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    return is_sd3(_read_safetensors_header(path))


def _indices(keys, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


# ---------------------------------------------------------------------------- config inference

def infer_transformer_config(mmdit: Mapping[str, torch.Tensor]) -> dict:
    """SD3Transformer2DModel config from original MMDiT keys without prefix."""
    cfg = shipped_config("transformer")
    cfg.pop("_class_name", None)
    proj = mmdit["x_embedder.proj.weight"]
    hidden, in_ch, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[-1])
    layers = max(_indices(mmdit, r"joint_blocks\.(\d+)\.")) + 1
    pos = mmdit["pos_embed"]
    ctx = mmdit["context_embedder.weight"]
    cfg.update(
        patch_size=patch,
        in_channels=in_ch,
        num_layers=layers,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=max(1, hidden // HEAD_DIM),
        joint_attention_dim=int(ctx.shape[1]),
        caption_projection_dim=int(ctx.shape[0]),
        pooled_projection_dim=int(mmdit["y_embedder.mlp.0.weight"].shape[1]),
        out_channels=int(mmdit["final_layer.linear.weight"].shape[0]) // (patch * patch),
        pos_embed_max_size=round(int(pos.shape[1]) ** 0.5),
        dual_attention_layers=sorted(_indices(mmdit, r"joint_blocks\.(\d+)\.x_block\.attn2\.")),
        qk_norm="rms_norm" if any(".ln_q." in k for k in mmdit) else None,
    )
    if hidden % HEAD_DIM:
        raise ValueError(f"MMDiT width {hidden} is not a multiple of the head width {HEAD_DIM}")
    return cfg


def variant(config: Mapping[str, Any]) -> str:
    """"sd3" (Medium) or "sd35" (3.5 Medium / Large / Large Turbo: q/k norms)."""
    return "sd35" if config.get("qk_norm") else "sd3"


def infer_t5_config(sd: Mapping[str, torch.Tensor]) -> dict:
    cfg = shipped_config("text_encoder_3")
    shared = sd["shared.weight"]
    q = sd["encoder.block.0.layer.0.SelfAttention.q.weight"]
    heads = int(sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1])
    cfg.update(
        vocab_size=int(shared.shape[0]),
        d_model=int(shared.shape[1]),
        num_layers=len(_indices(sd, r"encoder\.block\.(\d+)\.")),
        num_heads=heads,
        d_kv=int(q.shape[0]) // heads,
        d_ff=int(sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]),
    )
    cfg["num_decoder_layers"] = cfg["num_layers"]
    return cfg


# ------------------------------------------------------------------------------- conversions

def transformer_from_original(mmdit: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit))  # it pops from its argument


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_original(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict under the original MMDiT names (no prefix)."""
    out: dict[str, torch.Tensor] = {
        "pos_embed": sd["pos_embed.pos_embed"],
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "context_embedder.weight": sd["context_embedder.weight"],
        "context_embedder.bias": sd["context_embedder.bias"],
        "final_layer.linear.weight": sd["proj_out.weight"],
        "final_layer.linear.bias": sd["proj_out.bias"],
        # diffusers' AdaLayerNormContinuous orders (scale, shift); the original (shift, scale)
        "final_layer.adaLN_modulation.1.weight": _swap_halves(sd["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": _swap_halves(sd["norm_out.linear.bias"]),
    }
    for src, dst in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        for n_src, n_dst in (("linear_1", "0"), ("linear_2", "2")):
            for p in ("weight", "bias"):
                out[f"{dst}.mlp.{n_dst}.{p}"] = sd[f"time_text_embed.{src}.{n_src}.{p}"]
    layers = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    for i in range(layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == layers - 1
        for p in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{c}.{p}"] for c in "qkv"])
            out[f"{o}context_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{c}_proj.{p}"] for c in "qkv"])
            out[f"{o}x_block.attn.proj.{p}"] = sd[f"{d}attn.to_out.0.{p}"]
            out[f"{o}x_block.adaLN_modulation.1.{p}"] = sd[f"{d}norm1.linear.{p}"]
            ctx_mod = sd[f"{d}norm1_context.linear.{p}"]
            out[f"{o}context_block.adaLN_modulation.1.{p}"] = _swap_halves(ctx_mod) if last else ctx_mod
            out[f"{o}x_block.mlp.fc1.{p}"] = sd[f"{d}ff.net.0.proj.{p}"]
            out[f"{o}x_block.mlp.fc2.{p}"] = sd[f"{d}ff.net.2.{p}"]
            if not last:
                out[f"{o}context_block.attn.proj.{p}"] = sd[f"{d}attn.to_add_out.{p}"]
                out[f"{o}context_block.mlp.fc1.{p}"] = sd[f"{d}ff_context.net.0.proj.{p}"]
                out[f"{o}context_block.mlp.fc2.{p}"] = sd[f"{d}ff_context.net.2.{p}"]
            if i in dual:
                out[f"{o}x_block.attn2.qkv.{p}"] = torch.cat([sd[f"{d}attn2.to_{c}.{p}"] for c in "qkv"])
                out[f"{o}x_block.attn2.proj.{p}"] = sd[f"{d}attn2.to_out.0.{p}"]
        if config.get("qk_norm"):
            out[f"{o}x_block.attn.ln_q.weight"] = sd[f"{d}attn.norm_q.weight"]
            out[f"{o}x_block.attn.ln_k.weight"] = sd[f"{d}attn.norm_k.weight"]
            out[f"{o}context_block.attn.ln_q.weight"] = sd[f"{d}attn.norm_added_q.weight"]
            out[f"{o}context_block.attn.ln_k.weight"] = sd[f"{d}attn.norm_added_k.weight"]
            if i in dual:
                out[f"{o}x_block.attn2.ln_q.weight"] = sd[f"{d}attn2.norm_q.weight"]
                out[f"{o}x_block.attn2.ln_k.weight"] = sd[f"{d}attn2.norm_k.weight"]
    return out


def dequantize_scaled(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo ComfyUI's "fp8 scaled" storage: `W.scale_weight` multiplies the fp8 `W.weight`; the
    `scaled_fp8` marker and per-input scales are dropped. Other float8 tensors are upcast as they are."""
    scales = {k[: -len(".scale_weight")]: v for k, v in sd.items() if k.endswith(".scale_weight")}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith((".scale_weight", ".scale_input")) or k.split(".")[-1] == "scaled_fp8":
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            v = v.to(torch.float32)
            if base is not None and base in scales:
                v = v * scales[base].to(torch.float32)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------ building

def _build_transformer(cfg: Mapping[str, Any], sd, dtype, path) -> SD3Transformer2DModel:
    from diffusers import SD3Transformer2DModel

    return _materialize(lambda: SD3Transformer2DModel.from_config(dict(cfg)), sd, dtype, path, "MMDiT")


def build_clip(sd: Mapping[str, torch.Tensor], kind: str, dtype, path: Path) -> CLIPTextModelWithProjection:
    """CLIP-L or OpenCLIP-G with its projection (SD3 pools from both); a file without the
    projection gets the identity (as CLIP-L files often ship)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sd = dict(sd)
    hidden = int(sd["text_model.embeddings.token_embedding.weight"].shape[1])
    if "text_projection.weight" not in sd:
        sd["text_projection.weight"] = torch.eye(hidden)
    cfg = detect.infer_clip_config(sd, "sdxl", kind)
    kwargs = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    return _materialize(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**kwargs)), sd, dtype, path,
                        f"text encoder {ENCODER_NAMES[kind]!r}")


def build_t5(sd: Mapping[str, torch.Tensor], dtype, path: Path) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    sd = dict(sd)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    cfg = infer_t5_config(sd)
    kwargs = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    return _materialize(lambda: T5EncoderModel(T5Config(**kwargs)), sd, dtype, path, "text encoder 't5xxl'")


def _vae_from_ldm(vae_ldm: Mapping[str, torch.Tensor], dtype, path: Path) -> AutoencoderKL:
    levels = detect.count_vae_levels_ldm(vae_ldm)
    layout = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    diff = ldm_keys.vae_ldm_to_diffusers(vae_ldm, layout)
    cfg = detect.infer_vae_config(diff, "sdxl")
    shipped = shipped_config("vae")
    cfg.update(scaling_factor=shipped["scaling_factor"], shift_factor=shipped["shift_factor"], force_upcast=True)
    return _build_vae(cfg, diff, dtype, path)


def encoder_kind(sd: Mapping[str, torch.Tensor]) -> str | None:
    """"l", "g" or "t5" for a separate text-encoder file (transformers names), None if none of them."""
    if "shared.weight" in sd or "encoder.block.0.layer.0.SelfAttention.q.weight" in sd:
        return "t5"
    tok = sd.get("text_model.embeddings.token_embedding.weight")
    if tok is None:
        return None
    width = int(tok.shape[1])
    # Real widths: CLIP-L 768, OpenCLIP-G 1280. The tiny test encoders follow the same order
    # (L narrower than 64, G at least 64; see tiny_sd3.py).
    return "l" if width == 768 or width < 64 else "g"


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_text_encoder_file(path: str | Path, expect: str | None = None, *, dtype: torch.dtype = torch.float32):
    """A separate clip_l / clip_g / t5xxl file (fp16, bf16, fp8 or fp8-scaled), as (kind, model).

    `expect` ("l", "g", "t5") makes a file of another kind an error that names both."""
    path = Path(path)
    sd = dequantize_scaled(read_state_dict(path))
    for prefix in (*ENCODER_PREFIXES.values(), "transformer.", "text_encoders.clip_l.", "text_encoders.clip_g."):
        if any(k.startswith(prefix) for k in sd):
            sd = _strip(sd, prefix)
            break
    kind = encoder_kind(sd)
    if kind is None:
        raise ModelFileError(path, "not a CLIP-L, CLIP-G or T5-XXL text encoder file")
    if expect is not None and kind != expect:
        raise ModelFileError(
            path, f"expected a {ENCODER_NAMES[expect]} text encoder, the file holds {ENCODER_NAMES[kind]}")
    bad = sorted({str(v.dtype) for v in sd.values() if not v.is_floating_point() and v.ndim > 1})
    if bad:
        raise ModelFileError(path, f"{ENCODER_NAMES[kind]} weights stored as {', '.join(bad)}; expected float "
                                   "(fp32, fp16, bf16 or fp8)")
    try:
        model = build_t5(sd, dtype, path) if kind == "t5" else build_clip(sd, kind, dtype, path)
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise ModelFileError(path, f"unrecognised {ENCODER_NAMES[kind]} layout: {type(e).__name__}: {e}") from None
    return kind, model


@dataclass
class SD3Checkpoint:
    variant: str  # "sd3" | "sd35"
    transformer: SD3Transformer2DModel | None
    vae: AutoencoderKL | None
    text_encoders: dict[str, Any]  # "l", "g", "t5" (those the file holds)
    source: Path
    transformer_config: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    arch: str = "sd3"

    @property
    def random_weights(self) -> bool:
        return self.metadata.get("sdflow.random_weights") == "true"


def load_sd3_checkpoint(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    load_transformer: bool = True,
    load_vae: bool = True,
    load_clip: bool = True,
    require_clip: bool = False,
) -> SD3Checkpoint:
    """An SD3 / SD3.5 single file. Text encoders are loaded when present (all three when
    `require_clip`: a file without them is then an error that points at TripleCLIPLoader)."""
    path = Path(path)
    sd = dequantize_scaled(read_state_dict(path))
    metadata = read_metadata(path)
    if not is_sd3(sd):
        raise ModelFileError(path, "not a Stable Diffusion 3 checkpoint: no MMDiT keys")
    mmdit = _strip(sd, MMDIT_PREFIX) if any(k.startswith(MMDIT_PREFIX) for k in sd) else dict(sd)
    try:
        cfg = infer_transformer_config(mmdit)
        transformer = None
        if load_transformer:
            transformer = _build_transformer(cfg, transformer_from_original(mmdit), dtype, path)
        del mmdit
        vae = None
        if load_vae:
            vae_ldm = {k: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
            if not vae_ldm:
                raise ModelFileError(path, f"checkpoint has no VAE ({VAE_PREFIX}*)")
            vae = _vae_from_ldm(vae_ldm, vae_dtype or dtype, path)
        encoders: dict[str, Any] = {}
        if load_clip:
            for kind, prefix in ENCODER_PREFIXES.items():
                part = _strip(sd, prefix)
                if part:
                    encoders[kind] = (build_t5(part, dtype, path) if kind == "t5"
                                      else build_clip(part, kind, dtype, path))
            missing = [ENCODER_NAMES[k] for k in ("l", "g") if k not in encoders]
            if require_clip and missing:
                raise ModelFileError(
                    path, f"this SD3 checkpoint has no text encoders ({', '.join(missing)} missing): load them with "
                          "TripleCLIPLoader (clip_l, clip_g, t5xxl) and connect its CLIP output instead")
    except (KeyError, ValueError, StopIteration, IndexError, TypeError, AttributeError, RuntimeError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(path, f"unrecognised SD3 checkpoint layout: {type(e).__name__}: {e}") from None
    return SD3Checkpoint(variant=variant(cfg), transformer=transformer, vae=vae, text_encoders=encoders,
                         source=path, transformer_config=cfg, metadata=metadata)


def checkpoint_state_dict(transformer, vae, text_encoders: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Models as one single file in the original layout (the inverse of load_sd3_checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    if transformer is not None:
        for k, v in transformer_to_original(transformer.state_dict(), transformer.config).items():
            out[MMDIT_PREFIX + k] = v
    if vae is not None:
        for k, v in ldm_keys.vae_diffusers_to_ldm(vae.state_dict(), vae.config).items():
            out[VAE_PREFIX + k] = v
    for kind, model in text_encoders.items():
        out.update({ENCODER_PREFIXES[kind] + k: v for k, v in encoder_state_dict(kind, model).items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


def encoder_state_dict(kind: str, model: Any) -> dict[str, torch.Tensor]:
    """A text encoder's tensors as its separate file holds them (transformers names)."""
    if kind == "t5":
        return {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return clip_file_state_dict(model)

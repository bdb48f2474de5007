"""Loading Stable Diffusion checkpoints (single files in the LDM layout, diffusers folders, VAEs).

Everything is local: configs come from nodes/models/configs (adjusted to the tensor shapes, see
detect.py) and tokenizers from nodes/models/tokenizer; nothing is fetched from a hub.
Models are built on the meta device and the checkpoint tensors are assigned into them, so a
full-size model is never randomly initialised first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from . import detect, ldm_keys
from .detect import CLIP_COMPONENTS, CLIP_LOCATIONS, VAE_PREFIX
from .state_dict import ModelFileError, read_metadata, read_state_dict
from .tokenizer import load_tokenizer

# diffusers and transformers take seconds to import; they are imported where models are built,
# so that starting the server (which imports every node module) does not pay for them.
if TYPE_CHECKING:
    # The defining modules: type checkers read diffusers' top-level names as its no-torch placeholders.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    TextEncoder = CLIPTextModel | CLIPTextModelWithProjection

__all__ = [
    "CLIP_LAYER_DEFAULTS",
    "ClipLayer",
    "LoadedCheckpoint",
    "ModelFileError",
    "checkpoint_to_ldm_state_dict",
    "clip_file_state_dict",
    "load_checkpoint",
    "load_diffusers_folder",
    "load_tokenizer",
    "load_vae_file",
]


@dataclass(frozen=True)
class ClipLayer:
    """Which text-encoder output an architecture conditions on.

    `index` indexes `hidden_states` of the transformers output (-1: last layer, -2: penultimate);
    `final_norm` says whether the final layer norm is applied to it.
    """

    index: int
    final_norm: bool


# SD1 uses the normed last layer; SD2 the normed penultimate one; SDXL concatenates the
# penultimate layers of both encoders without the final norm (and pools from G's projection).
CLIP_LAYER_DEFAULTS: dict[str, dict[str, ClipLayer]] = {
    "sd1": {"l": ClipLayer(-1, True)},
    "sd2": {"h": ClipLayer(-2, True)},
    "sdxl": {"l": ClipLayer(-2, False), "g": ClipLayer(-2, False)},
    "sdxl_refiner": {"g": ClipLayer(-2, False)},
}


@dataclass
class LoadedCheckpoint:
    arch: str  # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    prediction_type: str  # "epsilon" | "v_prediction"
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    # keys: "l" (SD1 / SDXL CLIP-L), "h" (SD2 OpenCLIP-H), "g" (SDXL OpenCLIP-G)
    text_encoders: dict[str, TextEncoder]
    tokenizers: dict[str, CLIPTokenizer]
    source: Path
    scheduler_config: dict = field(default_factory=dict)  # diffusers scheduler config, prediction_type set
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    clip_layers: dict[str, ClipLayer] = field(default_factory=dict)  # see ClipLayer
    # SD2.1 unCLIP parts: "noise_augmentor" (data_mean, data_std), each [1, D]; "clip_vision", the image
    # embedder's tower as a transformers-layout state dict (loaded only when asked for)
    extras: dict = field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        return self.metadata.get("sdflow.random_weights") == "true"


# ----------------------------------------------------------------------------------- building

def _own_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast floats to `dtype`; copy tensors that still point into a file buffer.

    safetensors hands out views of its read buffer that are not SIMD-aligned; besides pinning
    the buffer, that makes CPU kernels take other code paths (results differ in the last bit
    from a model built in memory). A fresh allocation is aligned.
    """
    target = dtype if t.is_floating_point() else t.dtype
    if t.dtype != target or t.data_ptr() % 64 != 0:
        return t.to(target, copy=True).contiguous()
    return t


M = TypeVar("M", bound=torch.nn.Module)


def _materialize(
    factory: Callable[[], M],
    sd: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    path: Path,
    what: str,
    adapt: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
) -> M:
    """Build `factory()` on the meta device and move the given tensors into it."""
    with torch.device("meta"):
        model = factory()
    if adapt is not None:
        sd = adapt(model, sd)
    cast = {k: _own_tensor(v, dtype) for k, v in sd.items() if v is not None}
    try:
        result = model.load_state_dict(cast, strict=False, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ModelFileError(path, f"{what} weights do not fit the inferred architecture: {first}") from None
    if result.missing_keys:
        raise ModelFileError(
            path,
            f"{what} weights incomplete: {len(result.missing_keys)} tensors missing, e.g. {result.missing_keys[0]!r}",
        )
    # Non-persistent buffers are never in a state dict; rebuild the ones these models have.
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if buf_name == "position_ids":
                module.register_buffer(
                    buf_name, torch.arange(buf.shape[-1]).expand(buf.shape).contiguous(), persistent=False
                )
            else:
                raise ModelFileError(path, f"{what}: buffer {mod_name}.{buf_name} was not provided")
    model.eval().requires_grad_(False)
    return model


def _build_unet(config: Mapping, sd, dtype, path) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return _materialize(lambda: UNet2DConditionModel.from_config(dict(config)), sd, dtype, path, "UNet")


def _build_vae(config: Mapping, sd, dtype, path) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return _materialize(lambda: AutoencoderKL.from_config(dict(config)), sd, dtype, path, "VAE")


def _build_clip(config: Mapping, sd, dtype, path, kind: str) -> TextEncoder:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    cls = CLIPTextModelWithProjection if "text_projection.weight" in sd else CLIPTextModel
    return _materialize(
        lambda: cls(CLIPTextConfig(**cfg)), sd, dtype, path, f"text encoder {kind!r}", adapt=_clip_sd_for_model
    )


# Checkpoint files name CLIP tensors "text_model.*"; transformers 5's CLIPTextModel has no
# `text_model` level (CLIPTextModelWithProjection and older versions do).
def _clip_sd_for_model(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if hasattr(model, "text_model"):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def clip_file_state_dict(model: TextEncoder) -> dict[str, torch.Tensor]:
    """A text encoder's tensors under the file-format names ("text_model.*", "text_projection.weight")."""
    sd = model.state_dict()
    if hasattr(model, "text_model"):
        return dict(sd)
    return {"text_model." + k: v for k, v in sd.items()}


def scheduler_config(arch: str, prediction_type: str) -> dict:
    """The shipped diffusers scheduler config of `arch`, with its prediction type."""
    cfg = detect.shipped_config(arch, "scheduler")
    cfg["prediction_type"] = prediction_type
    return cfg


# --------------------------------------------------------------------------- single-file load

UNCLIP_STATS = ("noise_augmentor.data_mean", "noise_augmentor.data_std")
UNCLIP_VISION_PREFIX = "embedder.model.visual."


def load_checkpoint(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    load_unet: bool = True,
    load_vae: bool = True,
    load_clip: bool = True,
    load_clip_vision: bool = False,
) -> LoadedCheckpoint:
    """Load an SD1/SD2/SDXL (base or refiner) single-file checkpoint in the original LDM key layout.

    Floating tensors are cast to `dtype`, the VAE's to `vae_dtype` (default: `dtype`)."""
    path = Path(path)
    sd = read_state_dict(path)
    metadata = read_metadata(path)
    arch = detect.detect_arch(sd)
    if arch is None:
        raise ModelFileError(path, "not a Stable Diffusion checkpoint: no UNet keys")
    prediction_type = detect.detect_prediction_type(sd, metadata, arch)

    # Text encoders first: SDXL's pooled width is needed to size the UNet's extra embedding.
    clip_sds: dict[str, dict[str, torch.Tensor]] = {}
    for kind, (prefix, layout) in CLIP_LOCATIONS[arch].items():
        converted = ldm_keys.hf_clip_from_ldm(sd, prefix) if layout == "hf" else ldm_keys.openclip_to_hf(sd, prefix)
        if converted:
            clip_sds[kind] = converted
    pooled_dim = None
    if "g" in clip_sds and "text_projection.weight" in clip_sds["g"]:
        pooled_dim = int(clip_sds["g"]["text_projection.weight"].shape[0])

    unet = vae = None
    text_encoders: dict[str, TextEncoder] = {}
    try:
        if load_unet:
            unet_ldm = {k[len(ldm_keys.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(ldm_keys.UNET_PREFIX)}
            unet_cfg = detect.infer_unet_config(unet_ldm, arch, pooled_dim=pooled_dim)
            unet = _build_unet(unet_cfg, ldm_keys.unet_ldm_to_diffusers(unet_ldm, unet_cfg), dtype, path)
            del unet_ldm
        if load_vae:
            vae_ldm = {k: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
            if not vae_ldm:
                raise ModelFileError(path, f"checkpoint has no VAE ({VAE_PREFIX}*)")
            vae = _vae_from_ldm(vae_ldm, arch, vae_dtype or dtype, path)
        if load_clip:
            for kind, (prefix, _) in CLIP_LOCATIONS[arch].items():
                if kind not in clip_sds:
                    raise ModelFileError(path, f"checkpoint has no text encoder {kind!r} ({prefix}*)")
                cfg = detect.infer_clip_config(clip_sds[kind], arch, kind)
                text_encoders[kind] = _build_clip(cfg, clip_sds[kind], dtype, path, kind)
    except (KeyError, ValueError, StopIteration, IndexError, TypeError, AttributeError, RuntimeError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(path, f"unrecognised {arch} checkpoint layout: {type(e).__name__}: {e}") from None

    extras: dict = {}
    if UNCLIP_STATS[0] in sd and UNCLIP_STATS[1] in sd:
        extras["noise_augmentor"] = (sd[UNCLIP_STATS[0]].float(), sd[UNCLIP_STATS[1]].float())
    if load_clip_vision:
        from .clip_vision import to_hf_layout

        vision = to_hf_layout(sd)
        if vision is not None:
            extras["clip_vision"] = vision
    return LoadedCheckpoint(
        arch=arch,
        prediction_type=prediction_type,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers={kind: load_tokenizer(kind) for kind in text_encoders} if load_clip else {},
        source=path,
        scheduler_config=scheduler_config(arch, prediction_type),
        metadata=metadata,
        clip_layers=dict(CLIP_LAYER_DEFAULTS[arch]),
        extras=extras,
    )


def _vae_from_ldm(vae_ldm: Mapping[str, torch.Tensor], arch: str, dtype, path: Path) -> AutoencoderKL:
    levels = detect.count_vae_levels_ldm(vae_ldm)
    layout = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    diff = ldm_keys.vae_ldm_to_diffusers(vae_ldm, layout)
    cfg = detect.infer_vae_config(diff, arch)
    return _build_vae(cfg, diff, dtype, path)


def load_vae_file(path: str | Path, *, arch: str = "sd1", dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A standalone VAE file: LDM layout (`first_stage_model.` prefix optional) or diffusers layout.

    `arch` only picks the values weights cannot tell (the latent scaling factor: SDXL differs).
    """
    path = Path(path)
    sd = read_state_dict(path)
    try:
        if ldm_keys.is_diffusers_vae(sd):
            diff = {k.removeprefix("vae."): v for k, v in sd.items()}
            return _build_vae(detect.infer_vae_config(diff, arch), diff, dtype, path)
        if ldm_keys.is_ldm_vae(sd):
            return _vae_from_ldm(sd, arch, dtype, path)
    except (KeyError, ValueError, StopIteration, IndexError, TypeError, AttributeError, RuntimeError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(path, f"unrecognised VAE layout: {type(e).__name__}: {e}") from None
    raise ModelFileError(path, "not a VAE: no encoder/decoder keys")


# ------------------------------------------------------------------------------ diffusers folder

def _folder_arch(path: Path) -> str:
    unet_cfg_path = path / "unet" / "config.json"
    try:
        cfg = json.loads(unet_cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(path, "diffusers folder has no unet/config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileError(unet_cfg_path, "not valid JSON") from None
    if cfg.get("addition_embed_type") == "text_time":
        # the refiner pipeline has only text_encoder_2 (OpenCLIP-G)
        return "sdxl" if (path / "text_encoder").is_dir() else "sdxl_refiner"
    return "sd2" if cfg.get("use_linear_projection") else "sd1"


_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _strip_meta(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _read_component(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and all weights of one pipeline component folder (plain, fp16 variant or sharded)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(folder, "component folder has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileError(cfg_path, "not valid JSON") from None
    for variant in ("", ".fp16"):
        for ext in (".safetensors", ".bin"):
            for name in _WEIGHT_NAMES:
                single = folder / f"{name}{variant}{ext}"
                if single.is_file():
                    return cfg, read_state_dict(single)
                index = folder / f"{name}{variant}{ext}.index.json"
                if index.is_file():
                    try:
                        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                    except (json.JSONDecodeError, KeyError, AttributeError, UnicodeDecodeError):
                        raise ModelFileError(index, "bad shard index") from None
                    sd: dict[str, torch.Tensor] = {}
                    for shard in shards:
                        sd.update(read_state_dict(folder / shard))
                    return cfg, sd
    raise ModelFileError(folder, "component folder has no weights file")


def load_diffusers_folder(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    load_unet: bool = True,
    load_vae: bool = True,
    load_clip: bool = True,
) -> LoadedCheckpoint:
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/...), local files only.

    Tokenizers always come from the shipped files (every SD pipeline uses the same vocabulary).
    Weights are read directly (no hub code path) and assigned into meta-built models.
    Floating tensors are cast to `dtype`, the VAE's to `vae_dtype` (default: `dtype`).
    """
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelFileError(path, "not a diffusers pipeline folder: no model_index.json")
    arch = _folder_arch(path)
    sched_path = path / "scheduler" / "scheduler_config.json"
    sched = detect.shipped_config(arch, "scheduler")
    if sched_path.is_file():
        sched = json.loads(sched_path.read_text(encoding="utf-8"))
    prediction_type = "v_prediction" if sched.get("prediction_type") == "v_prediction" else "epsilon"
    sched["prediction_type"] = prediction_type

    unet = vae = None
    if load_unet:
        cfg, sd = _read_component(path / "unet")
        unet = _build_unet(_strip_meta(cfg), sd, dtype, path / "unet")
    if load_vae:
        cfg, sd = _read_component(path / "vae")
        vae = _build_vae(_strip_meta(cfg), sd, vae_dtype or dtype, path / "vae")
    text_encoders: dict[str, TextEncoder] = {}
    clip_layers = dict(CLIP_LAYER_DEFAULTS[arch])
    if load_clip:
        for kind, sub in CLIP_COMPONENTS[arch].items():
            cfg, sd = _read_component(path / sub)
            try:
                # transformers files name the projection "text_projection.weight" for both classes.
                if "CLIPTextModelWithProjection" in cfg.get("architectures", []) and not any(
                    k.startswith("text_model.") for k in sd
                ):
                    sd = {k if k.startswith("text_projection") else "text_model." + k: v for k, v in sd.items()}
                text_encoders[kind] = _build_clip(cfg, sd, dtype, path / sub, kind)
            except TypeError as e:
                raise ModelFileError(path / sub, f"bad text encoder config: {e}") from None
        # diffusers' SD2 folders drop OpenCLIP-H's last layer; its "penultimate" is then the last one.
        h = text_encoders.get("h")
        if h is not None and h.config.num_hidden_layers == 23:
            clip_layers["h"] = ClipLayer(-1, True)
    return LoadedCheckpoint(
        arch=arch,
        prediction_type=prediction_type,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers={kind: load_tokenizer(kind) for kind in text_encoders},
        source=path,
        scheduler_config=sched,
        metadata={},
        clip_layers=clip_layers,
    )


# ------------------------------------------------------------------------------------- writing

def checkpoint_to_ldm_state_dict(ckpt: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The models of `ckpt` as one single-file state dict in the original LDM layout."""
    out: dict[str, torch.Tensor] = {}
    if ckpt.unet is not None:
        for k, v in ldm_keys.unet_diffusers_to_ldm(ckpt.unet.state_dict(), ckpt.unet.config).items():
            out[ldm_keys.UNET_PREFIX + k] = v
    if ckpt.vae is not None:
        for k, v in ldm_keys.vae_diffusers_to_ldm(ckpt.vae.state_dict(), ckpt.vae.config).items():
            out[VAE_PREFIX + k] = v
    for kind, model in ckpt.text_encoders.items():
        prefix, layout = CLIP_LOCATIONS[ckpt.arch][kind]
        sd = clip_file_state_dict(model)
        out.update(ldm_keys.hf_clip_to_ldm(sd, prefix) if layout == "hf" else ldm_keys.hf_to_openclip(sd, prefix))
    if "noise_augmentor" in ckpt.extras:
        out[UNCLIP_STATS[0]], out[UNCLIP_STATS[1]] = ckpt.extras["noise_augmentor"]
    if "clip_vision" in ckpt.extras:
        from .clip_vision import hf_vision_to_openclip

        out.update(hf_vision_to_openclip(ckpt.extras["clip_vision"], UNCLIP_VISION_PREFIX))
    return {k: v.detach().contiguous() for k, v in out.items()}

"""Loader nodes: checkpoints (single-file or diffusers folders) and standalone VAEs.

A loaded model is an ordinary cache entry: loading the same file again is a cache hit, and under memory
pressure the cache moves it to CPU rather than dropping it, so switching checkpoints does not re-read
files. A changed file (size or modification time) is loaded again.
"""
from __future__ import annotations

from typing import Annotated, Any, NamedTuple, TypeAlias

from engine.inputs import Combo, Socket
from engine.node import node

from .models.checkpoint import load_checkpoint, load_diffusers_folder, load_vae_file
from .models.clip_vision import ClipVisionHandle, clip_vision_from_state_dict, load_clip_vision_file
from .models.diffusion_model import DiffusionModelHandle
from .models.memory import compute_dtype, default_device
from .models.sd3 import is_sd3_file
from .models.state_dict import ModelFileError
from .models.text_encoder import ClipHandle
from .models.unet_file import WEIGHT_DTYPES, load_unet_file
from .models.vae import VaeHandle
from .runtime import model_file_exists, model_file_fingerprint, model_files, runtime
from .types import Clip, ClipVision as ClipVisionT, Model, Vae


def _dtypes() -> dict:
    """Load dtypes for the device the handles compute on: half precision on CUDA, except the VAE
    (see memory.compute_dtype); float32 on the CPU."""
    device = default_device()
    return {"dtype": compute_dtype(device), "vae_dtype": compute_dtype(device, vae=True)}


def _handles(ckpt, embedding_dirs) -> tuple[DiffusionModelHandle, ClipHandle, VaeHandle]:
    return (DiffusionModelHandle.from_checkpoint(ckpt),
            ClipHandle.from_checkpoint(ckpt, embedding_dirs=embedding_dirs),
            VaeHandle(ckpt.vae))


@node("CheckpointLoaderSimple", category="loaders", display_name="Load Checkpoint",
      fingerprint=model_file_fingerprint("checkpoints", "ckpt_name"),
      validate=model_file_exists("checkpoints", "ckpt_name", "checkpoint"))
def checkpoint_loader_simple(
        ckpt_name: Annotated[str, Combo(model_files("checkpoints"), tooltip="The checkpoint (model) to load.")],
) -> tuple[Model, Clip, Vae]:
    """Loads a diffusion model checkpoint; diffusion models denoise latents."""
    rt = runtime()
    path = rt.folders.require("checkpoints", ckpt_name)
    if is_sd3_file(path):
        from .sd3_nodes import load_sd3_handles
        return load_sd3_handles(path, ckpt_name, _dtypes(), rt.folders.paths("embeddings"))
    ckpt = load_checkpoint(path, **_dtypes())
    return _handles(ckpt, rt.folders.paths("embeddings"))


@node("DiffusersLoader", category="advanced/loaders", display_name="Load Diffusers Model",
      fingerprint=model_file_fingerprint("diffusers", "model_path"),
      validate=model_file_exists("diffusers", "model_path", "diffusers folder"))
def diffusers_loader(model_path: Annotated[str, Combo(model_files("diffusers"))]) -> tuple[Model, Clip, Vae]:
    """Loads a model stored as a diffusers folder (model_index.json, unet/, vae/, text_encoder/...)."""
    rt = runtime()
    ckpt = load_diffusers_folder(rt.folders.require("diffusers", model_path), **_dtypes())
    return _handles(ckpt, rt.folders.paths("embeddings"))


@node("VAELoader", category="loaders", display_name="Load VAE",
      fingerprint=model_file_fingerprint("vae", "vae_name"), validate=model_file_exists("vae", "vae_name", "VAE"))
def vae_loader(vae_name: Annotated[str, Combo(model_files("vae"))]) -> Vae:
    """Loads a standalone VAE file (original or diffusers key layout)."""
    return VaeHandle(load_vae_file(runtime().folders.require("vae", vae_name),
                                   dtype=compute_dtype(default_device(), vae=True)))


# ---- loaders ComfyUI's front end looks up in /object_info (its model-to-node registry) -------------

ClipVision: TypeAlias = Annotated[Any, Socket("CLIP_VISION")]
StyleModel: TypeAlias = Annotated[Any, Socket("STYLE_MODEL")]
Gligen: TypeAlias = Annotated[Any, Socket("GLIGEN")]


class UnsupportedModelError(AttributeError, NotImplementedError):
    """An AttributeError too, so generic probes (hasattr, getattr with a default: the cache's memory
    accounting) see a plain object, while a consumer that uses it gets the reason."""


class UnsupportedModel:
    """Stands on a socket whose model type sdflow cannot run yet; any consumer that touches it fails
    with the reason instead of a confusing attribute error."""

    def __init__(self, what: str, source: str) -> None:
        self._what, self._source = what, source

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise UnsupportedModelError(f"{self._what} (from {self._source}) is not supported by sdflow yet")

    def __repr__(self) -> str:
        return f"<unsupported {self._what} from {self._source}>"


class MissingModel(UnsupportedModel):
    """Stands on a socket whose model the loaded file does not hold; a consumer gets `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__("missing model", reason)
        self._reason = reason

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise UnsupportedModelError(self._reason)


@node("UNETLoader", category="advanced/loaders", display_name="Load Diffusion Model",
      fingerprint=model_file_fingerprint("diffusion_models", "unet_name"),
      validate=model_file_exists("diffusion_models", "unet_name", "diffusion model"))
def unet_loader(unet_name: Annotated[str, Combo(model_files("diffusion_models"))],
                weight_dtype: Annotated[str, Combo(list(WEIGHT_DTYPES))]) -> Model:
    """Loads a bare diffusion model (UNet) file, in the original or the diffusers key layout."""
    unet, arch, prediction = load_unet_file(runtime().folders.require("diffusion_models", unet_name),
                                            weight_dtype=weight_dtype, dtype=_dtypes()["dtype"])
    return DiffusionModelHandle(unet, arch, prediction)


class ImageOnlyCheckpoint(NamedTuple):
    MODEL: Model
    CLIP_VISION: ClipVision
    VAE: Vae


@node("ImageOnlyCheckpointLoader", category="loaders/video_models",
      display_name="Image Only Checkpoint Loader (img2vid model)",
      fingerprint=model_file_fingerprint("checkpoints", "ckpt_name"),
      validate=model_file_exists("checkpoints", "ckpt_name", "checkpoint"))
def image_only_checkpoint_loader(ckpt_name: Annotated[str, Combo(model_files("checkpoints"))]) -> ImageOnlyCheckpoint:
    """Loads the diffusion model, the CLIP vision image encoder and the VAE of an image-conditioned
    checkpoint (SVD-style `conditioner.embedders.0.open_clip.model.visual.*`, unCLIP-style
    `embedder.model.visual.*`). A checkpoint without a vision tower still gives MODEL and VAE; its
    CLIP_VISION output fails with the reason when used, as ComfyUI's loader then gives none."""
    rt = runtime()
    path = rt.folders.require("checkpoints", ckpt_name)
    ckpt = load_checkpoint(path, load_clip=False, load_clip_vision=True, **_dtypes())
    assert ckpt.vae is not None  # a full checkpoint always carries its VAE
    vision_sd = ckpt.extras.pop("clip_vision", None)
    vision: Any  # a ClipVisionHandle, or the stand-in that gives the reason there is none
    if vision_sd is None:
        vision = MissingModel(f"ImageOnlyCheckpointLoader input ckpt_name {ckpt_name!r}: the checkpoint holds "
                              "no CLIP vision tower (no conditioner.embedders.0.open_clip.model.visual.* or "
                              "embedder.model.visual.* keys), so its CLIP_VISION output is empty; load one "
                              "with CLIPVisionLoader")
    else:
        try:
            vision = ClipVisionHandle(clip_vision_from_state_dict(vision_sd, path, _dtypes()["dtype"]), name=ckpt_name)
        except ModelFileError as e:
            raise ModelFileError(path, f"ImageOnlyCheckpointLoader input ckpt_name {ckpt_name!r}: {e.reason}") from None
    return ImageOnlyCheckpoint(DiffusionModelHandle.from_checkpoint(ckpt), vision, VaeHandle(ckpt.vae))


@node("StyleModelLoader", category="loaders", display_name="Load Style Model",
      fingerprint=model_file_fingerprint("style_models", "style_model_name"),
      validate=model_file_exists("style_models", "style_model_name", "style model"))
def style_model_loader(style_model_name: Annotated[str, Combo(model_files("style_models"))]) -> StyleModel:
    """Loads a T2I-Adapter style model (image prompts as extra conditioning tokens)."""
    from .models.style_model import load_style_model

    path = runtime().folders.require("style_models", style_model_name)
    try:
        return load_style_model(path)
    except ModelFileError as e:
        raise ModelFileError(path, f"StyleModelLoader input style_model_name {style_model_name!r}: {e.reason}; "
                                   "expected a T2I-Adapter style model (t2iadapter_style)") from None


@node("GLIGENLoader", category="loaders", display_name="Load GLIGEN",
      fingerprint=model_file_fingerprint("gligen", "gligen_name"),
      validate=model_file_exists("gligen", "gligen_name", "GLIGEN model"))
def gligen_loader(gligen_name: Annotated[str, Combo(model_files("gligen"))]) -> Gligen:
    """Loads a GLIGEN text-box grounding model (original GLIGEN key layout, e.g. gligen_sd14_textbox_pruned)."""
    from .models.gligen import load_gligen

    path = runtime().folders.require("gligen", gligen_name)
    try:
        return load_gligen(path)
    except ModelFileError as e:
        raise ModelFileError(path, f"GLIGENLoader input gligen_name {gligen_name!r}: {e.reason}") from None


@node("CLIPVisionLoader", category="loaders", display_name="Load CLIP Vision",
      fingerprint=model_file_fingerprint("clip_vision", "clip_name"),
      validate=model_file_exists("clip_vision", "clip_name", "CLIP vision model"))
def clip_vision_loader(clip_name: Annotated[str, Combo(model_files("clip_vision"))]) -> ClipVisionT:
    """Loads a CLIP vision model (CLIP ViT-L, OpenCLIP ViT-H or ViT-bigG; transformers or OpenCLIP layout)."""
    path = runtime().folders.require("clip_vision", clip_name)
    try:
        model = load_clip_vision_file(path, dtype=_dtypes()["dtype"])
    except ModelFileError as e:
        raise ModelFileError(path, f"CLIPVisionLoader input clip_name {clip_name!r}: {e.reason}") from None
    return ClipVisionHandle(model, name=clip_name)


class UnclipCheckpoint(NamedTuple):
    MODEL: Model
    CLIP: Clip
    VAE: Vae
    CLIP_VISION: ClipVisionT


@node("unCLIPCheckpointLoader", category="loaders",
      fingerprint=model_file_fingerprint("checkpoints", "ckpt_name"),
      validate=model_file_exists("checkpoints", "ckpt_name", "checkpoint"))
def unclip_checkpoint_loader(ckpt_name: Annotated[str, Combo(model_files("checkpoints"))]) -> UnclipCheckpoint:
    """Loads an unCLIP checkpoint (SD2.1 unCLIP): the models plus its CLIP vision image embedder."""
    rt = runtime()
    path = rt.folders.require("checkpoints", ckpt_name)
    ckpt = load_checkpoint(path, load_clip_vision=True, **_dtypes())
    vision = ckpt.extras.pop("clip_vision", None)
    if vision is None:
        raise ModelFileError(path, f"unCLIPCheckpointLoader input ckpt_name {ckpt_name!r}: not an unCLIP "
                                   "checkpoint (it holds no CLIP vision image embedder); expected an unCLIP "
                                   "checkpoint such as sd21-unclip-h")
    try:
        tower = clip_vision_from_state_dict(vision, path, _dtypes()["dtype"])
    except ModelFileError as e:
        raise ModelFileError(path, f"unCLIPCheckpointLoader input ckpt_name {ckpt_name!r}: {e.reason}") from None
    model, clip, vae = _handles(ckpt, rt.folders.paths("embeddings"))
    return UnclipCheckpoint(model, clip, vae, ClipVisionHandle(tower, name=ckpt_name))


# ---- CheckpointLoader (with a config, for old workflows) ---------------------------------------------
# The configs ComfyUI ships in models/configs, and what in them changes how a checkpoint runs: the
# v-prediction ones (parameterization: "v") and the clip-skip-2 ones (the penultimate CLIP layer).
# Architecture, channels and the rest are read from the checkpoint's tensors, so the config cannot
# contradict them. A .yaml file of another name in the configs folder is read for the same two facts.
SHIPPED_CONFIGS: dict[str, dict[str, Any]] = {
    "anything_v3.yaml": {"clip_layer": -2},
    "v1-inference.yaml": {},
    "v1-inference_clip_skip_2.yaml": {"clip_layer": -2},
    "v1-inference_clip_skip_2_fp16.yaml": {"clip_layer": -2},
    "v1-inference_fp16.yaml": {},
    "v1-inpainting-inference.yaml": {},
    "v2-inference-v.yaml": {"prediction_type": "v_prediction"},
    "v2-inference-v_fp32.yaml": {"prediction_type": "v_prediction"},
    "v2-inference.yaml": {"prediction_type": "epsilon"},
    "v2-inference_fp32.yaml": {"prediction_type": "epsilon"},
    "v2-inpainting-inference.yaml": {"prediction_type": "epsilon"},
}


def config_names() -> list[str]:
    return sorted(set(SHIPPED_CONFIGS) | set(runtime().folders.list_files("configs")))


def _config_facts(config_name: str) -> dict[str, Any]:
    path = runtime().folders.full_path("configs", config_name)
    if path is None:
        if config_name not in SHIPPED_CONFIGS:
            raise ValueError(f"CheckpointLoader: config_name {config_name!r} is neither shipped nor in the configs "
                             "folder")
        return SHIPPED_CONFIGS[config_name]
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        params = cfg.get("model", {}).get("params", {}) or {}
    except (yaml.YAMLError, AttributeError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"CheckpointLoader: config_name {config_name!r} is not a readable LDM config: {e}") from None
    facts: dict[str, Any] = {}
    if "parameterization" in params:
        facts["prediction_type"] = "v_prediction" if params["parameterization"] == "v" else "epsilon"
    cond = (params.get("cond_stage_config") or {}).get("params") or {}
    if cond.get("layer") == "penultimate":
        facts["clip_layer"] = -2
    return facts


@node("CheckpointLoader", category="advanced/loaders", display_name="Load Checkpoint With Config (DEPRECATED)",
      deprecated=True, fingerprint=model_file_fingerprint("checkpoints", "ckpt_name"),
      validate=model_file_exists("checkpoints", "ckpt_name", "checkpoint"))
def checkpoint_loader(config_name: Annotated[str, Combo(config_names)],
                      ckpt_name: Annotated[str, Combo(model_files("checkpoints"))]) -> tuple[Model, Clip, Vae]:
    """Loads a checkpoint with an LDM config, as old workflows do: the config's prediction type and clip
    skip are honoured; everything else comes from the checkpoint itself."""
    facts = _config_facts(config_name)
    rt = runtime()
    ckpt = load_checkpoint(rt.folders.require("checkpoints", ckpt_name), **_dtypes())
    if "prediction_type" in facts:
        ckpt.prediction_type = facts["prediction_type"]
    model, clip, vae = _handles(ckpt, rt.folders.paths("embeddings"))
    if "clip_layer" in facts:
        clip = clip.clone()
        clip.set_last_layer(int(facts["clip_layer"]))
    return model, clip, vae


# ---- text encoders as separate files ---------------------------------------------------------------

def _clip_from_files(node_name: str, files: dict[str, str], arch: str, expected: dict[str, str]) -> ClipHandle:
    """`files`: {input name: file name}; `expected`: {input name: kind} (each kind once)."""
    from .models.text_encoder_file import CLIP_LAYER_DEFAULTS, build_text_encoders, read_text_encoder
    from .models.tokenizer import load_tokenizer

    rt = runtime()
    parts = {}
    names = {"l": "CLIP-L", "h": "OpenCLIP-H", "g": "OpenCLIP-G"}
    for param, name in files.items():
        path = rt.folders.require("text_encoders", name)
        try:
            kind, sd = read_text_encoder(path, pair=len(files) > 1)
        except ModelFileError as e:
            raise ModelFileError(path, f"{node_name} input {param} {name!r}: {e.reason}; expected a "
                                       "CLIP text encoder file") from None
        if len(files) > 1 and kind not in expected.values():
            raise ValueError(f"{node_name}: {param} {name!r} is an {names[kind]} text encoder; {arch} uses "
                             f"{' and '.join(names[k] for k in expected.values())}")
        if kind in parts:
            raise ValueError(f"{node_name}: {param} {name!r} is a second {names[kind]} text encoder; {arch} needs "
                             f"{' and '.join(names[k] for k in expected.values())}")
        parts[kind] = (path, sd)
    try:
        encoders = build_text_encoders(parts, arch, _dtypes()["dtype"])
    except ModelFileError as e:
        raise ModelFileError(e.path, f"{node_name}: {e.reason}") from None
    return ClipHandle(encoders, {k: load_tokenizer(k) for k in encoders}, arch,
                      embedding_dirs=rt.folders.paths("embeddings"), layer_defaults=CLIP_LAYER_DEFAULTS[arch])


# CLIPLoader and DualCLIPLoader are one node each (nodes/sd3_nodes.py) over every `type`; these load the
# SD1/SD2/SDXL encoder files.
def clip_loader(clip_name: str, type: str = "stable_diffusion", device: str | None = None) -> ClipHandle:
    """Loads one text encoder file: CLIP-L makes an SD1 CLIP, OpenCLIP-H an SD2 CLIP."""
    from .models.text_encoder_file import read_text_encoder

    path = runtime().folders.require("text_encoders", clip_name)
    try:
        kind, _ = read_text_encoder(path)
    except ModelFileError as e:
        raise ModelFileError(path, f"CLIPLoader input clip_name {clip_name!r}: {e.reason}; expected a CLIP "
                                   "text encoder file") from None
    arch = {"l": "sd1", "h": "sd2"}.get(kind)
    if arch is None:
        raise ValueError(f"CLIPLoader: clip_name {clip_name!r} is an OpenCLIP-G text encoder, which SDXL pairs "
                         "with CLIP-L: load both with DualCLIPLoader (type sdxl)")
    clip = _clip_from_files("CLIPLoader", {"clip_name": clip_name}, arch, {"clip_name": kind})
    if device == "cpu":
        clip.load_device = "cpu"
    return clip


def dual_clip_loader(clip_name1: str, clip_name2: str, type: str = "sdxl", device: str | None = None) -> ClipHandle:
    """Loads SDXL's two text encoders (CLIP-L and OpenCLIP-G, in either order) from separate files."""
    for name in (clip_name1, clip_name2):
        if runtime().folders.full_path("text_encoders", name) is None:
            raise ValueError(f"DualCLIPLoader: text encoder not found: {name!r} (looked in text_encoders)")
    clip = _clip_from_files("DualCLIPLoader", {"clip_name1": clip_name1, "clip_name2": clip_name2}, "sdxl",
                            {"clip_name1": "l", "clip_name2": "g"})
    if device == "cpu":
        clip.load_device = "cpu"
    return clip

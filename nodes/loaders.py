"""Loader nodes: checkpoints (single-file or diffusers folders) and standalone VAEs.

A loaded model is an ordinary cache entry: loading the same file again is a cache hit, and under memory
pressure the cache moves it to CPU rather than dropping it, so switching checkpoints does not re-read
files. A changed file (size or modification time) is loaded again.
"""
from __future__ import annotations

from typing import Annotated

from engine.inputs import Combo
from engine.node import node

from .models.checkpoint import load_checkpoint, load_diffusers_folder, load_vae_file
from .models.diffusion_model import DiffusionModelHandle
from .models.memory import compute_dtype, default_device
from .models.text_encoder import ClipHandle
from .models.vae import VaeHandle
from .runtime import model_file_exists, model_file_fingerprint, model_files, runtime
from .types import Clip, Model, Vae


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
        ckpt_name: Annotated[str, Combo(model_files("checkpoints"), tooltip="The checkpoint (model) to load.")]) -> tuple[Model, Clip, Vae]:
    """Loads a diffusion model checkpoint; diffusion models denoise latents."""
    rt = runtime()
    ckpt = load_checkpoint(rt.folders.require("checkpoints", ckpt_name), **_dtypes())
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

from typing import Any, NamedTuple, TypeAlias

from engine.inputs import Socket

from .models.unet_file import WEIGHT_DTYPES, load_unet_file

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
    """Loads the diffusion model and VAE of a checkpoint; its CLIP-vision tower is not loaded yet (the
    CLIP_VISION output refuses use with a clear error)."""
    ckpt = load_checkpoint(runtime().folders.require("checkpoints", ckpt_name), load_clip=False, **_dtypes())
    return ImageOnlyCheckpoint(DiffusionModelHandle.from_checkpoint(ckpt), UnsupportedModel("CLIP vision", ckpt_name),
                               VaeHandle(ckpt.vae))


def _not_supported(what: str) -> str:
    return f"{what} models are not supported by sdflow yet"


@node("StyleModelLoader", category="loaders", display_name="Load Style Model",
      validate=model_file_exists("style_models", "style_model_name", "style model"))
def style_model_loader(style_model_name: Annotated[str, Combo(model_files("style_models"))]) -> StyleModel:
    """Loads a style model (T2I style adapter / Flux Redux): not supported yet."""
    raise NotImplementedError(f"StyleModelLoader: {_not_supported('style')} ({style_model_name!r})")


@node("GLIGENLoader", category="loaders", display_name="Load GLIGEN",
      validate=model_file_exists("gligen", "gligen_name", "GLIGEN model"))
def gligen_loader(gligen_name: Annotated[str, Combo(model_files("gligen"))]) -> Gligen:
    """Loads a GLIGEN model: not supported yet."""
    raise NotImplementedError(f"GLIGENLoader: {_not_supported('GLIGEN')} ({gligen_name!r})")

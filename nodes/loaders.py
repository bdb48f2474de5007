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
        ckpt_name: Annotated[str, Combo(model_files("checkpoints"), tooltip="The checkpoint (model) to load.")],
) -> tuple[Model, Clip, Vae]:
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

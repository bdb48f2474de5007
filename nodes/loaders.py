"""Loader nodes: checkpoints (single-file or diffusers folders) and standalone VAEs.

A loaded model is an ordinary cache entry: loading the same file again is a cache hit, and under memory
pressure the cache moves it to CPU rather than dropping it, so switching checkpoints does not re-read
files. The fingerprint is the file's size and modification time (hashing gigabytes per prompt would cost
more than it saves).
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.inputs import Combo
from engine.node import node

from .models.checkpoint import load_checkpoint, load_diffusers_folder, load_vae_file
from .models.diffusion_model import DiffusionModelHandle
from .models.text_encoder import ClipHandle
from .models.vae import VaeHandle
from .runtime import model_files, runtime
from .types import Clip, Model, Vae


def _stat(path: Path | None) -> str:
    if path is None:
        return "missing"
    st = os.stat(path)
    if path.is_dir():   # a diffusers folder: the newest file inside decides
        return str(max((os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(path) for f in fs),
                       default=st.st_mtime_ns))
    return f"{st.st_size}:{st.st_mtime_ns}"


def _file_fingerprint(key: str):
    def fingerprint(**constants) -> str:
        name = next(iter(constants.values()))
        return _stat(runtime().folders.full_path(key, name))
    return fingerprint


def _exists(key: str, label: str):
    def validate(**constants) -> bool | str:
        name = next(iter(constants.values()))
        try:
            path = runtime().folders.full_path(key, name)
        except ValueError as exc:
            return f"invalid {label} name {name!r}: {exc}"
        return True if path is not None else f"{label} not found: {name!r} (looked in {key})"
    return validate


def _handles(ckpt, embedding_dirs) -> tuple[DiffusionModelHandle, ClipHandle, VaeHandle]:
    return (DiffusionModelHandle.from_checkpoint(ckpt),
            ClipHandle.from_checkpoint(ckpt, embedding_dirs=embedding_dirs),
            VaeHandle(ckpt.vae))


@node("CheckpointLoaderSimple", category="loaders", display_name="Load Checkpoint",
      fingerprint=_file_fingerprint("checkpoints"), validate=_exists("checkpoints", "checkpoint"))
def checkpoint_loader_simple(
        ckpt_name: Combo(model_files("checkpoints"), tooltip="The checkpoint (model) to load.")) -> tuple[Model, Clip, Vae]:
    """Loads a diffusion model checkpoint; diffusion models denoise latents."""
    rt = runtime()
    ckpt = load_checkpoint(rt.folders.require("checkpoints", ckpt_name))
    return _handles(ckpt, rt.folders.paths("embeddings"))


@node("DiffusersLoader", category="advanced/loaders", display_name="Load Diffusers Model",
      fingerprint=_file_fingerprint("diffusers"), validate=_exists("diffusers", "diffusers folder"))
def diffusers_loader(model_path: Combo(model_files("diffusers"))) -> tuple[Model, Clip, Vae]:
    """Loads a model stored as a diffusers folder (model_index.json, unet/, vae/, text_encoder/...)."""
    rt = runtime()
    ckpt = load_diffusers_folder(rt.folders.require("diffusers", model_path))
    return _handles(ckpt, rt.folders.paths("embeddings"))


@node("VAELoader", category="loaders", display_name="Load VAE",
      fingerprint=_file_fingerprint("vae"), validate=_exists("vae", "VAE"))
def vae_loader(vae_name: Combo(model_files("vae"))) -> Vae:
    """Loads a standalone VAE file (original or diffusers key layout)."""
    return VaeHandle(load_vae_file(runtime().folders.require("vae", vae_name)))

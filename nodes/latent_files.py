"""SaveLatent / LoadLatent: `.latent` files as ComfyUI writes them (safetensors holding `latent_tensor`
and an empty `latent_format_version_0` marker, the prompt and workflow in the metadata).

LATENT holds raw VAE latents (ComfyUI's convention), so the files store them as they are and
exchange with ComfyUI unchanged both ways. Files written by older sdflow versions (marked by
`sdflow.latent_scaling_factor`, always SD1's 0.18215) held scaled latents divided by that factor,
i.e. raw SD1 latents, and are read as such.
Files without the version marker are ComfyUI's old format, whose latents were scaled by SD1's
0.18215 (ComfyUI reads them dividing by it), and are read the same way.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any

import torch

from engine.inputs import Combo, Hidden, String
from engine.node import NodeOutput, node
from engine.paths import UnsafePathError, contained_path
from engine.png_metadata import png_text_chunks

from .model_merging import _output_file
from .runtime import runtime
from .types import Latent

SD_SCALE = 0.18215
SCALE_KEY = "sdflow.latent_scaling_factor"


def latent_files() -> list[str]:
    base = runtime().input_dir
    if not base.is_dir():
        return []
    return sorted(f for f in os.listdir(base) if f.endswith(".latent") and (base / f).is_file())


def _path(latent: str) -> Path:
    return contained_path(runtime().input_dir, latent)


def _validate(latent: str) -> bool | str:
    try:
        path = _path(latent)
    except (UnsafePathError, ValueError) as exc:
        return f"Invalid latent file: {latent} ({exc})"
    return True if path.is_file() else f"Invalid latent file: {latent}"


def _sha256(latent: str) -> str:
    digest = hashlib.sha256()
    with open(_path(latent), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@node("SaveLatent", category="_for_testing", output_node=True)
def save_latent(samples: Latent, filename_prefix: Annotated[str, String("latents/ComfyUI")],
                prompt: Annotated[Any, Hidden("PROMPT")] = None,
                extra_pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> NodeOutput:
    """Saves a latent to the output folder as a .latent file (ComfyUI's format)."""
    from safetensors.torch import save_file

    path, _ = _output_file(filename_prefix, "SaveLatent", ".latent")
    meta = dict(png_text_chunks(prompt, extra_pnginfo))
    tensors = {"latent_tensor": samples["samples"].float().contiguous().cpu(),
               "latent_format_version_0": torch.tensor([])}
    save_file(tensors, str(path), metadata=meta)
    subfolder = os.path.relpath(path.parent, os.path.realpath(runtime().output_dir)).replace(os.sep, "/")
    return NodeOutput(ui={"latents": [{"filename": path.name, "subfolder": "" if subfolder == "." else subfolder,
                                       "type": "output"}]})


@node("LoadLatent", category="_for_testing", validate=_validate, fingerprint=_sha256)
def load_latent(latent: Annotated[str, Combo(latent_files)]) -> Latent:
    """Loads a .latent file from the input folder."""
    from safetensors import safe_open

    path = _path(latent)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise ValueError(f"LoadLatent: latent {latent!r} is not a .latent (safetensors) file: {e}") from None
    if "latent_tensor" not in tensors:
        raise ValueError(f"LoadLatent: latent {latent!r} holds no latent_tensor")
    samples = tensors["latent_tensor"].float()
    if SCALE_KEY in meta:
        # an older sdflow file: scaled latents divided by the recorded factor, i.e. raw ones when that
        # factor is SD1's (always so); read as SD1 latents otherwise, the model not being recorded
        samples = samples * (float(meta[SCALE_KEY]) / SD_SCALE)
    elif "latent_format_version_0" not in tensors:
        samples = samples / SD_SCALE
    return {"samples": samples}

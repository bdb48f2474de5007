"""LoRA loader nodes: a LoRA file on the MODEL's UNet and the CLIP's text encoders.

The inputs are never modified. The MODEL comes back as a cheap handle, the same base weights plus one
recorded `LoraPatch`, applied in place when it runs (models/weight_patch.py); the CLIP likewise, one
`LoraPatch` per text encoder it adapts, applied in place to the shared encoders when it encodes.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

from engine.inputs import Combo, Float
from engine.node import node

from .models.diffusion_model import DiffusionModelHandle
from .models.lora import UNET, LoraPatch, load_lora_file, log, resolve
from .models.state_dict import ModelFileError
from .models.text_encoder import ClipHandle
from .runtime import model_file_exists, model_file_fingerprint, model_files, runtime
from .types import Clip, Model

_STRENGTH = dict(min=-100.0, max=100.0, step=0.01)
T = TypeVar("T")


def _read(load: Callable[[Path], T], path: Path, where: str, expected: str) -> T:
    """`load(path)`, its file errors restated with the node and input that named the file and what was expected."""
    try:
        return load(path)
    except ModelFileError as e:
        raise ModelFileError(path, f"{where}: {e.reason}; expected {expected}") from None


def load_lora(model: DiffusionModelHandle | None, clip: ClipHandle | None, lora_name: str,
              strength_model: float, strength_clip: float, node_name: str = "LoraLoader"
              ) -> tuple[DiffusionModelHandle | None, ClipHandle | None]:
    """What both loader nodes do: read (cached), resolve the keys, record the patches on new handles."""
    path = runtime().folders.require("loras", lora_name)
    lora = _read(load_lora_file, path, f"{node_name} input lora_name {lora_name!r}",
                 "a LoRA (kohya/LoCon, LoHa, LoKr, DoRA or diffusers/PEFT) .safetensors file")
    # Both sides take part in matching keys even at strength 0, so only truly unknown keys are reported.
    # Names only: resolving reads no weights, so the shared module need not be patched for it.
    unet = model.base_unet if model is not None else None
    encoders = getattr(clip, "base_text_encoders", None) or getattr(clip, "text_encoders", None)
    patches, unknown = resolve(lora, unet, encoders)
    for key in unknown:
        log.warning("lora key not loaded: %s", key)
    out_model = model
    mine = tuple(p for p in patches if p.target == UNET)
    if model is not None and strength_model != 0 and mine:
        out_model = model.with_merge(LoraPatch(mine, float(strength_model)))
    out_clip = clip
    if clip is not None and encoders and strength_clip != 0:
        patched = clip
        for key in encoders:
            theirs = tuple(p for p in patches if p.target == key)
            if theirs:
                if not hasattr(patched, "with_encoder_patch"):
                    raise ValueError(f"{node_name}: LoRA weights for the {key!r} text encoder of a "
                                     f"{type(clip).__name__} are not supported (use strength_clip 0, or "
                                     "LoraLoaderModelOnly)")
                patched = patched.with_encoder_patch(key, LoraPatch(theirs, float(strength_clip)))
        out_clip = patched
    return out_model, out_clip


@node("LoraLoader", category="loaders", display_name="Load LoRA",
      fingerprint=model_file_fingerprint("loras", "lora_name"),
      validate=model_file_exists("loras", "lora_name", "LoRA"))
def lora_loader(model: Model, clip: Clip,
                lora_name: Annotated[str, Combo(model_files("loras"), tooltip="The name of the LoRA.")],
                strength_model: Annotated[float, Float(1.0, **_STRENGTH,
                                                       tooltip="How strongly to modify the diffusion model. "
                                                               "This value can be negative.")],
                strength_clip: Annotated[float, Float(1.0, **_STRENGTH,
                                                      tooltip="How strongly to modify the CLIP model. "
                                                              "This value can be negative.")]) -> tuple[Model, Clip]:
    """LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are denoised
    such as applying styles. Multiple LoRA nodes can be linked together."""
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    out_model, out_clip = load_lora(model, clip, lora_name, strength_model, strength_clip)
    assert out_model is not None and out_clip is not None  # given both, both come back
    return out_model, out_clip


@node("LoraLoaderModelOnly", category="loaders",
      fingerprint=model_file_fingerprint("loras", "lora_name"),
      validate=model_file_exists("loras", "lora_name", "LoRA"))
def lora_loader_model_only(model: Model, lora_name: Annotated[str, Combo(model_files("loras"))],
                           strength_model: Annotated[float, Float(1.0, **_STRENGTH)]) -> Model:
    """Applies a LoRA to the diffusion model only (its text encoder part is ignored)."""
    if strength_model == 0:
        return model
    out_model = load_lora(model, None, lora_name, strength_model, 0.0, "LoraLoaderModelOnly")[0]
    assert out_model is not None  # given a model, a model comes back
    return out_model


@node("HypernetworkLoader", category="loaders",
      fingerprint=model_file_fingerprint("hypernetworks", "hypernetwork_name"),
      validate=model_file_exists("hypernetworks", "hypernetwork_name", "hypernetwork"))
def hypernetwork_loader(model: Model, hypernetwork_name: Annotated[str, Combo(model_files("hypernetworks"))],
                        strength: Annotated[float, Float(1.0, min=-10.0, max=10.0, step=0.01)]) -> Model:
    """Applies an A1111 hypernetwork (.pt) to the model's attention layers."""
    from .models.hypernetwork import HypernetworkPatch, load_hypernetwork

    path = runtime().folders.require("hypernetworks", hypernetwork_name)
    layers = _read(load_hypernetwork, path, f"HypernetworkLoader input hypernetwork_name {hypernetwork_name!r}",
                   "an A1111 hypernetwork .pt file")
    if strength == 0:
        return model
    return model.with_patches(hypernetworks=(HypernetworkPatch(layers, strength),))

"""The built-in nodes as ComfyUI-style classes (`nodes.KSampler().sample(...)`), and the live
`NODE_CLASS_MAPPINGS` over the built-ins and every loaded pack.

Packs call ComfyUI's node classes directly inside their own nodes; sdflow's node functions already take
ComfyUI's input names, so each class is a thin wrapper whose FUNCTION method calls the node function and
returns a tuple (or ComfyUI's `{"ui": ..., "result": ...}` for output nodes).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from engine.node import NodeDef, NodeOutput
from engine.registry import Registry

# ComfyUI's FUNCTION method names of its core nodes; a node not listed gets `execute`.
METHODS = {
    "KSampler": "sample", "KSamplerAdvanced": "sample", "CLIPTextEncode": "encode", "VAEDecode": "decode",
    "VAEEncode": "encode", "VAEDecodeTiled": "decode", "VAEEncodeTiled": "encode", "VAEEncodeForInpaint": "encode",
    "CheckpointLoaderSimple": "load_checkpoint", "EmptyLatentImage": "generate", "SaveImage": "save_images",
    "PreviewImage": "save_images", "LoadImage": "load_image", "LoadImageMask": "load_image",
    "LoraLoader": "load_lora", "LoraLoaderModelOnly": "load_lora_model_only", "VAELoader": "load_vae",
    "ImageScale": "upscale", "ImageScaleBy": "upscale", "LatentUpscale": "upscale", "LatentUpscaleBy": "upscale",
    "ControlNetLoader": "load_controlnet", "ControlNetApply": "apply_controlnet",
    "ControlNetApplyAdvanced": "apply_controlnet", "CLIPSetLastLayer": "set_last_layer",
    "ConditioningCombine": "combine", "ConditioningSetArea": "append", "ConditioningSetMask": "append",
    "UpscaleModelLoader": "load_model", "ImageUpscaleWithModel": "upscale", "ImageInvert": "invert",
    "CLIPLoader": "load_clip",
    "UNETLoader": "load_unet", "LatentComposite": "composite", "SetLatentNoiseMask": "set_mask",
    "RepeatLatentBatch": "repeat", "ImageBatch": "batch", "EmptyImage": "generate",
    "ImagePadForOutpaint": "expand_image", "LatentFromBatch": "frombatch", "ConditioningZeroOut": "zero_out",
}

# ComfyUI's positional parameter order of those methods where it differs from the input order (packs call
# `nodes.CLIPTextEncode().encode(clip, text)` positionally); others follow the node's declared inputs.
ORDER = {
    "CLIPTextEncode": ("clip", "text"), "VAEDecode": ("vae", "samples"), "VAEEncode": ("vae", "pixels"),
    "VAEDecodeTiled": ("vae", "samples", "tile_size", "overlap", "temporal_size", "temporal_overlap"),
    "VAEEncodeForInpaint": ("vae", "pixels", "mask", "grow_mask_by"),
    "KSampler": ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                 "latent_image", "denoise"),
    "KSamplerAdvanced": ("model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler",
                         "positive", "negative", "latent_image", "start_at_step", "end_at_step",
                         "return_with_leftover_noise", "denoise"),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "LoraLoader": ("model", "clip", "lora_name", "strength_model", "strength_clip"),
    "ImageScale": ("image", "upscale_method", "width", "height", "crop"),
    "LatentUpscale": ("samples", "upscale_method", "width", "height", "crop"),
    "ImageUpscaleWithModel": ("upscale_model", "image"),
    "SaveImage": ("images", "filename_prefix", "prompt", "extra_pnginfo"),
    "PreviewImage": ("images", "filename_prefix", "prompt", "extra_pnginfo"),
}

_state: dict[str, Any] = {"registry": None, "packs": {}, "classes": {}}


def bind(registry: Registry) -> None:
    """The registry `nodes.NODE_CLASS_MAPPINGS` reads (the composition root's)."""
    _state["registry"] = registry
    _state["classes"] = {}


def add_pack_classes(mappings: Mapping[str, type], display: Mapping[str, str] | None = None) -> None:
    for name, cls in mappings.items():
        _state["packs"][name] = (cls, (display or {}).get(name))


def _registry() -> Registry:
    reg = _state["registry"]
    if reg is None:
        from ..builtin import MODULES
        reg = _state["registry"] = Registry.from_nodes(*MODULES)
    return reg


def class_for(nd: NodeDef) -> type:
    made = _state["classes"].get(nd.name)
    if made is not None:
        return made
    method = METHODS.get(nd.name, "execute")
    info = nd.info()
    n_out = len(nd.outputs)

    order = ORDER.get(nd.name) or tuple(nd.inputs)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(order):
            raise TypeError(f"{nd.name}.{method}() takes {len(order)} positional arguments, got {len(args)}")
        kwargs.update(zip(order, args, strict=False))
        for name, decl in nd.inputs.items():   # ComfyUI's methods default what their widgets default
            default = getattr(decl.spec, "default", None)
            if name not in kwargs and default is not None and decl.section != "hidden":
                kwargs[name] = default
        ret: Any = nd.fn(**{k: v for k, v in kwargs.items() if k in nd.inputs or nd.accepts_extra})
        ui = None
        if isinstance(ret, NodeOutput):
            value, ui = ret.result, ret.ui
            result = tuple(value) if isinstance(value, tuple) and (n_out != 1 or len(value) == 1) else (value,)
        elif n_out == 1:
            result = (ret,)
        else:
            result = tuple(ret) if ret is not None else ()
        return {"ui": ui, "result": result} if ui is not None else result

    def input_types(cls: type) -> dict:
        return {k: v for k, v in nd.info()["input"].items()}

    attrs = {"INPUT_TYPES": classmethod(input_types), "RETURN_TYPES": tuple(info["output"]),
             "RETURN_NAMES": tuple(info["output_name"]), "OUTPUT_IS_LIST": tuple(info["output_is_list"]),
             "FUNCTION": method, "CATEGORY": nd.category, "OUTPUT_NODE": nd.output_node,
             "DESCRIPTION": nd.description, method: call, "__module__": "nodes", "__qualname__": nd.name}
    made = _state["classes"][nd.name] = type(nd.name, (), attrs)
    return made


class _ClassMap(Mapping):
    """ComfyUI's one NODE_CLASS_MAPPINGS: built-ins (as classes) and every pack's classes, read live."""

    def __getitem__(self, name: str) -> type:
        if name in _state["packs"]:
            return _state["packs"][name][0]
        nd = _registry().get(name)
        if nd is None or not nd.python_module.startswith("nodes"):
            raise KeyError(name)
        return class_for(nd)

    def _names(self) -> list[str]:
        builtin = [nd.name for nd in _registry() if nd.python_module.startswith("nodes")]
        return builtin + [n for n in _state["packs"] if n not in builtin]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class _DisplayMap(Mapping):
    def __getitem__(self, name: str) -> str:
        if name in _state["packs"]:
            shown = _state["packs"][name][1]
            if shown is None:
                raise KeyError(name)
            return shown
        nd = _registry().get(name)
        if nd is None or not nd.display_name:
            raise KeyError(name)
        return nd.display_name

    def __iter__(self) -> Iterator[str]:
        return (n for n in NODE_CLASS_MAPPINGS if n in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True


NODE_CLASS_MAPPINGS = _ClassMap()
NODE_DISPLAY_NAME_MAPPINGS = _DisplayMap()


def common_ksampler(model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    positive: Any, negative: Any, latent: Any, denoise: float = 1.0, disable_noise: bool = False,
                    start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> tuple:
    """ComfyUI's helper under KSampler and KSamplerAdvanced: returns (latent,)."""
    if not disable_noise and start_step is None and last_step is None and not force_full_denoise:
        return NODE_CLASS_MAPPINGS["KSampler"]().sample(model, seed, steps, cfg, sampler_name, scheduler,
                                                        positive, negative, latent, denoise=denoise)
    return NODE_CLASS_MAPPINGS["KSamplerAdvanced"]().sample(
        model, "disable" if disable_noise else "enable", seed, steps, cfg, sampler_name, scheduler, positive,
        negative, latent, start_step or 0, last_step if last_step is not None else 10000,
        "disable" if force_full_denoise else "enable")

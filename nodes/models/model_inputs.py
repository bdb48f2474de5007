"""Which node inputs name model files, and in which model folder each file belongs.

Two sources: our own loaders (a combo built with `runtime.model_files(key)` carries its folder key), and
ComfyUI's core loader classes, so a workflow that uses a loader sdflow lacks still gets its files named
with the folder to put them in.
"""
from __future__ import annotations

from engine.inputs import ComboSpec
from engine.registry import Registry

from .folders import ModelFolders, canonical_key

# ComfyUI's core loaders (nodes.py, comfy_extras): class -> {input: folder key}.
COMFY_LOADER_INPUTS: dict[str, dict[str, str]] = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "CheckpointLoader": {"config_name": "configs", "ckpt_name": "checkpoints"},
    "unCLIPCheckpointLoader": {"ckpt_name": "checkpoints"},
    "ImageOnlyCheckpointLoader": {"ckpt_name": "checkpoints"},
    "DiffusersLoader": {"model_path": "diffusers"},
    "VAELoader": {"vae_name": "vae"},
    "LoraLoader": {"lora_name": "loras"},
    "LoraLoaderModelOnly": {"lora_name": "loras"},
    "ControlNetLoader": {"control_net_name": "controlnet"},
    "DiffControlNetLoader": {"control_net_name": "controlnet"},
    "UpscaleModelLoader": {"model_name": "upscale_models"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "TripleCLIPLoader": {f"clip_name{i}": "text_encoders" for i in (1, 2, 3)},
    "QuadrupleCLIPLoader": {f"clip_name{i}": "text_encoders" for i in (1, 2, 3, 4)},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "StyleModelLoader": {"style_model_name": "style_models"},
    "GLIGENLoader": {"gligen_name": "gligen"},
    "HypernetworkLoader": {"hypernetwork_name": "hypernetworks"},
    "PhotoMakerLoader": {"photomaker_model_name": "photomaker"},
    "ModelPatchLoader": {"name": "model_patches"},
    "AudioEncoderLoader": {"audio_encoder_name": "audio_encoders"},
}
# VAELoader choices that are not files of the vae folder (approximate decoders, the identity VAE).
VIRTUAL_VAE_NAMES = frozenset({"pixel_space", "taesd", "taesdxl", "taesd3", "taef1"})


class FolderLocator:
    """`engine.check.ModelLocator` over the model folders and a registry."""

    def __init__(self, folders: ModelFolders, registry: Registry | None = None) -> None:
        self.folders = folders
        self.registry = registry

    def model_inputs(self, class_type: str) -> dict[str, str]:
        found = dict(COMFY_LOADER_INPUTS.get(class_type, {}))
        nd = self.registry.get(class_type) if self.registry is not None else None
        for decl in (nd.inputs.values() if nd is not None else ()):
            spec = decl.spec
            key = getattr(spec.choices, "model_folder", None) if isinstance(spec, ComboSpec) else None
            if key:
                found[decl.name] = key
        return found

    def has_model(self, folder: str, name: str) -> bool:
        if canonical_key(folder) == "vae" and name in VIRTUAL_VAE_NAMES:
            return True
        try:
            return self.folders.full_path(folder, name) is not None
        except ValueError:
            return False   # an unsafe name is never "present"

    def folder_paths(self, folder: str) -> list[str]:
        return [str(p) for p in self.folders.paths(folder)] or [folder]

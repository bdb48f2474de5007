"""The built-in Stable Diffusion node set, and the registry a server or CLI runs with."""
from __future__ import annotations

from engine.config import RuntimeConfig
from engine.registry import Registry

from . import (
    conditioning,
    controlnet,
    custom_sampling,
    image,
    instructpix2pix,
    latent,
    latent_files,
    loaders,
    lora,
    mask,
    model_merging,
    model_patches,
    primitives,
    sampler_nodes,
    sd3_nodes,
    strings,
    upscale,
)
from .runtime import configure

MODULES = (loaders, conditioning, latent, sampler_nodes, image, lora, controlnet, upscale,
           custom_sampling, model_patches, instructpix2pix, mask, primitives, strings, model_merging, latent_files,
           sd3_nodes)


class ModelCatalog:
    """What the server's /models and /embeddings routes list (folder keys and files)."""

    def __init__(self, folders) -> None:
        self.folders = folders

    def folder_names(self) -> list[str]:
        return self.folders.keys()

    def list_files(self, folder: str) -> list[str] | None:
        if folder not in self.folders.keys() and folder not in ("clip", "unet"):
            return None
        return self.folders.list_files(folder)

    def model_locator(self, registry: Registry):
        """What `sdflow check` and `POST /check` ask about model files."""
        from .models.model_inputs import FolderLocator
        return FolderLocator(self.folders, registry)


def build_registry(config: RuntimeConfig, *, plugins: bool = True) -> tuple[Registry, ModelCatalog]:
    rt = configure(config)
    registry = Registry.from_nodes(*MODULES)
    registry.config = config
    for nd in registry:
        nd.python_module = "nodes"
    if plugins:
        registry.load_plugins()
    return registry, ModelCatalog(rt.folders)

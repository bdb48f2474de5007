"""Process-wide settings of the SD nodes: where models, inputs and outputs live.

The composition root (the CLI or a test) calls `configure(config)` once; nodes read `runtime()`.
Dynamic combos (file lists) call into it each time the schema is read, so new files show up.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config import RuntimeConfig

from .models.folders import ModelFolders


@dataclass
class Runtime:
    config: RuntimeConfig
    folders: ModelFolders

    @property
    def input_dir(self) -> Path:
        return self.config.input_dir

    @property
    def output_dir(self) -> Path:
        return self.config.output_dir

    @property
    def temp_dir(self) -> Path:
        return self.config.temp_dir


_runtime: Runtime | None = None


def configure(config: RuntimeConfig) -> Runtime:
    global _runtime
    config.ensure_dirs()
    folders = ModelFolders(config.data_dir, models_dir=config.models_dir)
    for yaml_path in config.extra_model_paths:
        folders.add_extra_paths_yaml(yaml_path)
    folders.ensure_dirs(["checkpoints", "vae", "loras", "controlnet", "upscale_models", "embeddings",
                         "diffusers", "vae_approx"])
    _runtime = Runtime(config, folders)
    return _runtime


def runtime() -> Runtime:
    if _runtime is None:
        return configure(RuntimeConfig())
    return _runtime


def model_files(key: str):
    """A combo choices callable: the current files of a model folder."""
    def choices() -> list[str]:
        return runtime().folders.list_files(key)
    choices.__name__ = f"{key}_files"
    return choices

"""Settings of the SD nodes: where models, inputs and outputs live.

Nodes read `runtime()`: inside an execution it belongs to the executor's config (engine.config's current
config), so several configured environments can share a process; outside one (schema reads, direct calls)
it is the process default that the composition root set with `configure(config)`. Dynamic combos (file
lists) call into it each time the schema is read, so new files show up.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config import RuntimeConfig, current_config

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
_by_config: dict[int, Runtime] = {}   # id(config) -> its runtime (the Runtime keeps the config alive)


def configure(config: RuntimeConfig) -> Runtime:
    """Set up `config`'s directories and make it the process default."""
    global _runtime
    _runtime = _runtime_for(config)
    return _runtime


def _runtime_for(config: RuntimeConfig) -> Runtime:
    known = _by_config.get(id(config))
    if known is not None and known.config is config:
        return known
    config.ensure_dirs()
    folders = ModelFolders(config.data_dir, models_dir=config.models_dir)
    for yaml_path in config.extra_model_paths:
        folders.add_extra_paths_yaml(yaml_path)
    folders.ensure_dirs(["checkpoints", "vae", "loras", "controlnet", "upscale_models", "embeddings",
                         "diffusers", "vae_approx"])
    made = _by_config[id(config)] = Runtime(config, folders)
    return made


def runtime() -> Runtime:
    config = current_config()
    if config is not None:
        return _runtime_for(config)
    if _runtime is None:
        return configure(RuntimeConfig())
    return _runtime


def model_files(key: str):
    """A combo choices callable: the current files of a model folder."""
    def choices() -> list[str]:
        return runtime().folders.list_files(key)
    choices.__name__ = f"{key}_files"
    return choices

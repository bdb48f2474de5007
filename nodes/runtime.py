"""Settings of the SD nodes: where models, inputs and outputs live.

Nodes read `runtime()`: inside an execution it belongs to the executor's config (engine.config's current
config), so several configured environments can share a process; outside one (schema reads, direct calls)
it is the process default that the composition root set with `configure(config)`. Dynamic combos (file
lists) call into it each time the schema is read, so new files show up.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

from engine.config import RuntimeConfig, current_config

from .models.folders import ModelFolders


@dataclass
class Runtime:
    config: RuntimeConfig
    folders: ModelFolders

    # RuntimeConfig fills every directory it was not given.
    @property
    def input_dir(self) -> Path:
        assert self.config.input_dir is not None
        return self.config.input_dir

    @property
    def output_dir(self) -> Path:
        assert self.config.output_dir is not None
        return self.config.output_dir

    @property
    def temp_dir(self) -> Path:
        assert self.config.temp_dir is not None
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
    # lets `sdflow check` tell which folder a missing file belongs in (a function attribute mypy cannot see)
    choices.model_folder = key  # type: ignore[attr-defined]
    return choices


def _takes(param: str, fn):
    """Give `fn(**values)` the signature `fn(*, <param>)`: the engine passes a node's fingerprint and
    validate functions exactly the inputs they name."""
    fn.__signature__ = inspect.Signature([inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY)])
    return fn


def _stat(path: Path | None) -> str:
    if path is None:
        return "missing"
    if path.is_dir():   # a diffusers folder: the newest file inside decides
        return str(max((os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(path) for f in fs),
                       default=path.stat().st_mtime_ns))
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def model_file_fingerprint(key: str, param: str):
    """A node fingerprint for a model-file input: the file's size and modification time (hashing gigabytes
    per prompt would cost more than it saves)."""
    return _takes(param, lambda **values: _stat(runtime().folders.full_path(key, values[param])))


def model_file_exists(key: str, param: str, label: str):
    """A node validator for a model-file input: the name must be safe and the file present."""
    def validate(**values) -> bool | str:
        name = values[param]
        try:
            path = runtime().folders.full_path(key, name)
        except ValueError as exc:
            return f"invalid {label} name {name!r}: {exc}"
        return True if path is not None else f"{label} not found: {name!r} (looked in {key})"
    return _takes(param, validate)

"""ComfyUI's `folder_paths` module, live over sdflow's model folders (nodes.models.folders.ModelFolders).

Installed as `folder_paths` for custom-node packs. Every call reads the current runtime's folders, so a
folder a pack adds is seen by sdflow's own loaders and file-list combos as well.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

from ..models.folders import PT_EXTENSIONS
from ..runtime import runtime

supported_pt_extensions: set[str] = set(PT_EXTENSIONS)


def _folders() -> Any:
    return runtime().folders


class _FolderMap(MutableMapping):
    """`folder_names_and_paths`: key -> ([directories], {extensions}), as ComfyUI's dict; writes go through."""

    def __getitem__(self, key: str) -> tuple[list[str], set[str]]:
        folders = _folders()
        if key not in folders.keys() and key not in ("clip", "unet"):
            raise KeyError(key)
        return [str(p) for p in folders.paths(key)], set(folders.extensions(key))

    def __setitem__(self, key: str, value: Any) -> None:
        paths, exts = (value, set()) if isinstance(value, (list, str)) else (value[0], value[1])
        _folders().set_folder(key, [paths] if isinstance(paths, str) else list(paths), set(exts or ()))

    def __delitem__(self, key: str) -> None:
        _folders().set_folder(key, [], set())

    def __iter__(self) -> Iterator[str]:
        return iter(_folders().keys())

    def __len__(self) -> int:
        return len(_folders().keys())


folder_names_and_paths = _FolderMap()


def __getattr__(name: str) -> Any:
    rt = runtime()
    live = {"models_dir": lambda: str(rt.folders.models_dir), "base_path": lambda: str(rt.folders.base_dir),
            "output_directory": lambda: str(rt.output_dir), "input_directory": lambda: str(rt.input_dir),
            "temp_directory": lambda: str(rt.temp_dir), "user_directory": get_user_directory}
    if name in live:
        return live[name]()
    raise AttributeError(f"module 'folder_paths' has no attribute {name!r}")


def get_input_directory() -> str:
    return str(runtime().input_dir)


def get_output_directory() -> str:
    return str(runtime().output_dir)


def get_temp_directory() -> str:
    return str(runtime().temp_dir)


def get_user_directory() -> str:
    return str(runtime().config.user_dir)


def get_directory_by_type(type_name: str) -> str | None:
    return {"output": get_output_directory, "input": get_input_directory,
            "temp": get_temp_directory}.get(type_name, lambda: None)()


def get_folder_paths(folder_name: str) -> list[str]:
    return [str(p) for p in _folders().paths(folder_name)]


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    _folders().add_path(folder_name, full_folder_path, is_default)


def get_filename_list(folder_name: str) -> list[str]:
    return _folders().list_files(folder_name)


def get_full_path(folder_name: str, filename: str) -> str | None:
    try:
        found = _folders().full_path(folder_name, filename)
    except ValueError:   # UnsafePathError: a name leaving the folder is "not there" for a pack
        return None
    return None if found is None else str(found)


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    found = get_full_path(folder_name, filename)
    if found is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return found


def filter_files_extensions(files: Iterable[str], extensions: Iterable[str]) -> list[str]:
    exts = {e.lower() for e in extensions}
    return sorted(f for f in files if not exts or os.path.splitext(f)[1].lower() in exts)


def annotated_filepath(name: str) -> tuple[str, str | None]:
    for kind in ("output", "input", "temp"):
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], get_directory_by_type(kind)
    return name, None


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, base = annotated_filepath(name)
    if base is None:
        base = default_dir if default_dir is not None else get_input_directory()
    return os.path.join(base, name)


def exists_annotated_filepath(name: str) -> bool:
    return os.path.exists(get_annotated_filepath(name))


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                        image_height: int = 0) -> tuple[str, str, int, str, str]:
    """(folder, file name, next counter, subfolder, prefix) for `prefix_00001_.png`-style files."""
    filename_prefix = filename_prefix.replace("%width%", str(image_width)).replace("%height%", str(image_height))
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    base = Path(output_dir).resolve()
    if not Path(full_output_folder).resolve().is_relative_to(base):
        raise ValueError(f"Saving image outside the output folder is not allowed: {filename_prefix!r}")
    pattern = re.compile(re.escape(filename) + r"_(\d+)_")
    counter = 1
    if os.path.isdir(full_output_folder):
        numbers = [int(m.group(1)) for f in os.listdir(full_output_folder) if (m := pattern.match(f))]
        counter = max(numbers, default=0) + 1
    return full_output_folder, filename, counter, subfolder, filename_prefix

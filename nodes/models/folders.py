"""ComfyUI's model-folder layout, extra_model_paths.yaml, and safe lookup of model files by name.

Each folder key maps to an ordered list of directories and a set of file extensions (empty = any
file). Defaults live under `<base>/models/<name>`; `add_extra_paths_yaml` adds directories the
way ComfyUI's `extra_model_paths.yaml` loader does, so an existing collection is used in place.

Names coming from workflows are user input. `full_path` resolves them through
`engine.paths.contained_path`; the one relaxation is a symlink that the operator placed inside a
model folder (a lexically clean name whose link target lies elsewhere): ComfyUI follows those
and people rely on them to share model collections, so they resolve too (see `resolve_name`).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.paths import UnsafePathError, contained_path

log = logging.getLogger(__name__)

PT_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})

# key -> (default directory names under <base>/models, extensions). "folder" lists diffusers dirs.
_DEFAULT_LAYOUT: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "checkpoints": (("checkpoints",), PT_EXTENSIONS),
    "configs": (("configs",), frozenset({".yaml"})),
    "loras": (("loras",), PT_EXTENSIONS),
    "vae": (("vae",), PT_EXTENSIONS),
    "text_encoders": (("text_encoders", "clip"), PT_EXTENSIONS),
    "diffusion_models": (("unet", "diffusion_models"), PT_EXTENSIONS),
    "clip_vision": (("clip_vision",), PT_EXTENSIONS),
    "style_models": (("style_models",), PT_EXTENSIONS),
    "embeddings": (("embeddings",), PT_EXTENSIONS),
    "diffusers": (("diffusers",), frozenset({"folder"})),
    "vae_approx": (("vae_approx",), PT_EXTENSIONS),
    "controlnet": (("controlnet", "t2i_adapter"), PT_EXTENSIONS),
    "gligen": (("gligen",), PT_EXTENSIONS),
    "upscale_models": (("upscale_models",), PT_EXTENSIONS),
    "hypernetworks": (("hypernetworks",), PT_EXTENSIONS),
    "photomaker": (("photomaker",), PT_EXTENSIONS),
    "classifiers": (("classifiers",), frozenset()),
    "model_patches": (("model_patches",), PT_EXTENSIONS),
    "audio_encoders": (("audio_encoders",), PT_EXTENSIONS),
}

LEGACY_KEYS = {"clip": "text_encoders", "unet": "diffusion_models"}
SKIPPED_DIRS = frozenset({".git"})


def canonical_key(key: str) -> str:
    return LEGACY_KEYS.get(key, key)


def _check_name(name: str) -> None:
    """Lexical checks on a user-supplied relative name (before any filesystem access)."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError("empty model name")
    if "\x00" in name:
        raise UnsafePathError("path contains a NUL byte")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"absolute paths are not allowed: {name!r}")
    parts = name.replace("\\", "/").split("/")
    if any(part == ".." for part in parts):
        raise UnsafePathError(f"path escapes its directory: {name!r}")


def resolve_name(base: str | os.PathLike, name: str, follow_links: bool = True) -> Path:
    """`name` joined under `base`, resolved; raises UnsafePathError for traversal.

    `contained_path` decides first. If it refuses a name that is lexically inside `base` (no `..`,
    not absolute), the only way out was a symlink already present inside `base`; with
    `follow_links` that operator-made link is honoured, as ComfyUI does.
    """
    _check_name(name)
    try:
        return contained_path(base, name)
    except UnsafePathError:
        if not follow_links:
            raise
    lexical = Path(os.path.realpath(base)) / name
    return Path(os.path.realpath(lexical))


@dataclass
class _Folder:
    paths: list[Path]
    extensions: frozenset[str]


@dataclass
class _Listing:
    files: list[str]
    mtimes: dict[str, float]  # every walked directory -> mtime at listing time
    roots: tuple[str, ...]
    roots_present: tuple[bool, ...]


class ModelFolders:
    """Folder key -> ordered search directories, with cached recursive listings."""

    def __init__(self, base_dir: str | os.PathLike, models_dir: str | os.PathLike | None = None,
                 follow_links: bool = True) -> None:
        self.base_dir = Path(base_dir).expanduser().absolute()
        self.models_dir = Path(models_dir).absolute() if models_dir else self.base_dir / "models"
        self.follow_links = follow_links
        self._folders: dict[str, _Folder] = {}
        self._listings: dict[str, _Listing] = {}
        self._lock = threading.RLock()
        for key, (names, exts) in _DEFAULT_LAYOUT.items():
            self._folders[key] = _Folder([self.models_dir / n for n in names], exts)
        self._folders["custom_nodes"] = _Folder([self.base_dir / "custom_nodes"], frozenset())

    # ------------------------------------------------------------------ configuration
    def keys(self) -> list[str]:
        return list(self._folders)

    def paths(self, key: str) -> list[Path]:
        folder = self._folders.get(canonical_key(key))
        return list(folder.paths) if folder else []

    def extensions(self, key: str) -> frozenset[str]:
        folder = self._folders.get(canonical_key(key))
        return folder.extensions if folder else frozenset()

    def add_path(self, key: str, path: str | os.PathLike, is_default: bool = False) -> None:
        """Add a search directory; `is_default` puts it first (moving it there if already present).
        An unknown key creates a new folder type that accepts any extension."""
        key = canonical_key(key)
        path = Path(os.path.normpath(os.fspath(path)))
        with self._lock:
            folder = self._folders.get(key)
            if folder is None:
                self._folders[key] = _Folder([path], frozenset())
            elif path in folder.paths:
                if is_default and folder.paths[0] != path:
                    folder.paths.remove(path)
                    folder.paths.insert(0, path)
            elif is_default:
                folder.paths.insert(0, path)
            else:
                folder.paths.append(path)
            self._listings.pop(key, None)

    def set_folder(self, key: str, paths: Iterable[str | os.PathLike], extensions: Iterable[str]) -> None:
        """Replace a folder's directories and extensions (a custom-node pack assigning
        `folder_paths.folder_names_and_paths[key]`)."""
        key = canonical_key(key)
        with self._lock:
            self._folders[key] = _Folder([Path(os.path.normpath(os.fspath(p))) for p in paths],
                                         frozenset(e.lower() for e in extensions))
            self._listings.pop(key, None)

    def add_extra_paths_yaml(self, yaml_path: str | os.PathLike) -> None:
        """Read an extra_model_paths.yaml (ComfyUI semantics):

        every top-level section may hold `base_path` (with `~` and `$VARS` expanded, relative to the
        YAML's directory), `is_default`, and `<key>: <path>` entries where the value is one path
        or several separated by newlines (`key: |` blocks). Paths are relative to base_path, or to
        the YAML directory when a section has none.
        """
        yaml_path = Path(yaml_path).absolute()
        yaml_dir = yaml_path.parent
        with open(yaml_path, encoding="utf-8") as stream:
            config = yaml.safe_load(stream)
        if config is None:
            return
        if not isinstance(config, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of sections")
        for section_name, section in config.items():
            if not isinstance(section, dict):
                if section is not None:
                    log.warning("%s: section %r is not a mapping; skipped", yaml_path, section_name)
                continue
            section = dict(section)
            base_path: str | None = None
            if "base_path" in section:
                raw = section.pop("base_path")
                if raw is not None:
                    base_path = os.path.expandvars(os.path.expanduser(str(raw)))
                    if not os.path.isabs(base_path):
                        base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
            is_default = bool(section.pop("is_default", False))
            for key, value in section.items():
                for entry in _entries(value):
                    if base_path:
                        full = os.path.join(base_path, entry)
                    elif not os.path.isabs(entry):
                        full = os.path.abspath(os.path.join(yaml_dir, entry))
                    else:
                        full = entry
                    log.info("adding extra search path %s %s", key, os.path.normpath(full))
                    self.add_path(str(key), full, is_default)

    def load_default_yaml(self) -> bool:
        """Load `<base>/extra_model_paths.yaml` if it exists (ComfyUI does this at startup)."""
        path = self.base_dir / "extra_model_paths.yaml"
        if path.is_file():
            self.add_extra_paths_yaml(path)
            return True
        return False

    def ensure_dirs(self, keys: Iterable[str] | None = None) -> None:
        """Create the first directory of each folder key (where new files would go)."""
        for key in keys if keys is not None else self.keys():
            paths = self.paths(key)
            if paths:
                paths[0].mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ listing
    def list_files(self, key: str) -> list[str]:
        """Sorted relative names (OS separators) of the files under every directory of `key`,
        filtered by the key's extensions. Cached until a walked directory's mtime changes."""
        key = canonical_key(key)
        folder = self._folders.get(key)
        if folder is None:
            return []
        with self._lock:
            cached = self._listings.get(key)
            roots = tuple(str(p) for p in folder.paths)
            if cached is not None and self._still_valid(cached, roots):
                return list(cached.files)
        names: set[str] = set()
        mtimes: dict[str, float] = {}
        for root in folder.paths:
            if folder.extensions == {"folder"}:
                found, dirs = _walk_diffusers(root)
            else:
                found, dirs = _walk(root)
                found = [f for f in found if _ext_ok(f, folder.extensions)]
            names.update(found)
            mtimes.update(dirs)
        listing = _Listing(sorted(names), mtimes, roots, tuple(os.path.isdir(r) for r in roots))
        with self._lock:
            self._listings[key] = listing
        return list(listing.files)

    def _still_valid(self, listing: _Listing, roots: tuple[str, ...]) -> bool:
        if listing.roots != roots:
            return False
        if listing.roots_present != tuple(os.path.isdir(r) for r in roots):
            return False
        for directory, mtime in listing.mtimes.items():
            try:
                if os.path.getmtime(directory) != mtime:
                    return False
            except OSError:
                return False
        return True

    def invalidate(self, key: str | None = None) -> None:
        with self._lock:
            if key is None:
                self._listings.clear()
            else:
                self._listings.pop(canonical_key(key), None)

    # ------------------------------------------------------------------ lookup
    def full_path(self, key: str, name: str) -> Path | None:
        """The first existing file `name` in the directories of `key`, resolved (symlinks followed), or None.

        Raises UnsafePathError for a name that would leave the folder (checked before any lookup,
        so a hostile name fails the same way whether or not the target exists)."""
        found = self._find(key, name)
        return None if found is None else found[1]

    def _find(self, key: str, name: str) -> tuple[Path, Path] | None:
        """(the folder holding `name`, the resolved path) for the first match."""
        _check_name(name)
        folder = self._folders.get(canonical_key(key))
        if folder is None:
            return None
        for root in folder.paths:
            if not root.is_dir():
                continue
            path = resolve_name(root, name, follow_links=self.follow_links)
            if path.is_file() or (folder.extensions == {"folder"} and path.is_dir()):
                return root, path
            if os.path.islink(root / name):
                log.warning("%s exists but does not link anywhere; skipped", root / name)
        return None

    def require(self, key: str, name: str) -> Path:
        """The path to load `name` from: the model folder joined with the name as the workflow gave it
        (a symlink is followed when the file is opened, not here), so that every error about the file
        names what the workflow asked for rather than the link's target. A missing file is
        FileNotFoundError with the searched folders."""
        found = self._find(key, name)
        if found is None:
            searched = ", ".join(str(p) for p in self.paths(key)) or "(no folders)"
            raise FileNotFoundError(f"{key} file {name!r} not found in: {searched}")
        return found[0] / name


def _entries(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    if isinstance(value, (str, int, float)):
        return [line.strip() for line in str(value).split("\n") if line.strip()]
    log.warning("ignoring extra path entry of type %s", type(value).__name__)
    return []


def _ext_ok(name: str, extensions: frozenset[str]) -> bool:
    return not extensions or os.path.splitext(name)[1].lower() in extensions


def _walk(root: Path) -> tuple[list[str], dict[str, float]]:
    """Recursive listing that follows symlinks, skips .git, and stops at symlink loops (a directory
    whose real path is already on the current branch). Returns (relative names, dir -> mtime)."""
    if not root.is_dir():
        return [], {}
    files: list[str] = []
    mtimes: dict[str, float] = {}

    def visit(directory: str, rel: str, branch: frozenset[str]) -> None:
        try:
            mtimes[directory] = os.path.getmtime(directory)
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            child_rel = os.path.join(rel, entry.name) if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                continue
            if is_dir:
                if entry.name in SKIPPED_DIRS:
                    continue
                real = os.path.realpath(entry.path)
                if real in branch:
                    continue
                visit(entry.path, child_rel, branch | {real})
            else:
                files.append(child_rel)

    visit(str(root), "", frozenset({os.path.realpath(root)}))
    return files, mtimes


def _walk_diffusers(root: Path) -> tuple[list[str], dict[str, float]]:
    """Diffusers models are directories holding model_index.json."""
    if not root.is_dir():
        return [], {}
    found: list[str] = []
    mtimes: dict[str, float] = {str(root): os.path.getmtime(root)}
    for dirpath, subdirs, filenames in os.walk(root, followlinks=True, topdown=True):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]
        mtimes[dirpath] = os.path.getmtime(dirpath)
        if "model_index.json" in filenames and Path(dirpath) != root:
            found.append(os.path.relpath(dirpath, root))
            subdirs[:] = []  # a model's own subfolders are not separate models
    return found, mtimes

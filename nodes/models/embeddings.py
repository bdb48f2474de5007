"""Textual-inversion embeddings: find a named file in the embeddings folders and read its vectors.

Accepted layouts (all end as a `[n_vectors, dim]` float tensor):
- safetensors with `emb_params` (the common SD1/SD2 export), or `clip_l` / `clip_g` (SDXL: one
  tensor per text encoder), or any single tensor whose last dimension fits the encoder;
- `.pt` / `.bin` files read with `torch.load(weights_only=True)` only: A1111's
  `{"string_to_param": {"*": tensor}, ...}`, a bare `emb_params`, `clip_l`/`clip_g`, or a list of
  such dicts.
A pickle that needs anything beyond plain tensors and containers fails to load and is reported as
missing; nothing is ever unpickled unsafely.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from engine.paths import UnsafePathError

from .folders import resolve_name

log = logging.getLogger(__name__)

EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


def find_embedding_file(name: str, directories: Iterable[str | os.PathLike]) -> Path | None:
    """First file named `name` (as given, or with one of EMBEDDING_EXTENSIONS added) that lies
    inside one of `directories`. Names that would leave a directory are refused (None)."""
    for directory in directories:
        if not os.path.isdir(directory):
            continue
        candidates = [name] + [name + ext for ext in EMBEDDING_EXTENSIONS]
        for candidate in candidates:
            try:
                path = resolve_name(directory, candidate)
            except UnsafePathError:
                log.warning("embedding name %r refused: it leaves %s", name, directory)
                return None
            if path.is_file():
                return path
    return None


def _read_file(path: Path) -> object:
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().to(torch.float32)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    return tensor.reshape(-1, tensor.shape[-1])


def extract_vectors(data: object, dim: int, key: str | None = None) -> torch.Tensor | None:
    """Pick the vectors for an encoder of width `dim` (and SDXL key `key`, e.g. "clip_g")."""
    if isinstance(data, torch.Tensor):
        return _as_matrix(data) if data.shape[-1] == dim else None
    if isinstance(data, (list, tuple)):
        parts = [v for item in data if (v := extract_vectors(item, dim, key)) is not None]
        return torch.cat(parts, dim=0) if parts else None
    if not isinstance(data, Mapping):
        return None
    if key is not None and isinstance(data.get(key), torch.Tensor):
        found = _as_matrix(data[key])
        return found if found.shape[-1] == dim else None
    stp = data.get("string_to_param")
    if isinstance(stp, Mapping) and stp:
        value = stp.get("*", next(iter(stp.values())))
        if isinstance(value, torch.Tensor):
            found = _as_matrix(value)
            return found if found.shape[-1] == dim else None
    if isinstance(data.get("emb_params"), torch.Tensor):
        found = _as_matrix(data["emb_params"])
        return found if found.shape[-1] == dim else None
    # Unknown naming: any tensor of the right width (SDXL files hold one per encoder).
    for value in data.values():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[-1] == dim:
            return _as_matrix(value)
    return None


class EmbeddingStore:
    """Resolves `embedding:NAME` references for one text encoder width; files are cached by mtime."""

    def __init__(self,
                 directories: Iterable[str | os.PathLike] | Callable[[], Iterable[str | os.PathLike]] | None = None,
                 ) -> None:
        # A callable is re-read on every lookup, so folders added later (extra paths YAML) count.
        self._directories = directories if callable(directories) else [Path(d) for d in (directories or [])]
        self._cache: dict[tuple[str, int, int], object] = {}
        self._lock = threading.Lock()

    @property
    def directories(self) -> list[Path]:
        dirs = self._directories() if callable(self._directories) else self._directories
        return [Path(d) for d in dirs]

    def load(self, name: str, dim: int, key: str | None = None) -> torch.Tensor | None:
        """Vectors `[n, dim]` for `name`, or None (logged) when missing, unreadable or the wrong width."""
        path = find_embedding_file(name, self.directories)
        if path is None:
            return None
        data = self._read_cached(path)
        if data is None:
            return None
        vectors = extract_vectors(data, dim, key)
        if vectors is None:
            log.warning("embedding %s has no vectors of width %d (key %s); ignoring it", path.name, dim, key)
        return vectors

    def _read_cached(self, path: Path) -> object | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        cache_key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if cache_key in self._cache:
                return self._cache[cache_key]
        try:
            data = _read_file(path)
        except Exception as exc:  # a corrupt or unsafe file is a missing embedding, not a crash
            log.warning("could not read embedding %s: %s", path, exc)
            return None
        with self._lock:
            # Keep only the newest version of each file.
            for old in [k for k in self._cache if k[0] == str(path)]:
                del self._cache[old]
            self._cache[cache_key] = data
        return data

"""The one containment check for every user-supplied path (view, uploads, subfolders, widget file names,
save prefixes, model names). Resolution happens before the check, so `..`, absolute paths, encoded
separators that were decoded upstream, and symlinks that point outside all fail the same way."""
from __future__ import annotations

import os
from pathlib import Path


class UnsafePathError(ValueError):
    """A user-supplied path would leave its base directory, or is malformed."""


def contained_path(base: str | os.PathLike, *parts: str, must_exist: bool = False) -> Path:
    """Join `parts` under `base` and return the resolved path, or raise UnsafePathError.

    Every part is user input. Symlinks are resolved on both sides before the comparison, so a link
    inside `base` that points outside is refused too.
    """
    base_real = Path(os.path.realpath(base))
    for part in parts:
        if not isinstance(part, str):
            raise UnsafePathError(f"path part must be a string, got {type(part).__name__}")
        if "\x00" in part:
            raise UnsafePathError("path contains a NUL byte")
        if os.path.isabs(part) or part.startswith(("/", "\\")) or (len(part) > 1 and part[1] == ":"):
            raise UnsafePathError(f"absolute paths are not allowed: {part!r}")
    candidate = Path(os.path.realpath(os.path.join(base_real, *parts)))
    if candidate != base_real and base_real not in candidate.parents:
        raise UnsafePathError(f"path escapes its directory: {os.path.join(*parts) if parts else ''!r}")
    if must_exist and not candidate.exists():
        raise FileNotFoundError(str(candidate))
    return candidate


def is_contained(base: str | os.PathLike, *parts: str) -> bool:
    try:
        contained_path(base, *parts)
    except UnsafePathError:
        return False
    return True

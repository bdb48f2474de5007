"""Reading raw weight files into flat state dicts, without ever running untrusted pickle code.

`.safetensors`/`.sft` files are read with safetensors; the header is checked first so that a
truncated download gets a clear message instead of a low-level parse error. Pickle-based
files (`.ckpt`, `.pt`, `.pth`, `.bin`) only go through `torch.load(weights_only=True)`: a
file that needs arbitrary classes is refused, never unpickled unsafely.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch

SAFETENSORS_EXTENSIONS = frozenset({".safetensors", ".sft"})
PICKLE_EXTENSIONS = frozenset({".ckpt", ".pt", ".pth", ".bin"})
WEIGHT_EXTENSIONS = SAFETENSORS_EXTENSIONS | PICKLE_EXTENSIONS

# A safetensors header larger than this is certainly garbage (real ones are a few MB at most).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelFileError(ValueError):
    """A model file could not be used; the message names the file and says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(path, "file not found")
    if not path.is_file():
        raise ModelFileError(path, "not a file")


def _read_safetensors_header(path: Path) -> dict:
    """Parse and sanity-check the JSON header; detect truncation before safetensors does."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(path, "corrupt safetensors file: too short to hold a header")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES:
            raise ModelFileError(path, "corrupt safetensors file: invalid header length")
        if 8 + n > size:
            raise ModelFileError(path, "truncated safetensors file: header is cut off")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(path, "corrupt safetensors file: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "corrupt safetensors file: header is not a JSON object")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ModelFileError(path, f"corrupt safetensors file: bad entry for tensor {name!r}") from None
    if 8 + n + data_end > size:
        raise ModelFileError(
            path, f"truncated safetensors file: needs {8 + n + data_end} bytes, file has {size}"
        )
    return header


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file; `{}` for other formats or when absent."""
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() not in SAFETENSORS_EXTENSIONS:
        if path.suffix.lower() not in PICKLE_EXTENSIONS:
            raise ModelFileError(path, f"unknown model file extension {path.suffix!r}")
        return {}
    meta = _read_safetensors_header(path).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    _read_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise ModelFileError(path, f"corrupt safetensors file: {e}") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch reports both "class not allow-listed" and plain garbage as UnpicklingError;
        # only the former mentions a global.
        if "global" in str(e).lower():
            raise ModelFileError(
                path, "refused: needs unsafe unpickling; convert it to .safetensors"
            ) from None
        raise ModelFileError(path, "corrupt checkpoint file: cannot be unpickled as weights") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        raise ModelFileError(path, f"corrupt checkpoint file: {type(e).__name__}: {e}") from None
    # Lightning checkpoints nest the weights under "state_dict"; BasicSR's releases (RealESRGAN_x4plus.pth, SwinIR,
    # ...) under "params_ema", the EMA weights they publish, or "params".
    for key in ("state_dict", "params_ema", "params"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ModelFileError(path, f"not a state dict (holds a {type(obj).__name__})")
    # Lightning checkpoints carry counters and optimizer states next to the weights; keep tensors only.
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a weight file as `{name: cpu tensor}`. Raises ModelFileError on any problem."""
    path = Path(path)
    _check_exists(path)
    ext = path.suffix.lower()
    if ext in SAFETENSORS_EXTENSIONS:
        sd = _read_safetensors(path)
    elif ext in PICKLE_EXTENSIONS:
        sd = _read_pickle(path)
    else:
        raise ModelFileError(path, f"unknown model file extension {path.suffix!r}")
    if not sd:
        raise ModelFileError(path, "file holds no tensors")
    return sd

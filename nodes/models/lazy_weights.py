"""A safetensors file as a lazy mapping: each tensor is read from the file when first asked for, in the
dtype its model will hold.

Loading a single-file checkpoint through safetensors' memory map touches every page of the file while the
models are built, so the peak RSS was file + models. Read this way, a tensor is read straight into a
fresh (aligned) allocation and cast once; the models take those tensors as they are (`assign=True`), and
the peak is about the models plus one tensor. The file's pages stay in the page cache, not in our RSS.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .state_dict import ModelFileError, _read_safetensors_header

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


class LazySafetensors(Mapping[str, torch.Tensor]):
    """`{name: tensor}` of a safetensors file, read on access. `cast(name)` gives the dtype floating
    tensors are converted to as they are read (None: as stored)."""

    def __init__(self, path: str | Path, cast: Callable[[str], torch.dtype | None] | None = None) -> None:
        self.path = Path(path)
        header = _read_safetensors_header(self.path)
        with self.path.open("rb") as f:
            self._data_start = 8 + int.from_bytes(f.read(8), "little")
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self._cast = cast
        self._read: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: str) -> torch.Tensor:
        # Kept once read: the loaders walk the mapping several times (detection, one pass per model),
        # and the tensors kept are the ones the models take over (`assign=True`), so keeping them costs
        # no memory beyond what the models hold; it all goes with the mapping when loading ends.
        tensor = self._read.get(key)
        if tensor is None:
            tensor = self._read[key] = self._load(key)
        return tensor

    def _load(self, key: str) -> torch.Tensor:
        info = self._entries[key]
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ModelFileError(self.path, f"tensor {key!r} has an unsupported dtype {info.get('dtype')!r}")
        start, end = (int(x) for x in info["data_offsets"])
        shape = [int(n) for n in info["shape"]]
        raw = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            with self.path.open("rb", buffering=0) as f:
                f.seek(self._data_start + start)
                got = f.readinto(raw.numpy().data)
            if got != end - start:
                raise ModelFileError(self.path, f"truncated safetensors file: tensor {key!r} is cut off")
        tensor = raw.view(dtype).reshape(shape)
        target = self._cast(key) if self._cast is not None else None
        if target is not None and tensor.is_floating_point() and tensor.dtype != target:
            tensor = tensor.to(target)
        return tensor


def open_weights(path: str | Path,
                 cast: Callable[[str], torch.dtype | None] | None = None) -> Mapping[str, torch.Tensor]:
    """A lazy view of a safetensors file, or (other formats) the file read whole."""
    from .state_dict import SAFETENSORS_EXTENSIONS, read_state_dict
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_EXTENSIONS and path.is_file():
        weights = LazySafetensors(path, cast)
        if not len(weights):
            raise ModelFileError(path, "file holds no tensors")
        return weights
    return read_state_dict(path)


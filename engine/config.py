"""Where a running sdflow keeps its files, and how much memory its cache may hold."""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VRAM_MODES = ("gpu-only", "highvram", "normal", "lowvram", "novram", "cpu")


@dataclass
class RuntimeConfig:
    data_dir: Path = Path("data")
    models_dir: Path | None = None          # default: <data_dir>/models
    input_dir: Path | None = None           # default: <data_dir>/input
    output_dir: Path | None = None          # default: <data_dir>/output
    temp_dir: Path | None = None            # default: <data_dir>/temp
    user_dir: Path | None = None            # default: <data_dir>/user
    extra_model_paths: list[Path] = field(default_factory=list)
    cache_budget_bytes: dict[str, int] | None = None   # device kind ("cpu", "cuda") -> bytes; None = automatic
    preview_method: str = "latent2rgb"      # "none" | "latent2rgb"
    max_image_pixels: int | None = 64 * 1024 * 1024   # per image file (uploads, LoadImage); None = no limit
    work_budget_bytes: int | None = None    # memory one node may need (cost estimate); None = 80% of the device
    # Where models load and how much of them stays on the accelerator, with ComfyUI's switch names
    # (--gpu-only, --highvram, --normalvram, --lowvram, --novram, --cpu); see VRAM_MODES.
    vram_mode: str = "normal"
    # Speed switches of the model code (attention backend, weight dtypes), passed through unread by the
    # engine; see nodes/models/speed.py. Empty = automatic.
    speed: dict[str, Any] = field(default_factory=dict)
    # Seed CPU per-step sampler noise with the plain seed, as ComfyUI did before its PR #11528, to reproduce
    # older CPU-made images (the current rule adds 1 on the CPU); --legacy-cpu-noise-seed.
    legacy_cpu_noise_seed: bool = False

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        for name in ("models", "input", "output", "temp", "user"):
            attr = f"{name}_dir"
            value = getattr(self, attr)
            setattr(self, attr, Path(value) if value is not None else self.data_dir / name)
        self.extra_model_paths = [Path(p) for p in self.extra_model_paths]
        if self.vram_mode not in VRAM_MODES:
            raise ValueError(f"vram_mode must be one of {', '.join(VRAM_MODES)}, not {self.vram_mode!r}")

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.models_dir, self.input_dir, self.output_dir, self.temp_dir, self.user_dir):
            assert path is not None  # __post_init__ fills every directory
            path.mkdir(parents=True, exist_ok=True)


# The config of the execution running in this thread, so node code reads the directories of the executor
# that runs it (several configured environments can live in one process: tests, embedding applications).
_current: contextvars.ContextVar[RuntimeConfig | None] = contextvars.ContextVar("sdflow_config", default=None)


def current_config() -> RuntimeConfig | None:
    return _current.get()


def set_current_config(config: RuntimeConfig | None) -> contextvars.Token:
    return _current.set(config)


def reset_current_config(token: contextvars.Token) -> None:
    _current.reset(token)

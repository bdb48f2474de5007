"""Shared fixtures for the SD node tests: a configured runtime with tiny random-weight checkpoints
written in the real single-file layout, so the real loaders run (nothing is mocked, nothing downloaded)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

TINY_SD1 = "tiny-sd1.safetensors"


def activate(env) -> None:
    """Make `env`'s runtime the current one. The SD nodes read a process-wide runtime and another test
    may have configured a different data dir (building its own registry)."""
    from nodes.runtime import configure, runtime

    _, config = env
    if runtime().config is not config:
        configure(config)


@pytest.fixture(autouse=True)
def _sd_runtime_for_test(request):
    if "sd_env" in request.fixturenames:
        activate(request.getfixturevalue("sd_env"))


@pytest.fixture(scope="session")
def sd_env(tmp_path_factory):
    """(registry, RuntimeConfig) with tiny-sd1.safetensors in models/checkpoints and two input images."""
    import nodes
    from engine.config import RuntimeConfig
    from nodes.models.tiny import write_tiny_checkpoint

    data = tmp_path_factory.mktemp("sdflow-data")
    config = RuntimeConfig(data_dir=data)
    config.ensure_dirs()
    write_tiny_checkpoint(config.models_dir / "checkpoints" / TINY_SD1, "sd1", seed=0)
    write_input_images(config.input_dir)
    registry, catalog = nodes.build_registry(config, plugins=False)
    return registry, config


def write_input_images(folder: Path, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([np.tile(gradient, (size, 1)), np.tile(gradient[:, None], (1, size)),
                    rng.uniform(0, 255, (size, size))], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "example.png")
    alpha = np.full((size, size), 255, dtype=np.uint8)
    alpha[size // 4: size // 2, size // 4: size // 2] = 0          # a transparent square = the mask
    Image.fromarray(np.dstack([rgb, alpha])).save(folder / "example_masked.png")


def shrink(prompt: dict, size: int = 64, steps: int = 3) -> dict:
    """Make a real workflow cheap for CPU tests: tiny latents and few steps, same graph."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            aspect = inputs["width"] / inputs["height"]
            inputs["height"] = size
            inputs["width"] = int(round(size * aspect / 8) * 8)
        elif node["class_type"] == "LatentUpscale":
            inputs["width"], inputs["height"] = size * 3 // 2, size * 3 // 2
        elif node["class_type"] == "ConditioningSetArea":
            for key in ("width", "height", "x", "y"):
                inputs[key] = max(0 if key in ("x", "y") else 64, inputs[key] * size // 512 // 8 * 8)
        elif node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = steps
        elif node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = TINY_SD1
    return prompt

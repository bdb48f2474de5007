"""Real-shaped community workflows for the model-side nodes, in the API and the UI format as ComfyUI's
front end saves them (tests/compat/data/models): 9-channel inpainting checkpoints (SD1 and SD2, through
VAEEncodeForInpaint and InpaintModelConditioning), SDXL base + refiner, and T2I-Adapters (original
.pth through ControlNetLoader, a diffusers SDXL adapter through DiffControlNetLoader).

Every model the workflows name is installed under that name as a tiny random-weight model built with
the real diffusers/transformers classes and saved in the real file layout; the graphs run unchanged
except for smaller latents and fewer steps."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).parent / "data" / "models"
WORKFLOWS = ["sd15_inpaint_vae_encode", "sd2_inpaint_vae_encode", "sd15_inpaint_model_conditioning",
             "sdxl_base_refiner", "sd15_t2i_adapter_depth", "sdxl_t2i_adapter_canny_diff_loader"]


def _write_inputs(folder: Path, size: int = 64) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.uniform(0, 255, (size, size, 3)).astype(np.uint8)
    alpha = np.full((size, size), 255, dtype=np.uint8)
    alpha[8:40, 16:56] = 0   # the area to repaint (LoadImage's mask is 1 - alpha)
    Image.fromarray(np.dstack([rgb, alpha])).save(folder / "yosemite_inpaint_example.png")
    yy, xx = np.mgrid[0:size, 0:size]
    depth = (255 * np.exp(-((xx - 32) ** 2 + (yy - 30) ** 2) / 300.0)).astype(np.uint8)
    Image.fromarray(depth).convert("RGB").save(folder / "shark_depthmap.png")
    edges = np.zeros((size, size), dtype=np.uint8)
    edges[16, 8:56] = edges[48, 8:56] = edges[16:49, 8] = edges[16:49, 55] = 255
    Image.fromarray(edges).convert("RGB").save(folder / "canny_edges.png")


def _install_models(models: Path) -> None:
    from nodes.models.checkpoint import checkpoint_to_ldm_state_dict
    from nodes.models.t2i_adapter import diffusers_to_original
    from nodes.models.tiny import (
        tiny_checkpoint_models,
        tiny_t2i_adapter,
        write_tiny_checkpoint,
        write_tiny_t2i_adapter,
    )

    ckpts = models / "checkpoints"
    write_tiny_checkpoint(ckpts / "512-inpainting-ema.safetensors", "sd2", seed=11, inpaint=True)
    # the SD1.5 inpainting release is a pickled Lightning checkpoint ({"state_dict": ...})
    sd = checkpoint_to_ldm_state_dict(tiny_checkpoint_models("sd1", seed=12, inpaint=True))
    torch.save({"state_dict": sd, "global_step": 440000}, ckpts / "sd-v1-5-inpainting.ckpt")
    write_tiny_checkpoint(ckpts / "v1-5-pruned-emaonly.safetensors", "sd1", seed=13)
    write_tiny_checkpoint(ckpts / "sd_xl_base_1.0.safetensors", "sdxl", seed=14)
    write_tiny_checkpoint(ckpts / "sd_xl_refiner_1.0.safetensors", "sdxl_refiner", seed=15)
    # TencentARC's first adapters: original key names in a plain .pth state dict
    adapter = tiny_t2i_adapter("sd1", seed=16)
    torch.save(diffusers_to_original(adapter.state_dict(), adapter.config.num_res_blocks, False),
               models / "controlnet" / "t2iadapter_depth_sd14v1.pth")
    # the SDXL canny adapter: a diffusers folder, one input channel
    write_tiny_t2i_adapter(models / "t2i_adapter" / "t2i-adapter-canny-sdxl-1.0", "sdxl", layout="folder",
                           in_channels=1, seed=17)


@pytest.fixture(scope="module")
def compat_env(tmp_path_factory):
    import nodes
    from engine.config import RuntimeConfig

    config = RuntimeConfig(data_dir=tmp_path_factory.mktemp("compat-models"))
    config.ensure_dirs()
    for sub in ("checkpoints", "controlnet", "t2i_adapter"):
        (config.models_dir / sub).mkdir(parents=True, exist_ok=True)
    _install_models(config.models_dir)
    _write_inputs(config.input_dir)
    registry, _ = nodes.build_registry(config, plugins=False)
    return registry, config


@pytest.fixture(autouse=True)
def _active_runtime(compat_env):
    from nodes.runtime import configure, runtime

    if runtime().config is not compat_env[1]:
        configure(compat_env[1])


def _shrink(prompt: dict) -> dict:
    """Small latents and few steps; everything else as the workflow's author saved it."""
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "EmptyLatentImage":
            aspect = inputs["width"] / inputs["height"]
            inputs["height"] = 64
            inputs["width"] = max(64, int(round(64 * aspect / 32)) * 32)
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "KSamplerAdvanced":
            scale = 4 / inputs["steps"]
            inputs["steps"] = 4
            for key in ("start_at_step", "end_at_step"):
                if inputs[key] < 10000:
                    inputs[key] = int(round(inputs[key] * scale))
    return prompt


def _strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def _load(name: str) -> tuple[dict, dict]:
    return (json.loads((DATA / f"{name}_api.json").read_text()), json.loads((DATA / f"{name}.json").read_text()))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_file_is_the_same_graph_as_the_api_file(compat_env, name):
    from engine.ui_workflow import ui_to_api

    registry, _ = compat_env
    api, ui = _load(name)
    assert ui["version"] == 0.4 and ui["links"] and "ds" in ui["extra"]
    assert _strip_meta(ui_to_api(ui, registry.object_info())) == _strip_meta(api)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_unchanged_and_png_keeps_both_formats(compat_env, name):
    from engine.executor import Executor
    from engine.png_metadata import workflow_from_png
    from engine.validation import validate_prompt

    registry, config = compat_env
    api, ui = _load(name)
    assert not validate_prompt(_strip_meta(api), registry).node_errors   # full size validates as saved
    prompt = _shrink(copy.deepcopy(api))
    result = Executor(registry).execute(prompt, f"compat-{name}", extra_data={"extra_pnginfo": {"workflow": ui}})
    assert result.status == "success", result.error
    images = [img for out in result.outputs.values() for img in out.get("images", [])]
    assert images
    for img in images:
        path = config.output_dir / img["subfolder"] / img["filename"]
        workflow, saved_prompt = workflow_from_png(path)
        assert workflow == ui and saved_prompt == prompt
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert arr.std() > 0   # a real decode, not a blank frame


def test_inpainting_workflows_feed_the_nine_channel_models(compat_env):
    """The two inpainting routes on the same SD1 inpainting checkpoint reach the UNet with 9 channels."""
    from diffusers import UNet2DConditionModel

    from engine.executor import Executor

    registry, _ = compat_env
    seen = []

    def record(module, args):
        if isinstance(module, UNet2DConditionModel):
            seen.append(int(args[0].shape[1]))

    # the executor loads its own copy of the checkpoint: watch every UNet call
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        for name in ("sd15_inpaint_vae_encode", "sd15_inpaint_model_conditioning"):
            api, _ = _load(name)
            result = Executor(registry).execute(_shrink(copy.deepcopy(api)), f"nine-{name}")
            assert result.status == "success", result.error
    finally:
        hook.remove()
    assert seen and set(seen) == {9}

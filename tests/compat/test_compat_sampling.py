"""Community-shaped custom-sampling and model-patch workflows run unchanged on tiny checkpoints.

Each workflow is stored twice, in API format and in UI format as ComfyUI's front end saves it
(schema 0.4, control_after_generate values in widgets_values). The checkpoints are tiny random-weight
models of the right family written under the file names the workflows ask for, so the graphs run as
downloaded; only the image size and step counts are shrunk for the CPU.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from engine.executor import Executor
from engine.png_metadata import workflow_from_png
from engine.ui_workflow import ui_to_api

DATA = Path(__file__).parent / "data" / "sampling"
CHECKPOINTS = {"v1-5-pruned-emaonly.safetensors": ("sd1", "epsilon"),
               "sd_xl_turbo_1.0_fp16.safetensors": ("sdxl", "epsilon"),
               "v2-1_768-ema-pruned.safetensors": ("sd2", "v_prediction")}
WORKFLOWS = ["custom_advanced", "sdxl_turbo", "lcm", "freeu", "split_sigmas_dual_cfg", "zsnr_vpred_rescale",
             "perpneg_differential_inpaint"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import nodes
    from engine.config import RuntimeConfig
    from nodes.models.tiny import write_tiny_checkpoint
    from tests.nodes.conftest import write_input_images

    config = RuntimeConfig(data_dir=tmp_path_factory.mktemp("compat-sampling"))
    config.ensure_dirs()
    for name, (arch, prediction) in CHECKPOINTS.items():
        write_tiny_checkpoint(config.models_dir / "checkpoints" / name, arch, prediction_type=prediction, seed=1)
    write_input_images(config.input_dir)
    registry, _ = nodes.build_registry(config, plugins=False)
    return registry, config


@pytest.fixture(autouse=True)
def _active(env):
    # the SD nodes read a process-wide runtime; another module may have configured its own
    from nodes.runtime import configure, runtime

    if runtime().config is not env[1]:
        configure(env[1])


def load(name: str) -> tuple[dict, dict]:
    return (json.loads((DATA / f"{name}_api.json").read_text()), json.loads((DATA / f"{name}.json").read_text()))


def shrink(prompt: dict) -> dict:
    """64x64 latents and few steps: the same graph, cheap on a CPU."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = int(round(64 * inputs["width"] / inputs["height"] / 8) * 8)
            inputs["height"] = 64
        elif node["class_type"] in ("KSampler", "BasicScheduler") and inputs["steps"] > 4:
            inputs["steps"] = 3
    return prompt


def run(env, prompt: dict, ui: dict | None = None, prompt_id: str = "compat") -> list[np.ndarray]:
    registry, config = env
    extra = {"extra_pnginfo": {"workflow": ui}} if ui is not None else {}
    result = Executor(registry).execute(prompt, prompt_id, extra_data=extra)
    assert result.status == "success", result.error
    images = []
    for out in result.outputs.values():
        for img in out.get("images", []):
            base = config.output_dir if img["type"] == "output" else config.temp_dir
            path = base / img["subfolder"] / img["filename"]
            if ui is not None:
                workflow, saved_prompt = workflow_from_png(path)
                assert saved_prompt == prompt and workflow == ui
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
    assert images, "the workflow produced no image"
    return images


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_unchanged_from_ui_and_api(env, name):
    api, ui = load(name)
    registry, _ = env
    assert ui_to_api(ui, registry.object_info()) == api
    prompt = shrink(api)
    images = run(env, prompt, ui, f"compat-{name}")
    # the size of the empty latent, or of the input image (64x64) for image-to-image graphs
    latent = next((n["inputs"] for n in prompt.values() if n["class_type"] == "EmptyLatentImage"),
                  {"width": 64, "height": 64})
    for img in images:
        assert img.shape[:2] == (latent["height"], latent["width"]) and img.std() > 0


def test_sampler_custom_advanced_graph_equals_ksampler_graph(env):
    """BasicGuider + RandomNoise + KSamplerSelect + BasicScheduler gives KSampler's pixels at cfg 1."""
    api, _ = load("custom_advanced")
    prompt = shrink(api)
    custom = run(env, prompt, prompt_id="custom")
    steps = prompt["17"]["inputs"]["steps"]
    ks = copy.deepcopy(prompt)
    for key in ("13", "16", "17", "22", "25"):
        del ks[key]
    ks["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}}
    ks["3"] = {"class_type": "KSampler", "inputs": {
        "seed": api["25"]["inputs"]["noise_seed"], "steps": steps, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "simple", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
        "latent_image": ["5", 0]}}
    ks["8"]["inputs"]["samples"] = ["3", 0]
    reference = run(env, ks, prompt_id="ksampler")
    assert np.array_equal(custom[0], reference[0])


def test_split_schedule_second_pass_continues_the_first(env):
    """The two-pass graph differs from stopping after the high sigmas (the low pass really samples)."""
    api, _ = load("split_sigmas_dual_cfg")
    prompt = shrink(api)
    full = run(env, prompt, prompt_id="two-pass")
    first_only = copy.deepcopy(prompt)
    first_only["8"]["inputs"]["samples"] = ["13", 0]
    del first_only["14"], first_only["23"], first_only["26"]
    assert not np.array_equal(run(env, first_only, prompt_id="one-pass")[0], full[0])


# One workflow per family whose every saved shape runs end to end.
RUN_VARIANTS = ["custom_advanced", "zsnr_vpred_rescale", "sdxl_turbo"]  # SD1, SD2 v-prediction, SDXL


@pytest.mark.parametrize("variant", ["v1", "old", "png"])
@pytest.mark.parametrize("name", WORKFLOWS)
def test_front_end_variant_converts_to_the_api_prompt(env, name, variant):
    from tests.compat.front_end_variants import check_conversion

    check_conversion(DATA, name, variant, env[0].object_info())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_committed_front_end_variants_are_the_generators_output(env, name):
    from tests.compat.front_end_variants import check_committed_outputs

    check_committed_outputs("sampling", name, env[0].object_info())


@pytest.mark.parametrize("variant", ["v1", "old", "png"])
@pytest.mark.parametrize("name", RUN_VARIANTS)
def test_front_end_variant_runs(env, name, variant):
    from tests.compat.front_end_variants import convert

    doc, prompt = convert(DATA, name, variant, env[0].object_info())
    prompt = shrink(prompt)
    latent = next(n["inputs"] for n in prompt.values() if n["class_type"] == "EmptyLatentImage")
    for img in run(env, prompt, doc, f"variant-{name}-{variant}"):
        assert img.shape[:2] == (latent["height"], latent["width"]) and img.std() > 0

"""Real-shaped community workflows for the model-side nodes, in the API and the UI format
(tests/compat/data/model_nodes): SD2.1 unCLIP image variation (unCLIPCheckpointLoader, a pickled .ckpt as
released), SDXL "revision" with two images (CLIPVisionLoader with clip_vision_g, zeroed text, chained
unCLIPConditioning), a 3-way SD1.5 merge saved as a checkpoint (then loaded back and run), and an A1111
hypernetwork.

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

DATA = Path(__file__).parent / "data" / "model_nodes"
WORKFLOWS = ["sd21_unclip_image_variation", "sdxl_revision_two_images", "sd15_three_way_merge_save",
             "sd15_hypernetwork"]
UNCLIP_WORKFLOWS = WORKFLOWS[:2]


def _install(models: Path, inputs: Path) -> None:
    from nodes.models.checkpoint import checkpoint_to_ldm_state_dict
    from nodes.models.tiny import (
        tiny_checkpoint_models,
        write_tiny_checkpoint,
        write_tiny_clip_vision,
        write_tiny_hypernetwork,
    )

    # the SD2.1 unCLIP release is a pickled Lightning checkpoint
    sd = checkpoint_to_ldm_state_dict(tiny_checkpoint_models("sd2", seed=21, unclip=True))
    torch.save({"state_dict": sd, "global_step": 1}, models / "checkpoints" / "sd21-unclip-h.ckpt")
    write_tiny_checkpoint(models / "checkpoints" / "sd_xl_base_1.0.safetensors", "sdxl", seed=22)
    # ComfyUI's clip_vision_g.safetensors is the transformers layout
    write_tiny_clip_vision(models / "clip_vision" / "clip_vision_g.safetensors", layout="hf", seed=23)
    for seed, name in enumerate(("v1-5-pruned-emaonly.safetensors", "dreamshaper_8.safetensors",
                                 "realisticVisionV51_v51VAE.safetensors"), start=24):
        write_tiny_checkpoint(models / "checkpoints" / name, "sd1", seed=seed)
    (models / "hypernetworks").mkdir(parents=True, exist_ok=True)
    write_tiny_hypernetwork(models / "hypernetworks" / "mjv4_hypernetwork_v1.pt", seed=27)
    rng = np.random.default_rng(3)
    for name, size in (("mountains.png", (48, 80)), ("sunset.png", (72, 56))):
        Image.fromarray(rng.uniform(0, 255, (*size, 3)).astype(np.uint8)).save(inputs / name)


@pytest.fixture(scope="module")
def compat_env(tmp_path_factory):
    import nodes
    from engine.config import RuntimeConfig

    config = RuntimeConfig(data_dir=tmp_path_factory.mktemp("compat-model-nodes"))
    config.ensure_dirs()
    for sub in ("checkpoints", "clip_vision"):
        (config.models_dir / sub).mkdir(parents=True, exist_ok=True)
    _install(config.models_dir, config.input_dir)
    registry, _ = nodes.build_registry(config, plugins=False)
    return registry, config


@pytest.fixture(autouse=True)
def _active_runtime(compat_env):
    from nodes.runtime import configure, runtime

    if runtime().config is not compat_env[1]:
        configure(compat_env[1])


def _shrink(prompt: dict) -> dict:
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
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
    assert not validate_prompt(_strip_meta(api), registry).node_errors
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
            assert np.asarray(im.convert("RGB"), dtype=np.float32).std() > 0


@pytest.mark.parametrize("name", UNCLIP_WORKFLOWS)
def test_the_image_steers_the_result(compat_env, name, monkeypatch):
    """Strength 0 on every unCLIPConditioning gives a different image than the saved strengths: the image
    embedding reaches the model (class labels for unCLIP, the pooled input for SDXL)."""
    from diffusers import UNet2DConditionModel

    from engine.executor import Executor

    registry, _ = compat_env
    api, _ = _load(name)
    seen: list[tuple[str, torch.Tensor]] = []

    forward = UNet2DConditionModel.forward

    def record(module, *args, **kwargs):  # a spy: the real forward runs
        labels = kwargs.get("class_labels")
        added = kwargs.get("added_cond_kwargs") or {}
        seen.append(("labels", labels) if labels is not None else ("pooled", added["text_embeds"]))
        return forward(module, *args, **kwargs)

    outputs = []
    monkeypatch.setattr(UNet2DConditionModel, "forward", record)
    for strength in (None, 0.0):
        prompt = _shrink(copy.deepcopy(api))
        for node in prompt.values():
            if node["class_type"] == "unCLIPConditioning" and strength is not None:
                node["inputs"]["strength"] = strength
            if node["class_type"] == "SaveImage":
                node["class_type"], node["inputs"] = "PreviewImage", {"images": node["inputs"]["images"]}
        seen.clear()
        result = Executor(registry).execute(prompt, f"steer-{name}-{strength}")
        assert result.status == "success", result.error
        outputs.append([t.clone() for _, t in seen])
    with_image, without = outputs
    assert with_image and without
    # with the image some model input differs from the image-free run at the same step
    assert any(not torch.allclose(a, b) for a, b in zip(with_image, without))
    if name == "sd21_unclip_image_variation":
        assert all(t.abs().sum() == 0 for t in without)   # no image: zero class labels
        assert all(t.abs().sum() > 0 for t in with_image[:1])


def test_the_saved_merge_loads_back_as_a_checkpoint(compat_env):
    """The 3-way merge's CheckpointSave output, put in the checkpoints folder, runs in a plain txt2img
    graph and denoises exactly like the merged model did."""
    from engine.executor import Executor

    registry, config = compat_env
    api, ui = _load("sd15_three_way_merge_save")
    prompt = _shrink(copy.deepcopy(api))
    result = Executor(registry).execute(prompt, "merge-save", extra_data={"extra_pnginfo": {"workflow": ui}})
    assert result.status == "success", result.error
    saved = sorted((config.output_dir / "checkpoints").glob("threeway_merge_*_.safetensors"))[-1]
    (config.models_dir / "checkpoints" / "threeway_merge.safetensors").write_bytes(saved.read_bytes())
    reloaded = copy.deepcopy(prompt)
    for key in ("2", "3", "4", "5", "6", "7"):
        reloaded.pop(key)
    reloaded["1"]["inputs"]["ckpt_name"] = "threeway_merge.safetensors"
    reloaded["8"]["inputs"]["clip"] = reloaded["9"]["inputs"]["clip"] = ["1", 1]
    reloaded["11"]["inputs"]["model"] = ["1", 0]
    reloaded["12"]["inputs"]["vae"] = ["1", 2]
    again = Executor(registry).execute(reloaded, "merge-reload")
    assert again.status == "success", again.error

    def pixels(res):
        img = next(i for out in res.outputs.values() for i in out.get("images", []))
        with Image.open(config.output_dir / img["subfolder"] / img["filename"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(pixels(result) - pixels(again)).max() <= 1   # same weights, same image (8-bit rounding)

"""Real-shaped SD3 / SD3.5 workflows (the shapes of ComfyUI's templates and examples, API format, in
tests/compat/data/sd3): SD3 Medium with the encoders inside the checkpoint and the zeroed-negative
timestep split, SD3.5 Large with TripleCLIPLoader, Large Turbo (4 steps, cfg 1), SD3.5 Medium with
CLIPTextEncodeSD3 over a DualCLIPLoader (no T5), SD3.5 Medium with SkipLayerGuidanceSD3, SD3.5 Large
with ControlNets (LoadImage -> Canny -> ControlNetApplySD3 with the checkpoint's VAE, as ComfyUI's
SD3.5 ControlNet example; a depth map through ControlNetApplyAdvanced with a VAELoader's VAE).

Every model is installed under the name the workflow uses, as a tiny random-weight model built with the
real classes in the real file layout; the graphs run unchanged except for smaller latents and fewer steps."""
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

DATA = Path(__file__).parent / "data" / "sd3"
WORKFLOWS = ["sd3_medium_incl_clips", "sd35_large_triple_clip", "sd35_large_turbo", "sd35_medium_clip_text_encode_sd3",
             "sd35_medium_skip_layer_guidance", "sd35_large_controlnet_canny", "sd35_large_controlnet_depth_vae_loader"]


def _install_models(models: Path) -> None:
    from safetensors.torch import save_file

    from nodes.models.tiny_sd3 import (
        tiny_sd3_models,
        write_tiny_sd3_checkpoint,
        write_tiny_sd3_controlnet,
        write_tiny_sd3_encoders,
    )

    ckpts = models / "checkpoints"
    write_tiny_sd3_checkpoint(ckpts / "sd3_medium_incl_clips_t5xxlfp8.safetensors", seed=0, dtype=torch.float16,
                              fp8="t5")
    write_tiny_sd3_checkpoint(ckpts / "sd3.5_large.safetensors", sd35=True, seed=0, with_encoders=False,
                              dtype=torch.bfloat16)
    write_tiny_sd3_checkpoint(ckpts / "sd3.5_large_turbo.safetensors", sd35=True, seed=0, with_encoders=False)
    write_tiny_sd3_checkpoint(ckpts / "sd3.5_medium.safetensors", sd35=True, seed=0, with_encoders=False)
    files = write_tiny_sd3_encoders(models / "text_encoders", seed=0, dtype=torch.float16)
    for kind, name in (("l", "clip_l.safetensors"), ("g", "clip_g.safetensors"), ("t5", "t5xxl_fp16.safetensors")):
        files[kind].rename(models / "text_encoders" / name)
    write_tiny_sd3_checkpoint(ckpts / "sd3.5_large_fp8_scaled.safetensors", sd35=True, seed=0, dtype=torch.float16,
                              fp8="scaled")
    for fp8, name in (("fp8", "t5xxl_fp8_e4m3fn.safetensors"), ("scaled", "t5xxl_fp8_e4m3fn_scaled.safetensors")):
        write_tiny_sd3_encoders(models / "text_encoders", seed=0, fp8=fp8)["t5"].rename(models / "text_encoders" / name)
    # Stability's SD3.5 Large ControlNets: their single-file layout with the control_type marker
    for control_type, name in ((1, "canny"), (2, "depth")):
        write_tiny_sd3_controlnet(models / "controlnet" / f"sd3.5_large_controlnet_{name}.safetensors",
                                  seed=20 + control_type, control_type=control_type, dtype=torch.float16)
    # the SD3.5 VAE as a separate file, under diffusers names (the repository's vae/ weights)
    save_file({k: v.contiguous() for k, v in tiny_sd3_models(sd35=True)["vae"].state_dict().items()},
              str(models / "vae" / "sd35_vae.safetensors"))


def _write_inputs(folder: Path, size: int = 96) -> None:
    yy, xx = np.mgrid[0:size, 0:size]
    cabin = np.zeros((size, size, 3), dtype=np.uint8)                # a night scene: strong edges
    cabin[40:80, 20:76] = (230, 200, 160)                            # walls
    cabin[(yy < 40) & (yy > 12) & (np.abs(xx - 48) < (yy - 12) * 1.1)] = (255, 255, 255)   # roof
    cabin[52:64, 30:42] = cabin[52:64, 54:66] = (0, 0, 0)            # windows
    Image.fromarray(cabin).save(folder / "cabin_controlnet_input.png")
    depth = (255 * np.exp(-((xx - 48) ** 2 + (yy - 44) ** 2) / 500.0)).astype(np.uint8)
    Image.fromarray(depth).convert("RGB").save(folder / "shark_depthmap.png")


@pytest.fixture(scope="module")
def compat_env(tmp_path_factory):
    import nodes
    from engine.config import RuntimeConfig

    config = RuntimeConfig(data_dir=tmp_path_factory.mktemp("compat-sd3"))
    config.ensure_dirs()
    for sub in ("checkpoints", "text_encoders", "controlnet", "vae"):
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
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "EmptySD3LatentImage":
            aspect = inputs["width"] / inputs["height"]
            inputs["height"] = 64
            inputs["width"] = max(64, int(round(64 * aspect / 16)) * 16)
        elif kind == "KSampler":
            inputs["steps"] = min(inputs["steps"], 3)
    return prompt


def _image_path(config, img: dict) -> Path:
    """Where an output entry's file is: SaveImage's in the output folder, PreviewImage's in temp."""
    folder = config.temp_dir if img.get("type") == "temp" else config.output_dir
    return folder / img["subfolder"] / img["filename"]


def _load(name: str) -> dict:
    return json.loads((DATA / f"{name}_api.json").read_text())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_sd3_workflow_runs_unchanged(compat_env, name):
    from engine.executor import Executor
    from engine.validation import validate_prompt

    registry, config = compat_env
    api = _load(name)
    assert not validate_prompt(api, registry).node_errors   # full size validates as saved
    result = Executor(registry).execute(_shrink(copy.deepcopy(api)), f"compat-{name}")
    assert result.status == "success", result.error
    images = [img for out in result.outputs.values() for img in out.get("images", [])]
    assert images
    for img in images:
        with Image.open(_image_path(config, img)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert arr.std() > 0


def test_checkpoint_without_encoders_points_at_triple_clip_loader(compat_env):
    from engine.executor import Executor

    registry, _ = compat_env
    api = _shrink(_load("sd35_large_triple_clip"))
    for node_id in ("16", "40"):
        api[node_id]["inputs"]["clip"] = ["4", 1]
    del api["11"]
    result = Executor(registry).execute(api, "compat-missing-clip")
    assert result.status == "error"
    assert "TripleCLIPLoader" in str(result.error) and "sd3.5_large.safetensors" in str(result.error)


@pytest.mark.parametrize("t5_name", ["t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"])
def test_triple_clip_loader_takes_fp8_t5_files(compat_env, t5_name):
    """The SD3.5 Large template with ComfyUI's fp8 T5 files in place of t5xxl_fp16."""
    from engine.executor import Executor

    registry, config = compat_env
    api = _shrink(_load("sd35_large_triple_clip"))
    api["11"]["inputs"]["clip_name3"] = t5_name
    result = Executor(registry).execute(api, f"compat-{t5_name}")
    assert result.status == "success", result.error
    [image] = _saved_images(config, result)
    assert image.std() > 0


def test_t5_in_the_wrong_slot_is_named(compat_env):
    from engine.executor import Executor

    registry, _ = compat_env
    api = _shrink(_load("sd35_large_triple_clip"))
    api["11"]["inputs"]["clip_name3"] = "clip_l.safetensors"
    result = Executor(registry).execute(api, "compat-two-clip-l")
    assert result.status == "error" and "two clip_l files" in str(result.error)


def _saved_images(config, result) -> list[np.ndarray]:
    out = []
    for node in result.outputs.values():
        for img in node.get("images", []):
            if img.get("type") == "temp":
                continue
            with Image.open(_image_path(config, img)) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    return out


def test_controlnet_strength_changes_the_image_and_zero_is_no_control(compat_env):
    """The canny ControlNet workflow at its strength, at 0, and with the ControlNet node bypassed
    (conditionings wired straight to the sampler): 0 equals no ControlNet, 0.75 differs."""
    from engine.executor import Executor

    registry, config = compat_env
    runs = {}
    for label, strength in (("on", 0.75), ("zero", 0.0), ("off", None)):
        api = _shrink(_load("sd35_large_controlnet_canny"))
        if strength is None:
            api["3"]["inputs"]["positive"], api["3"]["inputs"]["negative"] = ["6", 0], ["71", 0]
            del api["30"]
        else:
            api["30"]["inputs"]["strength"] = strength
        result = Executor(registry).execute(api, f"compat-cn-{label}")
        assert result.status == "success", result.error
        [runs[label]] = _saved_images(config, result)
    assert np.array_equal(runs["zero"], runs["off"])
    assert float(np.abs(runs["on"] - runs["off"]).max()) > 8


def test_sd3_controlnet_without_a_vae_names_the_node_and_input(compat_env):
    from engine.executor import Executor

    registry, _ = compat_env
    api = _shrink(_load("sd35_large_controlnet_depth_vae_loader"))
    del api["30"]["inputs"]["vae"]
    result = Executor(registry).execute(api, "compat-cn-no-vae")
    assert result.status == "error"
    assert "ControlNetApplyAdvanced" in str(result.error) and "'vae'" in str(result.error)


RUN_VARIANTS = ["sd3_medium_incl_clips", "sd35_large_turbo", "sd35_large_controlnet_canny"]  # SD3, SD3.5


@pytest.mark.parametrize("variant", ["ui", "v1", "old", "png"])
@pytest.mark.parametrize("name", WORKFLOWS)
def test_front_end_variant_converts_to_the_api_prompt(compat_env, name, variant):
    from tests.compat.front_end_variants import check_conversion

    check_conversion(DATA, name, variant, compat_env[0].object_info())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_committed_front_end_variants_are_the_generators_output(compat_env, name):
    from tests.compat.front_end_variants import check_committed_outputs

    check_committed_outputs("sd3", name, compat_env[0].object_info())


@pytest.mark.parametrize("variant", ["ui", "v1", "old", "png"])
@pytest.mark.parametrize("name", RUN_VARIANTS)
def test_front_end_variant_runs(compat_env, name, variant):
    from engine.executor import Executor
    from tests.compat.front_end_variants import convert

    registry, config = compat_env
    doc, prompt = convert(DATA, name, variant, registry.object_info())
    prompt = _shrink(prompt)
    latent = next(n["inputs"] for n in prompt.values() if n["class_type"] == "EmptySD3LatentImage")
    result = Executor(registry).execute(prompt, f"variant-{name}-{variant}",
                                        extra_data={"extra_pnginfo": {"workflow": doc}})
    assert result.status == "success", result.error
    images = [img for out in result.outputs.values() for img in out.get("images", [])]
    assert images
    for img in images:
        with Image.open(_image_path(config, img)) as im:
            if img.get("type") != "temp":   # previews (the Canny hint) keep the input image's size
                assert im.size == (latent["width"], latent["height"])
            assert np.asarray(im.convert("RGB"), dtype=np.float32).std() > 0


@pytest.mark.parametrize("name", ["sd3_medium_incl_clips", "sd35_large_turbo"])
def test_executor_previews_16_channel_latents(compat_env, name):
    """KSampler's latent2rgb previews through the executor, as a watching browser gets them: one per step,
    at 1/8 of the image, made with SD3's 16-channel factors (an SD1 mapping would refuse 16 channels): with
    euler the last one is the sampled latent's own preview."""
    from safetensors.torch import load_file

    from engine.executor import Executor
    from nodes.sampling.preview import latent_to_rgb_tensor

    registry, config = compat_env
    api = _shrink(_load(name))
    ks = next(k for k, n in api.items() if n["class_type"] == "KSampler")
    api[ks]["inputs"]["sampler_name"] = "euler"   # its last step lands on the last denoised estimate
    api["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [ks, 0], "filename_prefix": f"latents/{name}"}}
    events: list = []
    result = Executor(registry).execute(api, f"compat-previews-{name}", emit=events.append)
    assert result.status == "success", result.error
    previews = [e.image for e in events if e.type == "preview"]
    latent = next(n["inputs"] for n in api.values() if n["class_type"] == "EmptySD3LatentImage")
    assert len(previews) == api[ks]["inputs"]["steps"]
    for image in previews:
        assert image.mode == "RGB" and image.size == (latent["width"] // 8, latent["height"] // 8)
    [saved] = result.outputs["900"]["latents"]
    raw = load_file(str(config.output_dir / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    assert raw.shape[1] == 16
    want = latent_to_rgb_tensor((raw - 0.0609) * 1.5305, "sd3").numpy().astype(np.int16)  # model space
    got = np.asarray(previews[-1], dtype=np.int16)
    assert got.std() > 0 and int(np.abs(got - want).max()) <= 1

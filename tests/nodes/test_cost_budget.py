"""The pre-run memory estimate: prompts that cannot fit the device budget are refused at validation with
a node error naming the node and the inputs its size comes from; normal prompts pass."""
from __future__ import annotations

import pytest

from engine.cost import work_budget
from engine.validation import validate_prompt

from .conftest import TINY_SD1

GB = 1 << 30


def txt2img(width=512, height=512, batch=1, scale=None) -> dict:
    p = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 8.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    if scale:
        p["10"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["8", 0], "upscale_method": "bilinear",
                                                             "scale_by": scale}}
        p["9"]["inputs"]["images"] = ["10", 0]
    return p


def cost_errors(vr) -> dict[str, dict]:
    return {nid: e for nid, entry in vr.node_errors.items() for e in entry["errors"]
            if e["type"] == "cost_over_budget"}


def test_ordinary_prompt_fits(sd_env):
    registry, _ = sd_env
    vr = validate_prompt(txt2img(), registry, budget_bytes=8 * GB)
    assert vr.ok and not cost_errors(vr), vr.node_errors


@pytest.mark.parametrize("size, batch, node, inputs", [
    (16384, 1, "3", ["latent_image"]),      # a 16384^2 sample: the sampler cannot hold its activations
    (512, 4096, "3", ["latent_image"]),     # batch 4096
])
def test_huge_sizes_are_refused_naming_node_and_input(sd_env, size, batch, node, inputs):
    registry, _ = sd_env
    vr = validate_prompt(txt2img(size, size, batch), registry, budget_bytes=8 * GB)
    assert not vr.ok
    errors = cost_errors(vr)
    assert node in errors, vr.node_errors
    err = errors[node]
    assert err["extra_info"]["inputs"] == inputs and err["extra_info"]["budget_bytes"] == 8 * GB
    assert err["extra_info"]["estimated_bytes"] > 8 * GB
    assert "KSampler would need about" in err["details"] and "8.0 GiB" in err["details"]
    assert vr.node_errors[node]["dependent_outputs"] == ["9"]


def test_decode_and_scale_are_estimated_from_upstream_sizes(sd_env):
    registry, _ = sd_env
    p = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4096, "height": 4096, "batch_size": 4, "color": 0}},
         "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                        "scale_by": 8.0}},
         "10": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                       "width": 64, "height": 64, "crop": "disabled"}},
         "9": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}}
    vr = validate_prompt(p, registry, budget_bytes=8 * GB)
    errors = cost_errors(vr)
    assert list(errors) == ["2"], vr.node_errors          # the 4096^2 image fits; 8x of it does not
    assert errors["2"]["extra_info"]["input_name"] == "scale_by" and "scale_by=8.0" in errors["2"]["details"]
    p["2"]["inputs"]["scale_by"] = 1.5
    p["10"]["inputs"]["width"] = 40000                    # over the widget max: a value error, not a cost
    vr = validate_prompt(p, registry, budget_bytes=8 * GB)
    assert not cost_errors(vr)
    p["10"]["inputs"]["width"] = 16384
    p["10"]["inputs"]["height"] = 16384
    vr = validate_prompt(p, registry, budget_bytes=8 * GB)
    errors = cost_errors(vr)
    assert list(errors) == ["10"] and errors["10"]["extra_info"]["inputs"] == ["width", "height"]
    assert "width=16384, height=16384" in errors["10"]["details"]
    assert validate_prompt(txt2img(1024, 1024, 1, scale=2.0), registry, budget_bytes=4 * GB).ok


def test_decode_alone_is_refused_when_the_batch_output_cannot_fit(sd_env):
    registry, _ = sd_env
    p = txt2img(512, 512, 64)
    p["8"]["inputs"]["samples"] = ["5", 0]             # decode the empty latent directly
    vr = validate_prompt(p, registry, budget_bytes=512 << 20)
    errors = cost_errors(vr)
    assert "8" in errors and errors["8"]["extra_info"]["inputs"] == ["samples"]


def test_budget_comes_from_the_config(sd_env):
    _, config = sd_env
    old = config.work_budget_bytes
    try:
        config.work_budget_bytes = 123 << 20
        assert work_budget(config) == 123 << 20
        config.work_budget_bytes = None
        assert work_budget(config) > 1 << 30               # 80% of this machine's memory
    finally:
        config.work_budget_bytes = old

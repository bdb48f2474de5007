"""Deeply nested prompt weights are refused up front, naming the node and input, and never recurse."""
from __future__ import annotations

import pytest

from engine.validation import validate_prompt
from nodes.models.prompt_weights import MAX_NESTING, PromptTooDeep, nesting_depth, parse_prompt_weights

from .conftest import TINY_SD1


def test_depth_is_counted_without_escapes():
    assert nesting_depth("((a) (b)) \\(\\(\\(") == 2
    assert nesting_depth(")))(((") == 3
    assert parse_prompt_weights("(" * MAX_NESTING + "x" + ")" * MAX_NESTING)[0][0] == "x"


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 5000, 200_000])
def test_too_deep_raises_a_clear_error(depth):
    with pytest.raises(PromptTooDeep, match=f"{depth} levels deep"):
        parse_prompt_weights("(" * depth + "cat" + ")" * depth)


def encode_prompt(text) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["6", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def test_validation_refuses_deep_nesting_naming_node_and_input(sd_env):
    registry, _ = sd_env
    vr = validate_prompt(encode_prompt("(" * 5000 + "cat" + ")" * 5000), registry)
    assert not vr.ok
    err = vr.node_errors["6"]["errors"][0]
    assert err["type"] == "custom_validation_failed" and err["extra_info"]["input_name"] == "text"
    assert "5000 levels deep" in err["details"]
    assert validate_prompt(encode_prompt("a ((cat)) (dog:1.2)"), registry).ok
    assert validate_prompt(encode_prompt(42), registry).ok             # a number is taken as text
    vr = validate_prompt(encode_prompt({"x": 1}), registry)
    assert "text must be a string" in vr.node_errors["6"]["errors"][0]["details"]

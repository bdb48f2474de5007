"""CheckpointLoader (config_name + ckpt_name): shipped config names listed, v-prediction and clip skip
honoured, user configs in models/configs read."""
from __future__ import annotations

import torch

from engine.executor import Executor
from nodes.loaders import checkpoint_loader, checkpoint_loader_simple

from .conftest import TINY_SD1


def test_config_combo_and_what_is_honoured(sd_env):
    registry, config = sd_env
    choices = registry.object_info()["CheckpointLoader"]["input"]["required"]["config_name"][0]
    assert "v1-inference.yaml" in choices and "v2-inference-v.yaml" in choices
    plain_model, plain_clip, _ = checkpoint_loader_simple(TINY_SD1)
    model, clip, _ = checkpoint_loader("v1-inference.yaml", TINY_SD1)
    assert model.prediction_type == plain_model.prediction_type == "epsilon" and clip.layer_idx is None
    assert checkpoint_loader("v2-inference-v.yaml", TINY_SD1)[0].prediction_type == "v_prediction"
    skip = checkpoint_loader("v1-inference_clip_skip_2.yaml", TINY_SD1)[1]
    assert skip.layer_idx == -2
    assert not torch.allclose(skip.encode_text("a dog")[0][0], plain_clip.encode_text("a dog")[0][0])

    (config.models_dir / "configs").mkdir(parents=True, exist_ok=True)
    (config.models_dir / "configs" / "my-v.yaml").write_text(
        "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: \"v\"\n"
        "    cond_stage_config:\n      params:\n        layer: penultimate\n")
    assert "my-v.yaml" in registry.object_info()["CheckpointLoader"]["input"]["required"]["config_name"][0]
    model, clip, _ = checkpoint_loader("my-v.yaml", TINY_SD1)
    assert model.prediction_type == "v_prediction" and clip.layer_idx == -2


def test_old_workflow_runs(sd_env):
    registry, _ = sd_env
    prompt = {"1": {"class_type": "CheckpointLoader", "inputs": {"config_name": "v1-inference.yaml",
                                                                 "ckpt_name": TINY_SD1}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["1", 1]}},
              "3": {"class_type": "KSampler", "inputs": {
                  "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                  "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["4", 0]}},
              "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "5": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
              "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}
    assert Executor(registry).execute(prompt, "ckpt-config").status == "success"
    prompt["1"]["inputs"]["config_name"] = "nonexistent.yaml"
    from engine.validation import validate_prompt

    assert "1" in validate_prompt(prompt, registry).node_errors

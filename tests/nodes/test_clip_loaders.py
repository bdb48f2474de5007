"""CLIPLoader / DualCLIPLoader: separate text-encoder files in the transformers and the OpenCLIP layouts
give the same conditioning as the checkpoint they came from."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.executor import Executor
from nodes.loaders import checkpoint_loader_simple, clip_loader, dual_clip_loader
from nodes.models import ldm_keys
from nodes.models.checkpoint import clip_file_state_dict
from nodes.models.tiny import write_tiny_checkpoint

from .conftest import TINY_SD1, activate

TINY_XL = "tiny-sdxl-base.safetensors"


@pytest.fixture(scope="module")
def encoder_files(sd_env):
    activate(sd_env)
    _, config = sd_env
    if not (config.models_dir / "checkpoints" / TINY_XL).exists():
        write_tiny_checkpoint(config.models_dir / "checkpoints" / TINY_XL, "sdxl", seed=4)
    root = config.models_dir / "text_encoders"
    root.mkdir(parents=True, exist_ok=True)
    sd1_clip = checkpoint_loader_simple(TINY_SD1)[1]
    xl_clip = checkpoint_loader_simple(TINY_XL)[1]
    l_sd = {k: v.contiguous() for k, v in clip_file_state_dict(sd1_clip.text_encoders["l"]).items()}
    save_file(l_sd, str(root / "clip_l_sd1.safetensors"))                     # ComfyUI's clip_l layout
    save_file({"transformer." + k: v for k, v in l_sd.items()}, str(root / "clip_l_prefixed.safetensors"))
    xl_l = {k: v.contiguous() for k, v in clip_file_state_dict(xl_clip.text_encoders["l"]).items()}
    xl_g = {k: v.contiguous() for k, v in clip_file_state_dict(xl_clip.text_encoders["g"]).items()}
    save_file(xl_l, str(root / "clip_l.safetensors"))
    save_file(xl_g, str(root / "clip_g.safetensors"))
    # the OpenCLIP export of G (open_clip_pytorch_model.bin layout)
    torch.save(ldm_keys.hf_to_openclip(xl_g, ""), root / "open_clip_g.bin")
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32)},
              str(root / "a-lora.safetensors"))
    return sd1_clip, xl_clip


def _cond(clip, text="a red bicycle"):
    cond, opts = clip.encode_text(text)[0]
    return cond, opts["pooled_output"]


@pytest.mark.parametrize("name", ["clip_l_sd1.safetensors", "clip_l_prefixed.safetensors"])
def test_clip_loader_matches_the_checkpoint(encoder_files, name):
    sd1_clip, _ = encoder_files
    clip = clip_loader(name, "stable_diffusion")
    assert clip.arch == "sd1"
    for a, b in zip(_cond(clip), _cond(sd1_clip)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("first,second", [("clip_l.safetensors", "clip_g.safetensors"),
                                          ("clip_g.safetensors", "clip_l.safetensors"),
                                          ("clip_l.safetensors", "open_clip_g.bin")])
def test_dual_clip_loader_matches_the_sdxl_checkpoint(encoder_files, first, second):
    _, xl_clip = encoder_files
    clip = dual_clip_loader(first, second, "sdxl")
    assert clip.arch == "sdxl"
    for a, b in zip(_cond(clip), _cond(xl_clip)):
        torch.testing.assert_close(a, b)


def test_wrong_files_are_refused(sd_env, encoder_files):
    registry, _ = sd_env
    with pytest.raises(ValueError, match="second CLIP-L"):
        dual_clip_loader("clip_l.safetensors", "clip_l_sd1.safetensors", "sdxl")
    with pytest.raises(ValueError, match="DualCLIPLoader"):
        clip_loader("clip_g.safetensors", "stable_diffusion")
    prompt = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "a-lora.safetensors",
                                                           "type": "stable_diffusion"}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["1", 0]}},
              "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}}}
    info = registry.object_info()
    assert info["CLIPLoader"]["input"]["optional"]["device"][0] == ["default", "cpu"]
    prompt["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}}
    prompt["5"] = {"class_type": "KSampler", "inputs": {
        "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["6", 0]}}
    prompt["6"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}}
    prompt["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}
    result = Executor(registry).execute(prompt, "clip-lora")
    assert result.status == "error" and result.error["node_id"] == "1", result.error
    msg = result.error["exception_message"]
    assert "CLIPLoader" in msg and "clip_name" in msg and "a-lora.safetensors" in msg and "a LoRA" in msg
    assert "expected a CLIP text encoder" in msg

"""The loaders ComfyUI's front end needs in /object_info: UNETLoader (bare UNet files in LDM and diffusers
layout, fp8 weight dtypes) and ImageOnlyCheckpointLoader (GLIGENLoader: test_gligen.py). Real tiny
models written in the real file layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.executor import Executor
from nodes.loaders import checkpoint_loader_simple, image_only_checkpoint_loader, unet_loader
from nodes.models.ldm_keys import UNET_PREFIX
from nodes.models.tiny import tiny_checkpoint_models

from .conftest import TINY_SD1


@pytest.fixture(scope="module")
def unet_files(sd_env):
    """The tiny checkpoint's UNet as bare files: LDM with prefix, LDM without, diffusers layout."""
    _, config = sd_env
    folder = config.models_dir / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(config.models_dir / "checkpoints" / TINY_SD1))
    unet = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    save_file(unet, str(folder / "ldm-prefixed.safetensors"))
    save_file({k[len(UNET_PREFIX):]: v for k, v in unet.items()}, str(folder / "ldm-bare.safetensors"))
    diff = tiny_checkpoint_models("sd1", seed=0).unet.state_dict()
    (folder / "sub").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in diff.items()}, str(folder / "sub" / "diffusers.safetensors"))
    return ["ldm-prefixed.safetensors", "ldm-bare.safetensors", "sub/diffusers.safetensors"]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_unet_loader_reads_every_layout_into_the_checkpoints_unet(sd_env, unet_files):
    reference = checkpoint_loader_simple(TINY_SD1)[0]
    for name in unet_files:
        model = unet_loader(name, "default")
        assert model.arch == "sd1" and model.prediction_type == "epsilon", name
        _same_weights(model.unet, reference.unet)


def test_unet_loader_in_a_prompt_samples_like_the_checkpoint(sd_env, unet_files):
    registry, config = sd_env

    def prompt(model_ref):
        return {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
            "10": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_files[2], "weight_dtype": "default"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
            "3": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                                       "scheduler": "normal", "denoise": 1.0, "model": model_ref,
                                                       "positive": ["6", 0], "negative": ["6", 0],
                                                       "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        }

    images = []
    for ref in (["4", 0], ["10", 0]):
        result = Executor(registry).execute(prompt(ref), "p")
        assert result.status == "success", result.messages
        info = result.outputs["9"]["images"][0]
        with Image.open(config.temp_dir / info["subfolder"] / info["filename"]) as img:
            images.append(np.asarray(img.convert("RGB")))
    assert np.array_equal(images[0], images[1])   # PNG bytes differ: each embeds its own prompt


@pytest.mark.parametrize("weight_dtype,fp8", [("fp8_e4m3fn", torch.float8_e4m3fn),
                                              ("fp8_e4m3fn_fast", torch.float8_e4m3fn),
                                              ("fp8_e5m2", torch.float8_e5m2)])
def test_unet_loader_fp8_weights_lie_on_the_fp8_grid(sd_env, unet_files, weight_dtype, fp8):
    exact = unet_loader(unet_files[0], "default").unet.state_dict()
    rounded = unet_loader(unet_files[0], weight_dtype).unet.state_dict()
    changed = 0
    for k, v in rounded.items():
        assert torch.equal(v, v.to(fp8).to(v.dtype)), k
        assert torch.equal(v, exact[k].to(fp8).to(v.dtype)), k
        changed += not torch.equal(v, exact[k])
    assert changed > 0


def test_unet_loader_refuses_a_file_that_is_no_unet(sd_env):
    _, config = sd_env
    bad = config.models_dir / "diffusion_models" / "not-a-unet.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="not a Stable Diffusion UNet"):
        unet_loader("not-a-unet.safetensors", "default")


def test_image_only_checkpoint_loader(sd_env):
    model, clip_vision, vae = image_only_checkpoint_loader(TINY_SD1)
    ref_model, _, ref_vae = checkpoint_loader_simple(TINY_SD1)
    _same_weights(model.unet, ref_model.unet)
    _same_weights(vae.vae, ref_vae.vae)
    with pytest.raises(NotImplementedError, match="holds no CLIP vision tower"):
        clip_vision.encode_image(torch.zeros(1, 8, 8, 3))


def test_image_only_checkpoint_loader_in_a_prompt(sd_env):
    registry, _ = sd_env
    prompt = {
        "1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": TINY_SD1}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    result = Executor(registry).execute(prompt, "p")
    assert result.status == "success", result.messages     # the cache holds the CLIP_VISION stand-in too
    assert result.outputs["4"]["images"]

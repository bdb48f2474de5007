"""ImageOnlyCheckpointLoader's CLIP_VISION: the vision tower inside an image-conditioned checkpoint (SVD's
`conditioner.embedders.0.open_clip.model.visual.*` layout), parity with transformers' vision tower on the
same weights, use with CLIPVisionEncode and unCLIPConditioning in a prompt, and the clear error when the
checkpoint holds no tower. Tiny real checkpoints written in the real key layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.executor import Executor
from nodes.conditioning import clip_vision_encode, unclip_conditioning
from nodes.loaders import image_only_checkpoint_loader, unclip_checkpoint_loader
from nodes.models import clip_vision as cv
from nodes.models.tiny import tiny_checkpoint_models, write_tiny_checkpoint

from .conftest import TINY_SD1, activate

UNCLIP = "tiny-sd21-unclip-h.safetensors"
SVD_STYLE = "tiny-img2vid-svd-layout.safetensors"
SVD_PREFIX = "conditioner.embedders.0.open_clip.model.visual."
UNCLIP_PREFIX = "embedder.model.visual."


@pytest.fixture(scope="module")
def svd_style(sd_env):
    """The tiny unCLIP checkpoint with its vision tower moved to where SVD checkpoints keep theirs."""
    activate(sd_env)
    _, config = sd_env
    folder = config.models_dir / "checkpoints"
    if not (folder / UNCLIP).exists():
        write_tiny_checkpoint(folder / UNCLIP, "sd2", seed=8, unclip=True, prediction_type="v_prediction")
    sd = load_file(str(folder / UNCLIP))
    assert any(k.startswith(UNCLIP_PREFIX) for k in sd)
    moved = {(SVD_PREFIX + k[len(UNCLIP_PREFIX):] if k.startswith(UNCLIP_PREFIX) else k): v for k, v in sd.items()}
    save_file(moved, str(folder / SVD_STYLE), metadata={"sdflow.random_weights": "true"})
    return folder / SVD_STYLE


def _image(h=40, w=60, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_vision_tower_matches_transformers_on_the_same_weights(svd_style):
    from transformers import CLIPVisionModelWithProjection

    _, vision, _ = image_only_checkpoint_loader(SVD_STYLE)
    weights = tiny_checkpoint_models("sd2", seed=8, unclip=True).extras["clip_vision"]
    ref = CLIPVisionModelWithProjection(vision.model.config)
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    ref.eval()
    for key, value in weights.items():
        assert torch.equal(vision.model.state_dict()[key], value), key
    image = _image(seed=4)
    out = clip_vision_encode(vision, image, "center")
    with torch.no_grad():
        want = ref(pixel_values=cv.clip_preprocess(image, vision.image_size), output_hidden_states=True)
    torch.testing.assert_close(out.image_embeds, want.image_embeds)
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state)
    torch.testing.assert_close(out.penultimate_hidden_states, want.hidden_states[-2])


def test_model_and_vae_are_the_checkpoints(svd_style):
    model, vision, vae = image_only_checkpoint_loader(SVD_STYLE)
    ref_model, _, ref_vae, ref_vision = unclip_checkpoint_loader(UNCLIP)
    for a, b in ((model.unet, ref_model.unet), (vae.vae, ref_vae.vae), (vision.model, ref_vision.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    cond = [[torch.zeros(1, 4, 8), {}]]
    entries = unclip_conditioning(cond, clip_vision_encode(vision, _image(), "none"), 0.8, 0.0)[0][1]
    assert entries["unclip_conditioning"][0]["strength"] == 0.8


def _prompt(vision_loader: dict, vision_ref: list) -> dict:
    return {
        "1": vision_loader,
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": UNCLIP}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "image_only_example.png"}},
        "4": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": vision_ref, "image": ["3", 0],
                                                           "crop": "center"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["2", 1]}},
        "6": {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["5", 0], "clip_vision_output": ["4", 0],
                                                             "strength": 1.0, "noise_augmentation": 0.1}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["2", 2]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }


def test_in_a_prompt_it_samples_like_the_unclip_loader(sd_env, svd_style):
    registry, config = sd_env
    from PIL import Image

    Image.new("RGB", (40, 32), (200, 60, 30)).save(config.input_dir / "image_only_example.png")
    svd = _prompt({"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": SVD_STYLE}}, ["1", 1])
    unclip = _prompt({"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": UNCLIP}}, ["1", 3])
    images = []
    for prompt in (svd, unclip):
        executor = Executor(registry)
        result = executor.execute(prompt, "p")
        assert result.status == "success", result.messages
        (preview,) = result.outputs["11"]["images"]
        with Image.open(config.temp_dir / preview.get("subfolder", "") / preview["filename"]) as im:
            images.append(np.asarray(im.convert("RGB")).astype(int))
    # the same weights under either prefix: the same picture, to 8-bit rounding
    assert images[0].shape == (64, 64, 3) and np.abs(images[0] - images[1]).max() <= 1
    info = registry.node_info("ImageOnlyCheckpointLoader")
    assert info["output"] == ["MODEL", "CLIP_VISION", "VAE"]
    assert SVD_STYLE in info["input"]["required"]["ckpt_name"][0]


def test_without_a_vision_tower_the_clip_vision_output_fails_clearly(sd_env):
    registry, config = sd_env
    from PIL import Image

    model, vision, vae = image_only_checkpoint_loader(TINY_SD1)  # MODEL and VAE still come (ComfyUI)
    assert model.arch == "sd1" and vae is not None
    with pytest.raises(NotImplementedError, match="no CLIP vision tower"):
        clip_vision_encode(vision, _image(), "center")
    Image.new("RGB", (40, 32), (10, 60, 30)).save(config.input_dir / "image_only_example.png")
    prompt = _prompt({"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": TINY_SD1}}, ["1", 1])
    prompt["2"]["inputs"]["ckpt_name"] = TINY_SD1
    result = Executor(registry).execute(prompt, "p")
    assert result.status == "error"
    text = str(result.messages)
    assert "CLIPVisionEncode" in text and "no CLIP vision tower" in text and TINY_SD1 in text

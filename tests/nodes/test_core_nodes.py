"""The core SD nodes one by one, called through the executor or directly (a node is a function)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.executor import Executor
from engine.paths import UnsafePathError
from engine.png_metadata import read_png_text
from engine.validation import validate_prompt
from nodes import image as image_nodes, latent as latent_nodes
from nodes.conditioning import conditioning_set_area

from .conftest import TINY_SD1


def _txt2img(seed=1, sampler="euler", scheduler="normal", cfg=8.0, steps=2, denoise=1.0, size=64, text="a cat"):
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                                                   "scheduler": scheduler, "denoise": denoise, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def _latent_of(ex: Executor, prompt: dict) -> torch.Tensor:
    result = ex.execute(prompt, "p")
    assert result.status == "success", result.error
    key = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    return ex._last_latent if False else _entry(ex, prompt, key)["samples"]


def _entry(ex: Executor, prompt: dict, node_id: str):
    from engine.planning import compute_keys
    vr = validate_prompt(prompt, ex.registry)
    keys = compute_keys(vr.nodes, vr.order, "n")
    return ex.cache.get(keys[node_id]).outputs[0][0]


def test_same_seed_same_latent_other_seed_differs(sd_env):
    registry, _ = sd_env
    ex = Executor(registry)
    a = _latent_of(ex, _txt2img(seed=7))
    b = _latent_of(Executor(registry), _txt2img(seed=7))
    c = _latent_of(ex, _txt2img(seed=8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_denoise_zero_returns_input_latent_and_cfg_one_runs(sd_env):
    registry, _ = sd_env
    ex = Executor(registry)
    zero = _latent_of(ex, _txt2img(denoise=0.0))
    assert torch.count_nonzero(zero) == 0                       # the empty latent came back unchanged
    assert torch.isfinite(_latent_of(ex, _txt2img(cfg=1.0))).all()


@pytest.mark.parametrize("sampler,scheduler", [("euler_ancestral", "karras"), ("dpmpp_2m", "karras"),
                                               ("dpmpp_2m_sde", "exponential"), ("lcm", "sgm_uniform"),
                                               ("uni_pc", "simple"), ("heun", "beta"), ("ddim", "ddim_uniform")])
def test_sampler_and_scheduler_combinations_run(sd_env, sampler, scheduler):
    registry, _ = sd_env
    latent = _latent_of(Executor(registry), _txt2img(sampler=sampler, scheduler=scheduler))
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()


def test_prompt_weighting_changes_conditioning_only_where_weighted(sd_env):
    registry, _ = sd_env
    ex = Executor(registry)
    plain = _entry_cond(ex, "a cat on a mat")
    same = _entry_cond(ex, "a cat on a mat")
    weighted = _entry_cond(ex, "a (cat:1.5) on a mat")
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(_entry_cond(ex, r"a \(cat\)"), _entry_cond(ex, "a (cat)")) is False


def _entry_cond(ex, text):
    prompt = _txt2img(text=text)
    ex.execute(prompt, "c")
    return _entry(ex, prompt, "6")[0][0]


def test_load_image_mask_is_one_minus_alpha_and_fingerprint_follows_content(sd_env):
    registry, config = sd_env
    img, mask = image_nodes.load_image("example_masked.png")
    assert img.shape == (1, 64, 64, 3) and mask.shape == (1, 64, 64)
    assert mask[0, 20, 20] == 1.0 and mask[0, 0, 0] == 0.0
    _, no_alpha = image_nodes.load_image("example.png")
    assert no_alpha.shape == (1, 64, 64) and no_alpha.sum() == 0
    nd = image_nodes.load_image.__sdflow_node__
    before = nd.fingerprint(image="example.png")
    assert before == nd.fingerprint(image="example.png")
    assert "example.png" in nd.inputs["image"].spec.values()
    assert nd.validate(image="missing.png") != True  # noqa: E712
    assert "Invalid image file" in nd.validate(image="../outside.png")


def test_save_image_names_counters_metadata_and_refuses_escape(sd_env):
    _, config = sd_env
    images = torch.rand(2, 16, 24, 3)
    ui = image_nodes.save_image(images, "sub/run_%width%x%height%", prompt={"1": {"class_type": "X", "inputs": {}}},
                                extra_pnginfo={"workflow": {"nodes": []}}).ui
    names = [i["filename"] for i in ui["images"]]
    assert names == ["run_24x16_00001_.png", "run_24x16_00002_.png"]
    assert all(i["subfolder"] == "sub" and i["type"] == "output" for i in ui["images"])
    again = image_nodes.save_image(images[:1], "sub/run_%width%x%height%").ui["images"][0]["filename"]
    assert again == "run_24x16_00003_.png"
    text = read_png_text(config.output_dir / "sub" / names[0])
    assert json.loads(text["prompt"]) == {"1": {"class_type": "X", "inputs": {}}}
    assert json.loads(text["workflow"]) == {"nodes": []}
    saved = np.asarray(Image.open(config.output_dir / "sub" / names[0]))
    assert saved.shape == (16, 24, 3)
    with pytest.raises(UnsafePathError):
        image_nodes.save_image(images, "../../escape")


def test_image_and_latent_resizing(sd_env):
    img = torch.rand(1, 32, 64, 3)
    assert image_nodes.image_scale(img, "bilinear", 128, 0, "disabled").shape == (1, 64, 128, 3)
    assert image_nodes.image_scale(img, "lanczos", 32, 32, "center").shape == (1, 32, 32, 3)
    assert image_nodes.image_scale(img, "area", 0, 0, "disabled") is img
    assert image_nodes.image_scale_by(img, "nearest-exact", 0.5).shape == (1, 16, 32, 3)
    lat = {"samples": torch.randn(1, 4, 8, 8), "batch_index": [3]}
    up = latent_nodes.latent_upscale(lat, "bislerp", 128, 0, "disabled")
    assert up["samples"].shape == (1, 4, 16, 16) and up["batch_index"] == [3]
    assert latent_nodes.latent_upscale_by(lat, "bicubic", 1.5)["samples"].shape == (1, 4, 12, 12)


def test_inpaint_encoding_and_noise_mask(sd_env):
    registry, _ = sd_env
    vae = Executor(registry)
    from nodes.loaders import checkpoint_loader_simple
    _, _, vae = checkpoint_loader_simple(TINY_SD1)
    pixels = torch.rand(1, 68, 66, 3)                           # not multiples of 8: cropped
    mask = torch.zeros(1, 68, 66)
    mask[:, 10:30, 10:30] = 1
    out = latent_nodes.vae_encode_for_inpaint(pixels, vae, mask, 6)
    assert out["samples"].shape == (1, 4, 8, 8)
    assert out["noise_mask"].shape == (1, 1, 64, 64)
    assert out["noise_mask"].sum() > (20 * 20)                   # grown by the kernel
    masked = latent_nodes.set_latent_noise_mask({"samples": out["samples"]}, mask[:, :64, :64])
    assert masked["noise_mask"].shape == (1, 1, 64, 64)


def test_conditioning_area_in_latent_units():
    cond = [[torch.zeros(1, 77, 8), {"pooled_output": None}]]
    out = conditioning_set_area(cond, 320, 512, 64, 8, 0.5)
    assert out[0][1]["area"] == (64, 40, 1, 8) and out[0][1]["strength"] == 0.5
    assert cond[0][1] == {"pooled_output": None}                # the input is not modified


def test_validation_of_sd_inputs_names_node_and_input(sd_env):
    registry, _ = sd_env
    prompt = _txt2img()
    prompt["3"]["inputs"]["steps"] = 0
    prompt["3"]["inputs"]["sampler_name"] = "nope"
    prompt["4"]["inputs"]["ckpt_name"] = "../../etc/passwd"
    vr = validate_prompt(prompt, registry)
    assert not vr.ok
    kinds = {(nid, e["type"]) for nid, entry in vr.node_errors.items() for e in entry["errors"]}
    assert ("3", "value_smaller_than_min") in kinds and ("3", "value_not_in_list") in kinds
    assert ("4", "custom_validation_failed") in kinds


def test_two_configured_environments_in_one_process_keep_their_own_folders(sd_env, tmp_path):
    """An executor runs its nodes with its registry's config, whatever the process default is."""
    import nodes
    from engine.config import RuntimeConfig
    from nodes.models.tiny import write_tiny_checkpoint
    from nodes.runtime import runtime

    registry_a, config_a = sd_env
    config_b = RuntimeConfig(data_dir=tmp_path / "b")
    config_b.ensure_dirs()
    write_tiny_checkpoint(config_b.models_dir / "checkpoints" / "only-in-b.safetensors", "sd1", seed=1)
    registry_b, _ = nodes.build_registry(config_b, plugins=False)      # makes b the process default
    assert runtime().config is config_b

    def save_prompt(ckpt: str, prefix: str) -> dict:
        prompt = _txt2img(steps=1)
        prompt["4"]["inputs"]["ckpt_name"] = ckpt
        prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}}
        return prompt

    out_a = Executor(registry_a).execute(save_prompt(TINY_SD1, "envA"), "a")
    out_b = Executor(registry_b).execute(save_prompt("only-in-b.safetensors", "envB"), "b")
    assert out_a.status == "success", out_a.error
    assert out_b.status == "success", out_b.error
    assert (config_a.output_dir / out_a.outputs["9"]["images"][0]["filename"]).is_file()
    assert (config_b.output_dir / out_b.outputs["9"]["images"][0]["filename"]).is_file()
    assert not list(config_b.output_dir.glob("envA*")) and not list(config_a.output_dir.glob("envB*"))


def test_load_image_mask_channels_of_any_mode(sd_env):
    _, config = sd_env
    la = Image.fromarray(np.dstack([np.full((20, 30), 200, np.uint8), np.full((20, 30), 51, np.uint8)]), "LA")
    la.save(config.input_dir / "grey_alpha.png")
    red = image_nodes.load_image_mask("grey_alpha.png", "red")
    assert red.shape == (1, 20, 30) and torch.allclose(red, torch.full_like(red, 200 / 255))
    alpha = image_nodes.load_image_mask("grey_alpha.png", "alpha")
    assert torch.allclose(alpha, torch.full_like(alpha, 1 - 51 / 255))
    rgb_alpha = image_nodes.load_image_mask("example.png", "alpha")          # no alpha: nothing masked
    assert rgb_alpha.shape == (1, 64, 64) and rgb_alpha.sum() == 0


def test_load_image_keeps_later_frames_of_the_batch_size(sd_env):
    _, config = sd_env
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 255, 0)),
              Image.new("RGB", (16, 16), (0, 0, 255))]
    frames[0].save(config.input_dir / "pages.tiff", save_all=True, append_images=frames[1:])
    images, masks = image_nodes.load_image("pages.tiff")
    assert images.shape == (2, 16, 16, 3) and masks.shape[0] == 2
    assert images[1, 0, 0].tolist() == [0.0, 0.0, 1.0]                        # the blue page, after the odd one


def test_latent_upscale_clamps_the_given_side_before_the_aspect_ratio():
    lat = {"samples": torch.zeros(1, 4, 64, 128)}                               # 1024 x 512 pixels
    assert latent_nodes.latent_upscale(lat, "nearest-exact", 0, 32, "disabled")["samples"].shape == (1, 4, 8, 16)

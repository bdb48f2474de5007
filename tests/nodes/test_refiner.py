"""SDXL refiner checkpoints (OpenCLIP-G only, aesthetic-score conditioning), CLIPTextEncodeSDXLRefiner,
CLIPTextEncodeSDXL and the base -> refiner hand-off between two KSamplerAdvanced nodes."""
from __future__ import annotations

import pytest
import torch

from engine.executor import Executor
from nodes.conditioning import clip_text_encode, clip_text_encode_sdxl, clip_text_encode_sdxl_refiner
from nodes.models.checkpoint import load_checkpoint, load_diffusers_folder
from nodes.models.diffusion_model import DiffusionModelHandle
from nodes.models.text_encoder import ClipHandle
from nodes.models.tiny import write_tiny_checkpoint, write_tiny_diffusers_folder
from nodes.sampling.guidance import CFGDenoiser
from nodes.sampling.model_sampling import DiscreteSchedule

REFINER = "tiny-sdxl-refiner.safetensors"
BASE = "tiny-sdxl-base.safetensors"


@pytest.fixture(scope="module")
def xl_files(sd_env):
    _, config = sd_env
    folder = config.models_dir / "checkpoints"
    if not (folder / REFINER).exists():
        write_tiny_checkpoint(folder / REFINER, "sdxl_refiner", seed=5)
    if not (folder / BASE).exists():
        write_tiny_checkpoint(folder / BASE, "sdxl", seed=4)
    return folder


def test_refiner_checkpoint_loads_with_openclip_g_only(xl_files):
    ckpt = load_checkpoint(xl_files / REFINER)
    assert ckpt.arch == "sdxl_refiner"
    assert set(ckpt.text_encoders) == {"g"}
    cfg = ckpt.unet.config
    # pooled G (32) + 5 embedded numbers (8 each), the tiny image of 1280 + 5 * 256 = 2560
    assert cfg.projection_class_embeddings_input_dim == 32 + 5 * 8 and cfg.addition_time_embed_dim == 8
    assert cfg.cross_attention_dim == 32
    assert ckpt.vae.config.scaling_factor == pytest.approx(0.13025)
    clip = ClipHandle.from_checkpoint(ckpt)
    [[cond, opts]] = clip.encode_text("a photo of a cat")
    assert cond.shape == (1, 77, 32) and opts["pooled_output"].shape == (1, 32)


def test_refiner_diffusers_folder_loads(tmp_path):
    folder = write_tiny_diffusers_folder(tmp_path / "refiner", "sdxl_refiner", seed=5)
    assert not (folder / "text_encoder").exists()
    ckpt = load_diffusers_folder(folder)
    assert ckpt.arch == "sdxl_refiner" and set(ckpt.text_encoders) == {"g"}


def _time_ids_seen(model, positive, negative, size=64):
    seen = []
    hook = model.unet.add_time_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    schedule = DiscreteSchedule(prediction_type=model.prediction_type)
    shape = (1, 4, size // 8, size // 8)
    den = CFGDenoiser(model.apply, schedule, positive, negative, 5.0, latent_shape=shape)
    try:
        den(torch.randn(shape), schedule.sigmas[-1:].clone())
    finally:
        hook.remove()
    return [ids.reshape(-1, 5 if model.arch == "sdxl_refiner" else 6) for ids in seen]


def test_refiner_conditions_on_size_crop_and_aesthetic_score(xl_files):
    ckpt = load_checkpoint(xl_files / REFINER)
    model, clip = DiffusionModelHandle.from_checkpoint(ckpt), ClipHandle.from_checkpoint(ckpt)
    pos = clip_text_encode_sdxl_refiner(6.5, 1024, 768, "a cat", clip)
    neg = clip_text_encode_sdxl_refiner(2.0, 512, 256, "blurry", clip)
    assert pos[0][1]["aesthetic_score"] == 6.5 and pos[0][1]["width"] == 1024
    rows = torch.cat(_time_ids_seen(model, pos, neg))
    assert sorted(rows.tolist()) == sorted([[768.0, 1024.0, 0.0, 0.0, 6.5], [256.0, 512.0, 0.0, 0.0, 2.0]])
    # plain CLIPTextEncode: the latent's size and ComfyUI's default scores, 6 positive and 2.5 negative
    rows = torch.cat(_time_ids_seen(model, clip_text_encode("a cat", clip), clip_text_encode("", clip)))
    assert sorted(rows.tolist()) == sorted([[64.0, 64.0, 0.0, 0.0, 6.0], [64.0, 64.0, 0.0, 0.0, 2.5]])


def test_clip_text_encode_sdxl_separate_prompts_and_size_numbers(xl_files):
    ckpt = load_checkpoint(xl_files / BASE)
    model, clip = DiffusionModelHandle.from_checkpoint(ckpt), ClipHandle.from_checkpoint(ckpt)
    same = clip_text_encode_sdxl(1024, 1024, 0, 0, 1024, 1024, "a cat", clip, "a cat")
    plain = clip_text_encode("a cat", clip)
    torch.testing.assert_close(same[0][0], plain[0][0])
    torch.testing.assert_close(same[0][1]["pooled_output"], plain[0][1]["pooled_output"])
    # a long G prompt and a short L prompt: L is padded with empty chunks to G's length
    long_g = " ".join(["cat"] * 100)
    [[cond, opts]] = clip_text_encode_sdxl(896, 1152, 16, 32, 1024, 960, long_g, clip, "dog")
    assert cond.shape == (1, 154, 64)
    l_only = clip_text_encode_sdxl(896, 1152, 16, 32, 1024, 960, "x", clip, "dog")[0][0]
    assert not torch.allclose(cond[:, :77, :32], torch.zeros(1))
    assert torch.allclose(cond[:, :77, :32], l_only[:, :, :32])
    rows = torch.cat(_time_ids_seen(model, [[cond, opts]], clip_text_encode("", clip)))
    assert [1152.0, 896.0, 32.0, 16.0, 960.0, 1024.0] in rows.tolist()
    # the base model given refiner conditioning takes its size as the target size
    ref = clip_text_encode_sdxl_refiner(6.0, 640, 384, "a cat", clip)
    rows = torch.cat(_time_ids_seen(model, ref, ref))
    assert [384.0, 640.0, 0.0, 0.0, 384.0, 640.0] in rows.tolist()


def test_clip_text_encode_sdxl_rejects_a_clip_without_openclip_g(sd_env):
    from .conftest import TINY_SD1
    registry, _ = sd_env
    prompt = base_refiner_prompt(base=TINY_SD1)
    result = Executor(registry).execute(prompt, "sdxl-bad-clip")
    assert result.status == "error"
    assert result.error["node_id"] == "6" and result.error["node_type"] == "CLIPTextEncodeSDXL"
    assert "clip: CLIPTextEncodeSDXL needs an SDXL text encoder" in result.error["exception_message"]


def base_refiner_prompt(base=BASE, refiner=REFINER, steps=4, switch=3, size=64):
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base}},
        "12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": refiner}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024,
            "text_g": "a lighthouse at dusk", "clip": ["4", 1], "text_l": "a lighthouse"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "15": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "ascore": 6.0, "width": 1024, "height": 1024, "text": "a lighthouse at dusk", "clip": ["12", 1]}},
        "16": {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
            "ascore": 2.5, "width": 1024, "height": 1024, "text": "text, watermark", "clip": ["12", 1]}},
        "10": {"class_type": "KSamplerAdvanced", "inputs": {
            "add_noise": "enable", "noise_seed": 721897303308196, "steps": steps, "cfg": 8.0,
            "sampler_name": "euler", "scheduler": "normal", "start_at_step": 0, "end_at_step": switch,
            "return_with_leftover_noise": "enable", "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "11": {"class_type": "KSamplerAdvanced", "inputs": {
            "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": 8.0, "sampler_name": "euler",
            "scheduler": "normal", "start_at_step": switch, "end_at_step": 10000,
            "return_with_leftover_noise": "disable", "model": ["12", 0], "positive": ["15", 0],
            "negative": ["16", 0], "latent_image": ["10", 0]}},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["12", 2]}},
        "19": {"class_type": "SaveImage", "inputs": {"filename_prefix": "refiner", "images": ["17", 0]}},
    }


def test_base_then_refiner_workflow_runs(sd_env, xl_files):
    registry, config = sd_env
    ex = Executor(registry)
    result = ex.execute(base_refiner_prompt(), "base-refiner")
    assert result.status == "success", result.error
    [img] = result.outputs["19"]["images"]
    assert (config.output_dir / img["subfolder"] / img["filename"]).is_file()
    # the refiner stage changes the base's output (it is not skipped)
    only_base = base_refiner_prompt(switch=4)
    result2 = Executor(registry).execute(only_base, "base-only")
    assert result2.status == "success", result2.error
    import numpy as np
    from PIL import Image
    with Image.open(config.output_dir / img["filename"]) as a, \
            Image.open(config.output_dir / result2.outputs["19"]["images"][0]["filename"]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))

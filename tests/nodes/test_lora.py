"""LoRA loading: real LoRA files for the tiny SD1 model's real module names, merged by the nodes."""
from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from engine.executor import Executor
from engine.validation import validate_prompt
from nodes.loaders import checkpoint_loader_simple
from nodes.lora import lora_loader, lora_loader_model_only
from nodes.models import lora as lora_models
from nodes.sampler_nodes import common_ksampler

from .conftest import TINY_SD1, activate

RANK, ALPHA = 4, 2.0

# (kohya base name, handle part, module name inside that part)
KOHYA_TARGETS = [
    # diffusers naming with underscores
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    # LDM naming (SDXL-style kohya files) for a 3x3 conv: a LoCon pair
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1"),
    # to_out.0: the ".0" must survive the underscore form
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0", "unet",
     "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "l", "encoder.layers.0.self_attn.q_proj"),
]


def _module(part, handle_model, handle_clip, name):
    root = handle_model.unet if part == "unet" else handle_clip.text_encoders[part]
    return dict(root.named_modules())[name]


def _pair_for(weight: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    out_ch = weight.shape[0]
    if weight.ndim == 4:   # conv: down is a conv of the layer's kernel, up a 1x1 conv
        down = torch.randn(RANK, weight.shape[1], *weight.shape[2:], generator=gen)
        up = torch.randn(out_ch, RANK, 1, 1, generator=gen)
    else:
        down = torch.randn(RANK, weight.shape[1], generator=gen)
        up = torch.randn(out_ch, RANK, generator=gen)
    return down * 0.1, up * 0.1


@pytest.fixture(scope="module")
def base(sd_env):
    activate(sd_env)
    return checkpoint_loader_simple(TINY_SD1)[:2]


@pytest.fixture(scope="module")
def kohya_file(sd_env, base):
    """Writes loras/tiny-kohya.safetensors; returns (name, {module: expected delta at strength 1})."""
    _, config = sd_env
    model, clip = base
    gen = torch.Generator().manual_seed(3)
    sd, expected = {}, {}
    for key, part, name in KOHYA_TARGETS:
        weight = _module(part, model, clip, name).weight
        down, up = _pair_for(weight, gen)
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(ALPHA)
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(RANK, -1)).reshape(weight.shape) * (ALPHA / RANK)
        expected[(part, name)] = delta
    sd["lora_unet_no_such_block_0_proj.lora_down.weight"] = torch.zeros(RANK, 8)
    sd["lora_unet_no_such_block_0_proj.lora_up.weight"] = torch.zeros(8, RANK)
    path = config.models_dir / "loras" / "tiny-kohya.safetensors"
    save_file(sd, str(path))
    return path.name, expected


def _snapshot(model, clip) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    for key, enc in clip.text_encoders.items():
        out.update({f"{key}.{k}": v.clone() for k, v in enc.state_dict().items()})
    return out


def _params(model, clip) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in model.unet.named_parameters()}
    for key, enc in clip.text_encoders.items():
        out.update({f"{key}.{k}": v for k, v in enc.named_parameters()})
    return out


def test_kohya_lora_changes_exactly_the_targeted_weights(base, kohya_file, caplog):
    model, clip = base
    name, expected = kohya_file
    before = _snapshot(model, clip)
    lora_models.clear_cache()
    with caplog.at_level(logging.WARNING, logger="nodes.models.lora"):
        new_model, new_clip = lora_loader(model, clip, name, 0.7, -0.5)
    assert "lora_unet_no_such_block_0_proj.lora_down.weight" in caplog.text   # unknown keys are reported
    assert new_model is not model and new_clip is not clip

    targeted = {}
    for (part, mod), delta in expected.items():
        prefix = "unet" if part == "unet" else part
        targeted[f"{prefix}.{mod}.weight"] = (0.7 if part == "unet" else -0.5) * delta

    old = {k: v.data_ptr() for k, v in _params(model, clip).items()}
    new_ptrs = {k: v.data_ptr() for k, v in _params(new_model, new_clip).items()}
    after = _snapshot(new_model, new_clip)
    assert old.keys() == new_ptrs.keys()
    for key, ptr in new_ptrs.items():
        if key in targeted:
            torch.testing.assert_close(after[key] - before[key], targeted[key], atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(after[key], before[key]), key
        assert ptr == old[key], key   # both sides are patched in place: nothing is copied
    # the base handles get their original values back
    for key, tensor in _params(model, clip).items():
        assert torch.equal(tensor, before[key]), key


def test_strength_zero_is_a_passthrough_and_one_side_zero_keeps_that_side(base, kohya_file):
    model, clip = base
    name, _ = kohya_file
    assert lora_loader(model, clip, name, 0.0, 0.0) == (model, clip)
    m, c = lora_loader(model, clip, name, 1.0, 0.0)
    assert c is clip and m is not model
    m, c = lora_loader(model, clip, name, 0.0, 1.0)
    assert m is model and c is not clip
    only = lora_loader_model_only(model, name, 0.0)
    assert only is model


def test_lora_changes_sampling_and_encoding(base, kohya_file):
    model, clip = base
    name, _ = kohya_file
    new_model, new_clip = lora_loader(model, clip, name, 1.0, 1.0)
    pos, neg = clip.encode_text("a cat"), clip.encode_text("")
    assert not torch.allclose(new_clip.encode_text("a cat")[0][0], pos[0][0])
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    a = common_ksampler(model, 1, 2, 7.0, "euler", "normal", pos, neg, latent)["samples"]
    b = common_ksampler(new_model, 1, 2, 7.0, "euler", "normal", pos, neg, latent)["samples"]
    again = common_ksampler(model, 1, 2, 7.0, "euler", "normal", pos, neg, latent)["samples"]
    assert torch.equal(a, again)           # the base model was not touched by the merge
    assert not torch.allclose(a, b)


def test_model_only_leaves_text_encoder_out(base, kohya_file):
    model, clip = base
    name, expected = kohya_file
    new_model = lora_loader_model_only(model, name, 1.0)
    mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    patched = dict(new_model.unet.named_modules())[mod].weight.clone()   # before the base restores it
    diff = patched - dict(model.unet.named_modules())[mod].weight
    torch.testing.assert_close(diff, expected[("unet", mod)], atol=1e-6, rtol=1e-5)


def test_diffusers_peft_layout_and_chaining(sd_env, base):
    _, config = sd_env
    model, clip = base
    gen = torch.Generator().manual_seed(5)
    unet_mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    te_mod = "encoder.layers.1.mlp.fc1"
    w_u = dict(model.unet.named_modules())[unet_mod].weight.clone()   # the module is patched in place
    w_t = dict(clip.text_encoders["l"].named_modules())[te_mod].weight.clone()   # so is the encoder
    d_u, u_u = _pair_for(w_u, gen)
    d_t, u_t = _pair_for(w_t, gen)
    sd = {
        f"unet.{unet_mod}.lora_A.weight": d_u, f"unet.{unet_mod}.lora_B.weight": u_u,       # PEFT, no alpha
        f"text_encoder.text_model.{te_mod}.lora.down.weight": d_t,                          # old diffusers
        f"text_encoder.text_model.{te_mod}.lora.up.weight": u_t,
    }
    path = config.models_dir / "loras" / "tiny-peft.safetensors"
    save_file(sd, str(path))
    m1, c1 = lora_loader(model, clip, path.name, 1.0, 2.0)
    torch.testing.assert_close(dict(m1.unet.named_modules())[unet_mod].weight - w_u, u_u @ d_u, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dict(c1.text_encoders["l"].named_modules())[te_mod].weight - w_t,
                               2.0 * (u_t @ d_t), atol=1e-6, rtol=1e-5)
    # a second LoRA node stacks on the first one's result
    m2, _ = lora_loader(m1, c1, path.name, 1.0, 0.0)
    torch.testing.assert_close(dict(m2.unet.named_modules())[unet_mod].weight - w_u, 2 * (u_u @ d_u),
                               atol=1e-6, rtol=1e-5)


def test_last_file_is_cached_by_path_and_mtime(sd_env, tmp_path):
    path = tmp_path / "cache.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(3, 2)},
              str(path))
    lora_models.clear_cache()
    first = lora_models.load_lora_file(path)
    assert lora_models.load_lora_file(path) is first
    save_file({"lora_unet_y.lora_down.weight": torch.ones(2, 3), "lora_unet_y.lora_up.weight": torch.ones(3, 2)},
              str(path))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    second = lora_models.load_lora_file(path)
    assert second is not first and "lora_unet_y" in second.pairs


def test_not_a_lora_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"some.weight": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match="not a LoRA file"):
        lora_models.load_lora_file(path)


def test_lora_loader_in_a_graph(sd_env, kohya_file):
    registry, _ = sd_env
    name, _ = kohya_file
    info = registry.get("LoraLoader").info()
    assert info["input"]["required"]["strength_model"][1] == {"default": 1.0, "min": -100.0, "max": 100.0,
                                                                "step": 0.01, "tooltip": info["input"]["required"]
                                                                ["strength_model"][1]["tooltip"]}
    assert name in info["input"]["required"]["lora_name"][0]
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": name,
                                                       "strength_model": 0.8, "strength_clip": 0.8}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["10", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["10", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["10", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    }
    result = Executor(registry).execute(prompt, "lora")
    assert result.status == "success", result.error
    bad = dict(prompt)
    bad["10"] = {**prompt["10"], "inputs": {**prompt["10"]["inputs"], "lora_name": "missing.safetensors"}}
    vr = validate_prompt(bad, registry)
    assert not vr.ok and "10" in vr.node_errors


def test_other_spellings_resolve_to_the_same_modules(base):
    model, clip = base
    one = torch.zeros(1, 1)
    names = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight":
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
        "text_encoder.text_model.encoder.layers.0.self_attn.v_proj.lora_linear_layer.down.weight":
            ("l", "encoder.layers.0.self_attn.v_proj"),
        "diffusion_model.output_blocks.2.1.proj_out.lora_down.weight":
            ("unet", "up_blocks.1.attentions.0.proj_out"),
        "base_model.model.down_blocks.0.resnets.0.conv2.lora_A.weight": ("unet", "down_blocks.0.resnets.0.conv2"),
    }
    lora = lora_models.parse_lora({k: one for k in names})
    patches, unknown = lora_models.resolve(lora, model.unet, clip.text_encoders)
    assert not unknown
    assert {(p.target, p.module) for p in patches} == set(names.values())


def test_cache_counts_memory_shared_with_the_base_model_once(base, kohya_file):
    """A LoRA-patched model and a clip-skip clone share most weights with the base checkpoint: the
    cache's byte accounting must count that memory once, not once per entry."""
    from engine.cache import OutputCache
    from nodes.conditioning import clip_set_last_layer

    model, clip = base
    name, expected = kohya_file
    cache = OutputCache({"cpu": 1 << 40})
    cache.put("ckpt", [[model], [clip]])
    base_bytes = cache.usage()["cpu"]
    cache.put("clip-skip", [[clip_set_last_layer(clip, -2)]])
    assert cache.usage()["cpu"] == base_bytes                         # a clone adds nothing
    lora_models.clear_cache()
    patched = lora_loader(model, clip, name, 1.0, 1.0)
    assert patched[0].unet is model.base_unet   # applied: adapted weights written in place, originals kept
    assert patched[1].text_encoders["l"] is clip.base_text_encoders["l"]   # the same for the text encoder
    cache.put("lora", [[patched[0]], [patched[1]]])
    changed = sum(d.numel() * 4 for d in expected.values())          # the kept float32 originals
    assert cache.usage()["cpu"] == base_bytes + changed
    unet_changed = sum(d.numel() * 4 for (part, _), d in expected.items() if part == "unet")
    assert model._weights.patcher("unet").extra_bytes() == unet_changed
    # the base handle used again: originals restored, the patch costs nothing any more
    from engine.memory import parts, sum_parts
    assert model.unet is model.base_unet
    assert sum_parts(parts(patched[0]))["cpu"] == sum_parts(parts(model))["cpu"]
    assert model._weights.patcher("unet").extra_bytes() == 0


def test_clip_merge_of_a_lora_clip_with_its_own_base(base, kohya_file):
    """A LoRA'd CLIP shares its encoder with the base and is patched in place when read, so merging the two
    must not read both through the one module: half-way is base + delta / 2, and the encoders afterwards give
    each handle its own weights back."""
    from nodes.model_merging import clip_merge_simple

    model, clip = base
    name, expected = kohya_file
    lora_models.clear_cache()
    _, lora_clip = lora_loader(model, clip, name, 0.0, 1.0)
    before = {k: v.clone() for k, v in clip.text_encoders["l"].state_dict().items()}
    half = clip_merge_simple(clip, lora_clip, 0.5)
    merged = half.text_encoders["l"].state_dict()
    deltas = {f"{mod}.weight": delta for (part, mod), delta in expected.items() if part == "l"}
    assert deltas
    for key, delta in deltas.items():
        torch.testing.assert_close(merged[key], before[key] + 0.5 * delta, atol=1e-6, rtol=1e-5)
    # each handle still reads its own weights from the shared module
    for key, delta in deltas.items():
        torch.testing.assert_close(lora_clip.text_encoders["l"].state_dict()[key], before[key] + delta,
                                   atol=1e-6, rtol=1e-5)
        assert torch.equal(clip.text_encoders["l"].state_dict()[key], before[key])

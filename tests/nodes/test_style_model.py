"""StyleModelLoader / StyleModelApply: T2I-Adapter style models (original .pth keys) on the tiny CLIP
vision tower and SD1 model; the adapter against a hand-written reference of its maths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.executor import Executor
from nodes.conditioning import clip_text_encode, clip_vision_encode, style_model_apply
from nodes.loaders import checkpoint_loader_simple, clip_vision_loader, style_model_loader
from nodes.models.tiny import write_tiny_clip_vision, write_tiny_style_model

from .conftest import TINY_SD1, activate


@pytest.fixture(scope="module")
def style_files(sd_env):
    activate(sd_env)
    _, config = sd_env
    write_tiny_style_model(config.models_dir / "style_models" / "t2iadapter_style_sd14v1.pth", seed=3)
    write_tiny_clip_vision(config.models_dir / "clip_vision" / "clip_vit_l.safetensors", layout="hf", seed=9)
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)},
              str(config.models_dir / "style_models" / "a-lora.safetensors"))
    return config


def _reference(sd, x, heads=8):
    """The style adapter written out: CLIP residual attention blocks over [hidden states, style tokens]."""
    n_tok = sd["style_embedding"].shape[1]
    h = torch.cat([x, sd["style_embedding"].expand(x.shape[0], -1, -1)], dim=1)
    h = F.layer_norm(h, h.shape[-1:], sd["ln_pre.weight"], sd["ln_pre.bias"])
    i = 0
    while f"transformer_layes.{i}.ln_1.weight" in sd:
        p = f"transformer_layes.{i}."
        y = F.layer_norm(h, h.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = F.linear(y, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        b, t, d = q.shape
        q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(b, t, d)
        h = h + F.linear(a, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        y = F.layer_norm(h, h.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        y = F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        y = y * torch.sigmoid(1.702 * y)
        h = h + F.linear(y, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    out = F.layer_norm(h[:, -n_tok:], h.shape[-1:], sd["ln_post.weight"], sd["ln_post.bias"])
    return out @ sd["proj"]


def test_style_model_matches_reference_and_extends_the_conditioning(style_files):
    style = style_model_loader("t2iadapter_style_sd14v1.pth")
    vision = clip_vision_loader("clip_vit_l.safetensors")
    out = clip_vision_encode(vision, torch.rand(2, 40, 40, 3, generator=torch.Generator().manual_seed(1)), "center")
    sd = torch.load(style_files.models_dir / "style_models" / "t2iadapter_style_sd14v1.pth", weights_only=True)
    tokens = style.get_cond(out)
    assert tokens.shape == (2, 8, 32)
    torch.testing.assert_close(tokens, _reference(sd, out.last_hidden_state), atol=1e-5, rtol=1e-4)

    clip = checkpoint_loader_simple(TINY_SD1)[1]
    cond = clip_text_encode("a cat", clip)
    styled = style_model_apply(cond, style, out, 0.5, "multiply")
    ctx, opts = styled[0]
    assert ctx.shape[1] == cond[0][0].shape[1] + 16          # both images' 8 tokens, one after the other
    torch.testing.assert_close(ctx[:, :cond[0][0].shape[1]], cond[0][0])
    torch.testing.assert_close(ctx[0, -16:], 0.5 * tokens.flatten(0, 1))
    assert opts["pooled_output"] is cond[0][1]["pooled_output"]
    with pytest.raises(NotImplementedError, match="attn_bias"):
        style_model_apply(cond, style, out, 0.5, "attn_bias")


def test_style_workflow_and_wrong_file(sd_env, style_files):
    registry, _ = sd_env

    def prompt(name):
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
                "2": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": name}},
                "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vit_l.safetensors"}},
                "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
                "5": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["3", 0], "image": ["4", 0],
                                                                   "crop": "center"}},
                "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house", "clip": ["1", 1]}},
                "7": {"class_type": "StyleModelApply", "inputs": {
                    "conditioning": ["6", 0], "style_model": ["2", 0], "clip_vision_output": ["5", 0],
                    "strength": 1.0, "strength_type": "multiply"}},
                "8": {"class_type": "KSampler", "inputs": {
                    "seed": 2, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                    "model": ["1", 0], "positive": ["7", 0], "negative": ["6", 0], "latent_image": ["9", 0]}},
                "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
                "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}}

    ok = Executor(registry).execute(prompt("t2iadapter_style_sd14v1.pth"), "style-ok")
    assert ok.status == "success", ok.error
    bad = Executor(registry).execute(prompt("a-lora.safetensors"), "style-lora")
    assert bad.status == "error" and bad.error["node_id"] == "2", bad.error
    msg = bad.error["exception_message"]
    assert "StyleModelLoader" in msg and "style_model_name" in msg and "a-lora.safetensors" in msg
    assert "a LoRA" in msg and "expected a T2I-Adapter style model" in msg

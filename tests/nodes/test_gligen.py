"""GLIGENLoader / GLIGENTextBoxApply: a tiny GLIGEN file in the original key layout, written from a tiny
diffusers gated UNet, against that diffusers UNet itself."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from nodes.conditioning import clip_text_encode, gligen_text_box_apply
from nodes.loaders import checkpoint_loader_simple, gligen_loader
from nodes.models.state_dict import ModelFileError
from nodes.models.tiny import tiny_gligen_unet, write_tiny_gligen

from .conftest import TINY_SD1, activate

GLIGEN = "gligen_tiny_textbox.safetensors"


@pytest.fixture(scope="module")
def gligen_env(sd_env):
    activate(sd_env)
    _, config = sd_env
    unet = tiny_gligen_unet("sd1", seed=0)
    write_tiny_gligen(config.models_dir / "gligen" / GLIGEN, unet)
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)},
              str(config.models_dir / "gligen" / "a-lora.safetensors"))
    return sd_env, unet


def test_file_has_the_original_layout(gligen_env):
    (_, config), _ = gligen_env
    keys = load_file(str(config.models_dir / "gligen" / GLIGEN)).keys()
    assert "position_net.null_positive_feature" in keys and "position_net.linears.4.weight" in keys
    assert "input_blocks.1.1.transformer_blocks.0.fuser.attn.to_q.weight" in keys
    assert "middle_block.1.transformer_blocks.0.fuser.alpha_attn" in keys
    assert "output_blocks.3.1.transformer_blocks.0.fuser.ff.net.2.weight" in keys


def test_loader_and_text_box_apply(gligen_env):
    (registry, _), unet = gligen_env
    info = registry.node_info("GLIGENTextBoxApply")["input"]["required"]
    assert info["width"][1]["default"] == 64 and info["width"][1]["min"] == 8 and info["width"][1]["step"] == 8
    assert info["x"][1]["default"] == 0 and info["x"][1]["min"] == 0
    assert GLIGEN in registry.node_info("GLIGENLoader")["input"]["required"]["gligen_name"][0]
    gligen = gligen_loader(GLIGEN)
    assert len(gligen.fusers) == 4  # down 1, mid 1, up 2
    for got, want in zip(gligen.fusers, [b.fuser for b in _blocks(unet)]):
        for (k, a), (_, b) in zip(sorted(got.state_dict().items()), sorted(want.state_dict().items())):
            assert torch.equal(a, b), k
    _, clip, _ = checkpoint_loader_simple(TINY_SD1)
    cond = clip_text_encode("a garden", clip)
    one = gligen_text_box_apply(cond, clip, gligen, "a red ball", 32, 24, 8, 16)
    two = gligen_text_box_apply(one, clip, gligen, "a cat", 16, 16, 40, 40)
    kind, handle, boxes = two[0][1]["gligen"]
    assert kind == "position" and handle is gligen and len(boxes) == 2
    pooled = clip.encode(clip.tokenize("a red ball"))[1]
    assert torch.equal(boxes[0][0], pooled) and boxes[0][1:] == (3, 4, 2, 1)
    assert boxes[1][1:] == (2, 2, 5, 5)
    assert "gligen" not in cond[0][1]  # the input conditioning is untouched


def _blocks(unet):
    from nodes.models.gligen import transformer_blocks
    return transformer_blocks(unet)


def test_one_unet_call_matches_diffusers_gated_unet(gligen_env):
    (_, _), ref = gligen_env
    model, clip, _ = checkpoint_loader_simple(TINY_SD1)
    gligen = gligen_loader(GLIGEN)
    cond = clip_text_encode("a garden", clip)
    cond = gligen_text_box_apply(cond, clip, gligen, "a red ball", 32, 24, 8, 16)
    cond = gligen_text_box_apply(cond, clip, gligen, "a cat", 16, 16, 40, 40)
    context, opts = cond[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500.0])
    kw = gligen.inputs_for(opts["gligen"][2], 1, 8, 8, torch.device("cpu"), torch.float32)
    assert torch.allclose(kw["boxes"][0, 0], torch.tensor([1 / 8, 2 / 8, 5 / 8, 5 / 8]))
    assert kw["masks"][0].tolist() == [1.0, 1.0] + [0.0] * 28
    ours = model.apply(x, t, {"context": context, "gligen": (gligen, kw)})
    plain = model.apply(x, t, {"context": context})
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=context, cross_attention_kwargs={"gligen": kw}, return_dict=False)[0]
    assert (ours - plain).abs().max() > 1e-3  # grounding changes the prediction
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-4)
    assert not hasattr(model.unet, "position_net")  # detached again after the call


def test_wrong_file_kind_is_a_clear_error(gligen_env):
    with pytest.raises(ModelFileError, match="GLIGENLoader input gligen_name 'a-lora.safetensors': not a GLIGEN model"):
        gligen_loader("a-lora.safetensors")

"""LoraLoader on an SD3 CLIP: CLIP-L, CLIP-G and T5-XXL patched from one LoRA file (kohya `lora_te1_` /
`lora_te2_` / `lora_te3_`, or ComfyUI's `text_encoders.<clip>.transformer.` layout), compared with the
same deltas merged into copies of the weights by hand."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nodes.lora import lora_loader
from nodes.models.sd3_handles import SD3ClipHandle, SD3ModelHandle
from nodes.models.tiny_sd3 import tiny_sd3_models, tiny_t5_tokenizer
from nodes.models.tokenizer import load_tokenizer

RANK, ALPHA = 2, 1.0
SEED = 6
PROMPT = "a photo of a red cat"

# (encoder, module, kohya base name, ComfyUI base name)
TARGETS = [
    ("l", "text_model.encoder.layers.0.self_attn.q_proj", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"),
    ("g", "text_model.encoder.layers.1.mlp.fc1", "lora_te2_text_model_encoder_layers_1_mlp_fc1",
     "text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc1"),
    ("t5", "encoder.block.0.layer.0.SelfAttention.q", "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
     "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"),
    ("t5", "encoder.block.1.layer.1.DenseReluDense.wi_0", "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0",
     "text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_0"),
]


def _tokenizers():
    return {"l": load_tokenizer("l"), "g": load_tokenizer("g"), "t5": tiny_t5_tokenizer()}


@pytest.fixture(scope="module")
def models():
    return tiny_sd3_models(seed=SEED)


def _clip(encoders) -> SD3ClipHandle:
    return SD3ClipHandle({k: encoders[k] for k in ("l", "g", "t5")}, _tokenizers(), device="cpu")


def _write(sd_env, models, layout: str):
    """loras/<layout>.safetensors; returns its name and {(encoder, module): delta at strength 1}."""
    _, config = sd_env
    gen = torch.Generator().manual_seed(11)
    sd, deltas = {}, {}
    for key, module, kohya, comfy in TARGETS:
        weight = dict(models[key].named_modules())[module].weight
        down = 0.3 * torch.randn(RANK, weight.shape[1], generator=gen)
        up = 0.3 * torch.randn(weight.shape[0], RANK, generator=gen)
        base = kohya if layout == "kohya" else comfy
        sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
        sd[f"{base}.alpha"] = torch.tensor(ALPHA)
        deltas[(key, module)] = (up @ down) * (ALPHA / RANK)
    path = config.models_dir / "loras" / f"tiny-sd3-te-{layout}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path.name, deltas


def _merged_by_hand(deltas, strength: float) -> SD3ClipHandle:
    # Fresh encoders of the same seed: the shared ones hold whatever patch encoded last.
    encoders = tiny_sd3_models(seed=SEED)
    with torch.no_grad():
        for (key, module), delta in deltas.items():
            dict(encoders[key].named_modules())[module].weight.add_(strength * delta)
    return _clip(encoders)


def _encode(clip):
    [[cond, opts]] = clip.encode_text(PROMPT)
    return cond, opts["pooled_output"]


@pytest.mark.parametrize("layout", ["kohya", "comfy"])
def test_sd3_text_encoder_lora_equals_merging_by_hand(sd_env, models, layout):
    name, deltas = _write(sd_env, models, layout)
    clip = _clip(models)
    model = SD3ModelHandle(models["transformer"], device="cpu")
    base_cond, base_pooled = _encode(clip)

    _, patched = lora_loader(model, clip, name, 1.0, 0.7)
    assert patched is not clip
    cond, pooled = _encode(patched)
    want_cond, want_pooled = _encode(_merged_by_hand(deltas, 0.7))
    torch.testing.assert_close(cond, want_cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-5)
    # every encoder took part: the CLIP rows, the T5 rows and the pooled vector all moved
    assert not torch.allclose(cond[:, :77], base_cond[:, :77], atol=1e-4)
    assert not torch.allclose(cond[:, 77:], base_cond[:, 77:], atol=1e-4)
    assert not torch.allclose(pooled, base_pooled, atol=1e-4)

    # the input handle still encodes its own weights (the shared encoders are restored for it)
    again_cond, again_pooled = _encode(clip)
    torch.testing.assert_close(again_cond, base_cond, rtol=0, atol=0)
    torch.testing.assert_close(again_pooled, base_pooled, rtol=0, atol=0)


def test_sd3_text_encoder_lora_at_strength_0_is_no_lora(sd_env, models):
    name, _ = _write(sd_env, models, "kohya")
    clip = _clip(models)
    model = SD3ModelHandle(models["transformer"], device="cpu")
    base_cond, base_pooled = _encode(clip)
    _, same = lora_loader(model, clip, name, 1.0, 0.0)
    cond, pooled = _encode(same)
    torch.testing.assert_close(cond, base_cond, rtol=0, atol=0)
    torch.testing.assert_close(pooled, base_pooled, rtol=0, atol=0)

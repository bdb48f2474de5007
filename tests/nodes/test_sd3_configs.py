"""SD3 configs read off real-sized tensor shapes (issue 14): SD3 Medium, SD3.5 Medium (MMDiT-X) and
SD3.5 Large / Large Turbo, plus T5-XXL, CLIP-L and OpenCLIP-G. The models are built with the real
diffusers / transformers classes on the meta device (shapes only, no memory spent on weights), written
under the original single-file names and read back by the loader's inference."""
from __future__ import annotations

import pytest
import torch

from nodes.models import sd3

# diffusers' transformer/config.json of the released models (the values that differ between them)
COMMON = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
          "joint_attention_dim": 4096, "pooled_projection_dim": 2048}
RELEASED = {
    "sd3_medium": {**COMMON, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                   "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": None},
    "sd3.5_medium": {**COMMON, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                     "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"},
    "sd3.5_large": {**COMMON, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                    "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": "rms_norm"},
}


def _meta_transformer(cfg: dict):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel.from_config({**sd3.shipped_config("transformer"), "sample_size": 128, **cfg})


@pytest.mark.parametrize("name", list(RELEASED))
def test_transformer_config_is_inferred_from_real_shapes(name):
    want = RELEASED[name]
    model = _meta_transformer(want)
    original = sd3.transformer_to_original(model.state_dict(), model.config)
    assert "joint_blocks.0.x_block.attn.qkv.weight" in original
    assert sd3.is_sd3({sd3.MMDIT_PREFIX + k: v for k, v in original.items()})
    cfg = sd3.infer_transformer_config(original)
    for key, value in want.items():
        got = cfg[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, (name, key, got)
    assert sd3.variant(cfg) == ("sd3" if name == "sd3_medium" else "sd35")
    # diffusers' own conversion of those names gives back every tensor of the model, at its shape
    converted = sd3.transformer_from_original(original)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes


def test_text_encoder_configs_are_inferred_from_real_shapes():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from nodes.models import detect

    t5_cfg = {k: v for k, v in sd3.shipped_config("text_encoder_3").items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**t5_cfg))
    sd = sd3.encoder_state_dict("t5", t5)
    assert sd3.encoder_kind(sd) == "t5"
    cfg = sd3.infer_t5_config(sd)
    assert (cfg["d_model"], cfg["d_ff"], cfg["num_layers"], cfg["num_heads"], cfg["d_kv"], cfg["vocab_size"]) == \
        (4096, 10240, 24, 64, 64, 32128)
    for kind, (width, layers, heads) in (("l", (768, 12, 12)), ("g", (1280, 32, 20))):
        base = detect.shipped_config("sdxl", "text_encoder" if kind == "l" else "text_encoder_2")
        kwargs = {k: v for k, v in base.items() if k not in ("architectures", "model_type")}
        with torch.device("meta"):
            clip = CLIPTextModelWithProjection(CLIPTextConfig(**kwargs))
        sd = sd3.encoder_state_dict(kind, clip)
        assert sd3.encoder_kind(sd) == kind
        got = detect.infer_clip_config(sd, "sdxl", kind)
        assert (got["hidden_size"], got["num_hidden_layers"], got["num_attention_heads"]) == (width, layers, heads)

"""SD3 storage formats (issue 14): fp8 (float8_e4m3fn) single files and separate text-encoder files, plain
and in ComfyUI's fp8-scaled form, load through the real loaders to the weights they were made from, to
fp8 precision."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from nodes.models import sd3
from nodes.models.sd3_handles import SD3ClipHandle
from nodes.models.tiny_sd3 import tiny_sd3_models, tiny_t5_tokenizer, write_tiny_sd3_checkpoint, write_tiny_sd3_encoders
from nodes.models.tokenizer import load_tokenizer

# e4m3fn keeps 3 mantissa bits: a rounding error of at most 2^-4 of the value, and half the smallest
# subnormal step (2^-9, before any scale) below the normal range.
REL, ABS = 2.0 ** -4, 2.0 ** -10


def _dtypes(path) -> dict[str, str]:
    """Each tensor's stored dtype as the safetensors header names it (F8_E4M3, F16, F32, ...)."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)


def _assert_fp8_close(got: torch.Tensor, want: torch.Tensor, name: str, scale: float = 1.0) -> None:
    err = (got.float() - want.float()).abs()
    bound = REL * want.float().abs() + ABS * scale + 1e-7
    assert bool((err <= bound).all()), f"{name}: max error {float(err.max()):.3g} over the fp8 bound"


def _compare(model, ref, name: str, scales: dict[str, float] | None = None) -> int:
    got = model.state_dict()
    n = 0
    for k, v in ref.state_dict().items():
        if k in got:
            _assert_fp8_close(got[k], v, f"{name}: {k}", (scales or {}).get(k, 1.0))
            n += 1
    return n


def test_single_file_with_an_fp8_t5_loads(tmp_path):
    """sd3_medium_incl_clips_t5xxlfp8: fp16 MMDiT, VAE and CLIPs, the T5 in float8_e4m3fn."""
    path = write_tiny_sd3_checkpoint(tmp_path / "sd3_medium_incl_clips_t5xxlfp8.safetensors", dtype=torch.float16,
                                     fp8="t5")
    dtypes = _dtypes(path)
    t5_weight = sd3.ENCODER_PREFIXES["t5"] + "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert dtypes[t5_weight] == "F8_E4M3"
    assert dtypes[sd3.MMDIT_PREFIX + "x_embedder.proj.weight"] == "F16"
    ck = sd3.load_sd3_checkpoint(path)
    ref = tiny_sd3_models()
    assert sorted(ck.text_encoders) == ["g", "l", "t5"]
    assert next(ck.text_encoders["t5"].parameters()).dtype == torch.float32
    assert _compare(ck.text_encoders["t5"], ref["t5"], "t5") > 10
    for k, v in ref["transformer"].state_dict().items():
        # the sin-cos position table is rebuilt by each construction (its last float32 bit can differ
        # between two builds, which can move its fp16 rounding by one fp16 step)
        atol = 2.0 ** -10 if k == "pos_embed.pos_embed" else 0
        torch.testing.assert_close(ck.transformer.state_dict()[k], v.half().float(), rtol=0, atol=atol)
    # the fp8 T5 encodes a prompt close to the full-precision one
    tok = tiny_t5_tokenizer()
    ids = torch.tensor([tok("a photo of a red cat").input_ids])
    a = ck.text_encoders["t5"](input_ids=ids).last_hidden_state
    b = ref["t5"](input_ids=ids).last_hidden_state
    assert float((a - b).norm() / b.norm()) < 0.1
    assert not torch.equal(a, b)  # it really went through fp8


@pytest.mark.parametrize("sd35", [pytest.param(False, id="sd3"), pytest.param(True, id="sd35")])
def test_fp8_scaled_single_file_loads(tmp_path, sd35):
    """sd3.5_large_fp8_scaled: the MMDiT and the encoders in ComfyUI's fp8-scaled form (per-tensor
    scale_weight, scaled_fp8 markers), the VAE in fp16."""
    path = write_tiny_sd3_checkpoint(tmp_path / "sd3.5_large_fp8_scaled.safetensors", sd35=sd35,
                                     dtype=torch.float16, fp8="scaled")
    dtypes = _dtypes(path)
    qkv = sd3.MMDIT_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"
    assert dtypes[qkv] == "F8_E4M3" and sd3.MMDIT_PREFIX + "scaled_fp8" in dtypes
    assert qkv[: -len("weight")] + "scale_weight" in dtypes
    ck = sd3.load_sd3_checkpoint(path)
    ref = tiny_sd3_models(sd35=sd35)
    assert ck.variant == ("sd35" if sd35 else "sd3") and sorted(ck.text_encoders) == ["g", "l", "t5"]
    # per-tensor scales: the absolute error floor scales with each tensor's largest value
    for key, model in (("transformer", ck.transformer), *ck.text_encoders.items()):
        scales = {k: float(v.abs().max()) / 448.0 for k, v in ref[key].state_dict().items()}
        assert _compare(model, ref[key], key, scales) > 10
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 20, 128, generator=torch.Generator().manual_seed(2))
    pooled = torch.randn(1, 96, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500.0])
    a = ck.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    b = ref["transformer"](hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    assert float((a - b).norm() / b.norm()) < 0.1 and not torch.equal(a, b)


@pytest.mark.parametrize("fp8", ["fp8", "scaled"])
@pytest.mark.parametrize("kind", ["l", "g", "t5"])
def test_separate_fp8_text_encoder_files_load(tmp_path, kind, fp8):
    """clip_l / clip_g / t5xxl files as t5xxl_fp8_e4m3fn(.._scaled).safetensors hold them."""
    files = write_tiny_sd3_encoders(tmp_path, fp8=fp8)
    path = files[kind]
    assert path.name.endswith("_fp8_e4m3fn_scaled.safetensors" if fp8 == "scaled" else "_fp8_e4m3fn.safetensors")
    assert "F8_E4M3" in set(_dtypes(path).values())
    got_kind, model = sd3.load_text_encoder_file(path, expect=kind)
    ref = tiny_sd3_models()[kind]
    scales = ({k: float(v.abs().max()) / 448.0 for k, v in ref.state_dict().items()} if fp8 == "scaled" else None)
    assert got_kind == kind and _compare(model, ref, kind, scales) > 5


def test_triple_clip_with_an_fp8_t5_encodes_close_to_full_precision(tmp_path):
    """The encoders as a TripleCLIPLoader gets them (fp16 CLIPs, fp8-scaled T5) give the conditioning of
    the full-precision encoders to fp8 precision; the CLIP part is exact to fp16."""
    fp16 = write_tiny_sd3_encoders(tmp_path, dtype=torch.float16)
    fp8 = write_tiny_sd3_encoders(tmp_path, fp8="scaled")
    encoders = {k: sd3.load_text_encoder_file(p)[1] for k, p in (("l", fp16["l"]), ("g", fp16["g"]), ("t5", fp8["t5"]))}
    tokenizers = {"l": load_tokenizer("l"), "g": load_tokenizer("g"), "t5": tiny_t5_tokenizer()}
    ref = tiny_sd3_models()
    ours = SD3ClipHandle(encoders, tokenizers, device="cpu")
    full = SD3ClipHandle({k: ref[k] for k in ("l", "g", "t5")}, tokenizers, device="cpu")
    [[a, a_opts]] = ours.encode_text("a photo of a red cat")
    [[b, b_opts]] = full.encode_text("a photo of a red cat")
    assert a.shape == b.shape == (1, 154, 128)
    torch.testing.assert_close(a_opts["pooled_output"], b_opts["pooled_output"], rtol=0, atol=2e-2)
    torch.testing.assert_close(a[:, :77], b[:, :77], rtol=0, atol=2e-2)
    t5_a, t5_b = a[:, 77:], b[:, 77:]
    assert float((t5_a - t5_b).norm() / t5_b.norm()) < 0.1 and not torch.equal(t5_a, t5_b)


@pytest.mark.parametrize("with_encoders", [pytest.param(True, id="incl_clips_t5"), pytest.param(False, id="bare")])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_half_precision_single_files_load_to_the_stored_values(tmp_path, dtype, with_encoders):
    """sd3.5_medium.safetensors-style files in fp16 or bf16, with the three encoders inside or without them:
    every tensor loads to exactly the value stored (the models run in fp32)."""
    path = write_tiny_sd3_checkpoint(tmp_path / "sd3.5_medium.safetensors", sd35=True, dtype=dtype,
                                     with_encoders=with_encoders)
    stored = {"F16" if dtype == torch.float16 else "BF16"}
    assert {d for d in _dtypes(path).values() if d.startswith(("F", "BF"))} == stored
    ck = sd3.load_sd3_checkpoint(path)
    assert ck.variant == "sd35" and sorted(ck.text_encoders) == (["g", "l", "t5"] if with_encoders else [])
    ref = tiny_sd3_models(sd35=True)
    # the sin-cos position table is rebuilt by each construction: its last float32 bit can move its rounding
    table_step = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    n = 0
    for key, model in (("transformer", ck.transformer), ("vae", ck.vae), *ck.text_encoders.items()):
        assert next(model.parameters()).dtype == torch.float32
        got = model.state_dict()
        for k, v in ref[key].state_dict().items():
            if k in got and v.is_floating_point():
                atol = table_step if k == "pos_embed.pos_embed" else 0
                torch.testing.assert_close(got[k], v.to(dtype).float(), rtol=0, atol=atol, msg=f"{key}: {k}")
                n += 1
    assert n > (200 if with_encoders else 100)

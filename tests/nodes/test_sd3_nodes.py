"""The SD3 nodes on tiny random-weight SD3 / SD3.5 models loaded from their single files (issue 14):
ModelSamplingSD3's shift against diffusers' flow-match scheduler and pipeline, EmptySD3LatentImage,
CLIPTextEncodeSD3 with each empty_padding (ComfyUI's SD3 encoder rules), the templates' negative
(ConditioningZeroOut for the last 90%, the real negative for the first 10%, ConditioningSetTimestepRange)
against Euler by hand, and TripleCLIPLoader's errors for a T5 file of the wrong size or dtype."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nodes.conditioning import conditioning_combine, conditioning_set_timestep_range, conditioning_zero_out
from nodes.models import sd3
from nodes.models.sd3_handles import SD3ClipHandle, SD3ModelHandle
from nodes.models.tiny_sd3 import (
    CLIP_WIDTH,
    T5_WIDTH,
    tiny_sd3_configs,
    tiny_sd3_models,
    tiny_t5_tokenizer,
    write_tiny_sd3_checkpoint,
    write_tiny_sd3_encoders,
)
from nodes.models.tokenizer import load_tokenizer
from nodes.models.vae import VaeHandle
from nodes.sampler_nodes import common_ksampler
from nodes.sampling.sample import prepare_noise, sample, sigmas_for
from nodes.sd3_nodes import clip_text_encode_sd3, empty_sd3_latent_image, model_sampling_sd3, triple_clip_loader

W_L, W_G = CLIP_WIDTH["l"], CLIP_WIDTH["g"]


def _tokenizers():
    return {"l": load_tokenizer("l"), "g": load_tokenizer("g"), "t5": tiny_t5_tokenizer()}


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    path = write_tiny_sd3_checkpoint(tmp_path_factory.mktemp("sd3n") / "tiny_sd35.safetensors", sd35=True)
    ck = sd3.load_sd3_checkpoint(path)
    model = SD3ModelHandle(ck.transformer, ck.variant, device="cpu")
    clip = SD3ClipHandle(ck.text_encoders, _tokenizers(), device="cpu")
    return ck, model, clip


def _flow_shift(shift: float, t: float) -> float:
    return shift * t / (1 + (shift - 1) * t)


# -- ModelSamplingSD3 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_model_sampling_sd3_shift_gives_the_flow_match_sigmas(sd35, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, model, _ = sd35
    patched = model_sampling_sd3(model, shift)
    assert model.sampling_schedule().shift == 3.0  # the input model is left as it was
    sched = patched.sampling_schedule()
    assert sched.shift == shift and sched.prediction_type == "flow"
    sigmas = sigmas_for(sched, "euler", "simple", 4, 1.0)
    # KSampler "simple" on the flow table: timesteps 1000, 750, 500, 250, shifted, then 0
    want = [_flow_shift(shift, t) for t in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    torch.testing.assert_close(sigmas.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(sigmas.float(), ref.sigmas.float(), rtol=0, atol=1e-6)
    assert sched.percent_to_sigma(0.5) == pytest.approx(_flow_shift(shift, 0.5))


def test_model_sampling_sd3_txt2img_matches_the_pipeline_at_that_shift(sd35):
    """The node chain (EmptySD3LatentImage -> ModelSamplingSD3 shift 6 -> KSampler euler/simple) against
    StableDiffusion3Pipeline with FlowMatchEulerDiscreteScheduler(shift=6) on the same unshifted sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    ck, model, clip = sd35
    steps, cfg, seed, shift = 4, 4.0, 21, 6.0
    latent = empty_sd3_latent_image(64, 64, 1)
    latent["samples"] = latent["samples"].cpu()
    pos, neg = clip.encode_text("a photo of a red house"), clip.encode_text("blurry")
    out = common_ksampler(model_sampling_sd3(model, shift), seed, steps, cfg, "euler", "simple", pos, neg, latent)
    unshifted = common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)
    vae = VaeHandle(ck.vae, device="cpu")
    ours = vae.decode(out["samples"])[0].numpy()
    assert float(np.abs(ours - vae.decode(unshifted["samples"])[0].numpy()).max()) > 2 / 255

    ref = tiny_sd3_models(sd35=True)
    tok = _tokenizers()
    pipe = StableDiffusion3Pipeline(
        transformer=ref["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=ref["vae"],
        text_encoder=ref["l"], tokenizer=tok["l"], text_encoder_2=ref["g"], tokenizer_2=tok["g"],
        text_encoder_3=ref["t5"], tokenizer_3=tok["t5"])
    noise = prepare_noise(latent["samples"], seed)
    image = pipe("a photo of a red house", negative_prompt="blurry", sigmas=[1.0, 0.75, 0.5, 0.25],
                 guidance_scale=cfg, latents=noise.clone(), height=64, width=64, max_sequence_length=77,
                 output_type="np").images[0]
    assert ours.shape == image.shape == (64, 64, 3) and float(ours.std()) > 0.01
    assert float(np.abs(ours - image).max()) <= 1 / 255


# -- EmptySD3LatentImage -----------------------------------------------------------------------------------

def test_empty_sd3_latent_image_is_16_channels_at_an_eighth(sd_env):
    registry, _ = sd_env
    latent = empty_sd3_latent_image(1216, 832, 3)["samples"]
    assert latent.shape == (3, 16, 104, 152) and latent.dtype == torch.float32 and not latent.any()
    spec = registry.object_info()["EmptySD3LatentImage"]["input"]["required"]
    for side in ("width", "height"):
        assert spec[side][1]["default"] == 1024 and spec[side][1]["min"] == 16 and spec[side][1]["step"] == 16
    assert registry.object_info()["EmptySD3LatentImage"]["category"] == "latent/sd3"


# -- CLIPTextEncodeSD3 -------------------------------------------------------------------------------------

def _encode(clip, clip_l, clip_g, t5xxl, padding):
    [[cond, opts]] = clip_text_encode_sd3(clip, clip_l, clip_g, t5xxl, padding)
    return cond, opts["pooled_output"]


def test_clip_text_encode_sd3_sends_each_prompt_to_its_encoder(sd35):
    _, _, clip = sd35
    a, b, c = "a red house", "a blue river at night", "a watercolor portrait of a robot"
    cond, pooled = _encode(clip, a, b, c, "empty_prompt")
    [[ca, oa]], [[cb, ob]], [[cc, _]] = clip.encode_text(a), clip.encode_text(b), clip.encode_text(c)
    assert cond.shape == (1, 154, T5_WIDTH)
    torch.testing.assert_close(cond[:, :77, :W_L], ca[:, :77, :W_L], rtol=0, atol=0)
    torch.testing.assert_close(cond[:, :77, W_L:W_L + W_G], cb[:, :77, W_L:W_L + W_G], rtol=0, atol=0)
    assert not cond[:, :77, W_L + W_G:].any()                 # zero padding to the T5 width
    torch.testing.assert_close(cond[:, 77:], cc[:, 77:], rtol=0, atol=0)
    torch.testing.assert_close(pooled[:, :W_L], oa["pooled_output"][:, :W_L], rtol=0, atol=0)
    torch.testing.assert_close(pooled[:, W_L:], ob["pooled_output"][:, W_L:], rtol=0, atol=0)
    # the same prompt everywhere is CLIPTextEncode's conditioning
    same, same_pooled = _encode(clip, a, a, a, "none")
    torch.testing.assert_close(same, ca, rtol=0, atol=0)
    torch.testing.assert_close(same_pooled, oa["pooled_output"], rtol=0, atol=0)


def test_clip_text_encode_sd3_empty_t5(sd35):
    """An empty t5xxl: "empty_prompt" encodes T5's empty prompt (EOS + padding, 77 tokens); "none" gives
    T5's encoding of the end token alone, one token (ComfyUI's empty token list)."""
    ck, _, clip = sd35
    prompt = "a red house"
    padded, _ = _encode(clip, prompt, prompt, "", "empty_prompt")
    [[empty_t5, _]] = clip.encode_text("")
    [[base, base_opts]] = clip.encode_text(prompt)
    assert padded.shape == (1, 154, T5_WIDTH)
    torch.testing.assert_close(padded[:, 77:], empty_t5[:, 77:], rtol=0, atol=0)
    cond, pooled = _encode(clip, prompt, prompt, "", "none")
    assert cond.shape == (1, 78, T5_WIDTH)
    torch.testing.assert_close(cond[:, :77], base[:, :77], rtol=0, atol=0)
    eos = ck.text_encoders["t5"](input_ids=torch.tensor([[tiny_t5_tokenizer().eos_token_id]])).last_hidden_state
    torch.testing.assert_close(cond[:, 77:], eos.float(), rtol=0, atol=1e-6)
    assert not torch.allclose(cond[:, 77], padded[:, 77], atol=1e-4)  # not the padded sequence's first token
    torch.testing.assert_close(pooled, base_opts["pooled_output"], rtol=0, atol=0)


def test_clip_text_encode_sd3_empty_clips(sd35):
    """"none" with clip_l and clip_g both empty: no CLIP tokens, zero pooled; one of them empty is padded
    back with the empty prompt (as ComfyUI matches L's and G's token counts), same as "empty_prompt"."""
    _, _, clip = sd35
    t5 = "a watercolor portrait of a robot"
    cond, pooled = _encode(clip, "", "", t5, "none")
    [[full, _]] = clip.encode_text(t5)
    assert cond.shape == (1, 77, T5_WIDTH) and pooled.shape == (1, W_L + W_G) and not pooled.any()
    torch.testing.assert_close(cond, full[:, 77:], rtol=0, atol=0)
    both_padded, padded_pooled = _encode(clip, "", "", t5, "empty_prompt")
    assert both_padded.shape == (1, 154, T5_WIDTH) and padded_pooled.any()
    for padding in ("none", "empty_prompt"):
        one, one_pooled = _encode(clip, "", "a red house", t5, padding)
        want, want_pooled = _encode(clip, "", "a red house", t5, "empty_prompt")
        torch.testing.assert_close(one, want, rtol=0, atol=0)
        torch.testing.assert_close(one_pooled, want_pooled, rtol=0, atol=0)
        assert one[:, :77, :W_L].any()  # CLIP-L encoded the empty prompt, not zeros
    # everything empty with "none": only T5's end token is left (ComfyUI's SD3 encoder), pooled zeros
    nothing, nothing_pooled = _encode(clip, "", "", "", "none")
    assert nothing.shape == (1, 1, T5_WIDTH) and not nothing_pooled.any()


def test_clip_text_encode_sd3_without_t5(sd35):
    """A DualCLIPLoader CLIP (clip_l + clip_g, no T5): the context is T5-XXL wide (4096; the model drops the
    zero columns it does not take) and holds the CLIP tokens alone, as ComfyUI's SD3 encoder makes it
    (diffusers would append zero T5 tokens instead); with every prompt empty and "none", 77 zero tokens and
    a zero pooled vector."""
    ck, model, _ = sd35
    clip = SD3ClipHandle({k: ck.text_encoders[k] for k in ("l", "g")}, _tokenizers(), device="cpu")
    cond, _ = _encode(clip, "a red house", "a red house", "ignored without T5", "none")
    assert cond.shape == (1, 77, sd3.T5_WIDTH) and cond[..., :W_L + W_G].any() and not cond[..., W_L + W_G:].any()
    [[plain, _]] = clip.encode_text("a red house")
    torch.testing.assert_close(plain, cond, rtol=0, atol=0)
    short, short_pooled = _encode(clip, "a red house", "a red house", "", "none")
    torch.testing.assert_close(short, cond, rtol=0, atol=0)
    nothing, pooled = _encode(clip, "", "", "", "none")
    assert nothing.shape == (1, 77, sd3.T5_WIDTH) and not nothing.any() and not pooled.any()
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    out = common_ksampler(model, 2, 2, 3.0, "euler", "simple", [[short, {"pooled_output": short_pooled}]],
                          [[nothing, {"pooled_output": pooled}]], latent)["samples"]
    assert torch.isfinite(out).all()


def test_clip_text_encode_sd3_none_conditioning_samples(sd35):
    """A 78-token positive (empty T5, "none") beside a 154-token negative goes through KSampler."""
    _, model, clip = sd35
    pos = clip_text_encode_sd3(clip, "a red house", "a red house", "", "none")
    neg = clip.encode_text("blurry")
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    out = common_ksampler(model, 2, 2, 3.0, "euler", "simple", pos, neg, latent)["samples"]
    other = common_ksampler(model, 2, 2, 3.0, "euler", "simple", clip.encode_text("a red house"), neg, latent)
    assert torch.isfinite(out).all() and not torch.allclose(out, other["samples"], atol=1e-4)


# -- the templates' negative: ConditioningZeroOut + ConditioningSetTimestepRange --------------------------

def test_template_negative_timestep_split_matches_euler_by_hand(sd35):
    """SD3 Medium's template: negative = Combine(SetTimestepRange(ZeroOut(neg), 0.1, 1.0),
    SetTimestepRange(neg, 0, 0.1)). With shift 3, 10% is sigma 2.7/2.8: the real negative guides the
    steps at sigma 1 and 0.98, the zeroed one the step at 0.6."""
    ck, model, clip = sd35
    pos, neg = clip.encode_text("a red house"), clip.encode_text("blurry, low quality")
    template_neg = conditioning_combine(conditioning_set_timestep_range(conditioning_zero_out(neg), 0.1, 1.0),
                                        conditioning_set_timestep_range(neg, 0.0, 0.1))
    assert model.sampling_schedule().percent_to_sigma(0.1) == pytest.approx(2.7 / 2.8)
    latent = torch.zeros(1, 16, 8, 8)
    noise = prepare_noise(latent, 9)
    sigmas = torch.tensor([1.0, 0.98, 0.6, 0.0])
    cfg = 3.0

    def run(negative):
        return sample(model.apply, model.sampling_schedule(), noise=noise, latent_image=latent, positive=pos,
                      negative=negative, cfg=cfg, sampler_name="euler", scheduler="simple", steps=3, seed=9,
                      sigmas=sigmas)

    got = run(template_neg)
    tr = ck.transformer

    def v(x, s, cond):
        ctx, opts = cond[0]
        return tr(hidden_states=x, timestep=torch.full((1,), s * 1000.0), encoder_hidden_states=ctx,
                  pooled_projections=opts["pooled_output"]).sample

    zero = conditioning_zero_out(neg)
    assert not zero[0][0].any() and not zero[0][1]["pooled_output"].any()
    x = noise.clone()
    for s, s_next in ((1.0, 0.98), (0.98, 0.6), (0.6, 0.0)):
        uncond = neg if s > 2.7 / 2.8 else zero
        den_c, den_u = x - v(x, s, pos) * s, x - v(x, s, uncond) * s
        den = den_u + (den_c - den_u) * cfg
        x = x + (x - den) / s * (s_next - s)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-4)
    # it is neither the real negative throughout nor the zeroed one throughout
    assert float((got - run(neg)).abs().max()) > 1e-3
    assert float((got - run(zero)).abs().max()) > 1e-3


# -- TripleCLIPLoader: a T5 file of the wrong size or dtype ---------------------------------------------------

@pytest.fixture(scope="module")
def encoder_files(sd_env):
    from tests.nodes.conftest import activate

    activate(sd_env)
    _, config = sd_env
    folder = config.models_dir / "text_encoders"
    files = write_tiny_sd3_encoders(folder, seed=3)
    cfg = dict(tiny_sd3_configs()["t5"])
    cfg.update(d_model=T5_WIDTH // 2, d_kv=T5_WIDTH // 4, d_ff=T5_WIDTH)   # a narrower T5 (as T5-XL for XXL)
    from transformers import T5Config, T5EncoderModel

    save_file({k: v.contiguous() for k, v in sd3.encoder_state_dict("t5", T5EncoderModel(T5Config(**cfg))).items()},
              str(folder / "t5_narrow.safetensors"))
    raw = files["t5"].read_bytes()
    (folder / "t5xxl_cut_short.safetensors").write_bytes(raw[: len(raw) * 2 // 3])
    sd = sd3.encoder_state_dict("t5", tiny_sd3_models(seed=3)["t5"])
    save_file({k: (v * 100).to(torch.int8).contiguous() for k, v in sd.items()},
              str(folder / "t5xxl_int8.safetensors"))
    return {kind: path.name for kind, path in files.items()}


def test_triple_clip_loader_loads_the_three_files(sd_env, encoder_files):
    clip = triple_clip_loader(encoder_files["l"], encoder_files["g"], encoder_files["t5"])
    assert isinstance(clip, SD3ClipHandle) and clip.has_t5
    [[cond, opts]] = clip.encode_text("a red house")
    assert cond.shape == (1, 154, T5_WIDTH) and opts["pooled_output"].shape == (1, W_L + W_G)


@pytest.mark.parametrize(("t5_name", "expected"), [
    ("t5_narrow.safetensors", r"'t5_narrow.safetensors' is a T5 encoder of width 64; SD3 expects T5-XXL \(width 128"),
    ("t5xxl_cut_short.safetensors", r"t5xxl_cut_short.safetensors.*truncated safetensors file: needs \d+ bytes, "
                                    r"file has \d+"),
    ("t5xxl_int8.safetensors", r"t5xxl_int8.safetensors.*t5xxl weights stored as torch.int8; expected float "
                               r"\(fp32, fp16, bf16 or fp8\)"),
])
def test_triple_clip_loader_names_a_bad_t5_file_and_what_was_expected(sd_env, encoder_files, t5_name, expected):
    with pytest.raises(ValueError, match=expected):
        triple_clip_loader(encoder_files["l"], encoder_files["g"], t5_name)


# -- DualCLIPLoader / CLIPLoader with type sd3 ------------------------------------------------------------

@pytest.fixture(scope="module")
def stored_encoders(sd_env, encoder_files):
    _, config = sd_env
    folder = config.models_dir / "text_encoders"
    out = {None: encoder_files}
    for storage, kwargs in (("fp16", {"dtype": torch.float16}), ("fp8", {"fp8": "fp8"})):
        out[storage] = {k: p.name for k, p in write_tiny_sd3_encoders(folder, seed=3, **kwargs).items()}
    return out


@pytest.mark.parametrize("storage", [None, "fp16", "fp8"])
def test_dual_clip_loader_sd3_gives_the_clip_pair_without_t5(sd_env, stored_encoders, storage):
    """DualCLIPLoader type sd3 with clip_l and clip_g files (either order; fp32, fp16 or fp8): an SD3 CLIP
    without T5 whose conditioning is the reference encoders' (to the storage's precision)."""
    from nodes.sd3_nodes import dual_clip_loader

    names = stored_encoders[storage]
    ref = tiny_sd3_models(seed=3)
    want_cond, want_opts = SD3ClipHandle({k: ref[k] for k in ("l", "g")}, _tokenizers(),
                                         device="cpu").encode_text("a red house")[0]
    for first, second in (("l", "g"), ("g", "l")):
        clip = dual_clip_loader(names[first], names[second], "sd3")
        assert isinstance(clip, SD3ClipHandle) and not clip.has_t5
        [[cond, opts]] = clip.encode_text("a red house")
        assert cond.shape == want_cond.shape == (1, 77, sd3.T5_WIDTH)   # the CLIP tokens alone
        if storage is None:
            torch.testing.assert_close(cond, want_cond, rtol=0, atol=1e-6)
            torch.testing.assert_close(opts["pooled_output"], want_opts["pooled_output"], rtol=0, atol=1e-6)
        else:
            rel = float((cond - want_cond).norm() / want_cond.norm())
            assert rel < (0.01 if storage == "fp16" else 0.1) and not torch.equal(cond, want_cond)


def test_sd3_encoder_sets_without_both_clips_run_with_zeros_in_their_place(sd_env, stored_encoders, sd35):
    """CLIPLoader type sd3 (one file) and DualCLIPLoader type sd3 with clip_l + t5 or clip_g + t5 run, as in
    ComfyUI: a missing CLIP's columns of the context and its part of the pooled vector are zeros, the rest
    is what the full set gives; T5 alone is T5's tokens alone, with a zero pooled vector."""
    from nodes.sd3_nodes import clip_loader, dual_clip_loader

    names = stored_encoders[None]
    [[full, full_opts]] = triple_clip_loader(names["l"], names["g"], names["t5"]).encode_text("a red house")
    full_pooled = full_opts["pooled_output"]
    cols = {"l": slice(0, W_L), "g": slice(W_L, W_L + W_G)}
    for kept, dropped in (("l", "g"), ("g", "l")):
        clip = dual_clip_loader(names[kept], names["t5"], "sd3")
        assert isinstance(clip, SD3ClipHandle) and clip.has_t5
        [[cond, opts]] = clip.encode_text("a red house")
        pooled = opts["pooled_output"]
        assert cond.shape == full.shape == (1, 154, T5_WIDTH) and pooled.shape == full_pooled.shape
        torch.testing.assert_close(cond[:, :77, cols[kept]], full[:, :77, cols[kept]], rtol=0, atol=1e-6)
        assert not cond[:, :77, cols[dropped]].any() and not pooled[:, cols[dropped]].any()
        torch.testing.assert_close(cond[:, 77:], full[:, 77:], rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled[:, cols[kept]], full_pooled[:, cols[kept]], rtol=0, atol=1e-6)
    t5_only = clip_loader(names["t5"], "sd3")
    [[cond, opts]] = t5_only.encode_text("a red house")
    assert cond.shape == (1, 77, T5_WIDTH) and opts["pooled_output"].shape == (1, W_L + W_G)
    torch.testing.assert_close(cond, full[:, 77:], rtol=0, atol=1e-6)
    assert not opts["pooled_output"].any()
    [[l_only, _]] = clip_loader(names["l"], "sd3").encode_text("a red house")
    assert l_only.shape == (1, 77, sd3.T5_WIDTH) and l_only[..., :W_L].any() and not l_only[..., W_L:].any()
    # CLIPTextEncodeSD3 takes partial sets too (each prompt goes to the encoders there are)
    for clip in (t5_only, dual_clip_loader(names["g"], names["t5"], "sd3")):
        [[sep, sep_opts]] = clip_text_encode_sd3(clip, "a red house", "a red house", "a red house", "none")
        [[same, same_opts]] = clip.encode_text("a red house")
        torch.testing.assert_close(sep, same, rtol=0, atol=0)
        torch.testing.assert_close(sep_opts["pooled_output"], same_opts["pooled_output"], rtol=0, atol=0)
    # a partial set's conditioning samples
    _, model, _ = sd35
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    out = common_ksampler(model, 2, 2, 3.0, "euler", "simple", [[cond, opts]],
                          dual_clip_loader(names["g"], names["t5"], "sd3").encode_text("blurry"), latent)["samples"]
    assert torch.isfinite(out).all()
    with pytest.raises(NotImplementedError, match="DualCLIPLoader: type 'flux'"):
        dual_clip_loader(names["l"], names["t5"], "flux")

"""Every KSampler sampler and every scheduler over the flow sigmas of a tiny SD3.5 (MMDiT-X) model loaded
from its single file (issue 14): the schedule stays inside the flow range and the sampled latent is finite,
of the right shape, and moved away from the noise towards a denoised latent."""
from __future__ import annotations

import pytest
import torch

from nodes.models import sd3
from nodes.models.sd3_handles import SD3ClipHandle, SD3ModelHandle
from nodes.models.tiny_sd3 import tiny_t5_tokenizer, write_tiny_sd3_checkpoint
from nodes.models.tokenizer import load_tokenizer
from nodes.sampler_nodes import common_ksampler
from nodes.sampling import SAMPLER_NAMES, SCHEDULER_NAMES
from nodes.sampling.sample import prepare_noise, sigmas_for
from nodes.sd3_nodes import empty_sd3_latent_image

STEPS, SEED = 3, 11


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    path = write_tiny_sd3_checkpoint(tmp_path_factory.mktemp("sd3s") / "tiny_sd35.safetensors", sd35=True)
    ck = sd3.load_sd3_checkpoint(path)
    clip = SD3ClipHandle(ck.text_encoders, {"l": load_tokenizer("l"), "g": load_tokenizer("g"),
                                            "t5": tiny_t5_tokenizer()}, device="cpu")
    model = SD3ModelHandle(ck.transformer, ck.variant, device="cpu")
    latent = empty_sd3_latent_image(64, 64, 1)
    latent["samples"] = latent["samples"].cpu()
    return model, clip.encode_text("a red house by a river"), clip.encode_text("blurry"), latent


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_and_scheduler_over_flow_sigmas(sd35, sampler, scheduler):
    model, pos, neg, latent = sd35
    sigmas = sigmas_for(model.sampling_schedule(), sampler, scheduler, STEPS, 1.0)
    # the flow range: sigma 1 is pure noise, nothing above it; the last sigma is 0 (fully denoised)
    assert float(sigmas[0]) <= 1.0 + 1e-6 and float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] <= sigmas[:-1] + 1e-6).all()), sigmas
    out = common_ksampler(model, SEED, STEPS, 3.0, sampler, scheduler, pos, neg, latent)["samples"]
    assert out.shape == latent["samples"].shape == (1, 16, 8, 8)
    assert bool(torch.isfinite(out).all()), (sampler, scheduler)
    # The output is a raw latent: model space (x * 1.5305 after the 0.0609 shift) back through the
    # latent format. Unit-variance noise left as it was would sit far from any denoised latent of this
    # model; a sampler that diverges on sigmas <= 1 blows up instead.
    noise = prepare_noise(latent["samples"], SEED)
    model_space = (out - 0.0609) * 1.5305
    assert float((model_space - noise).abs().max()) > 0.1
    # The random-weight model's own predictions reach ~10 here (res_multistep_ancestral, which ComfyUI runs
    # in its VE form on flow models too, ~26); a sampler that diverges on flow sigmas goes to inf/NaN.
    assert float(model_space.abs().max()) < 50.0

"""End-to-end parity of sdflow's KSampler with diffusers' StableDiffusionPipeline on the same weights.

A tiny random-weight SD1 checkpoint is written in the real single-file layout and run through sdflow's
Executor (CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode). A
probe output node hands back the loaded MODEL/CLIP/VAE, the conditionings, the sampled LATENT and the
decoded IMAGE. The reference is diffusers' own StableDiffusionPipeline built from *those same
in-memory modules* (UNet, VAE, CLIP text model, tokenizer) plus a diffusers scheduler configured from
the shipped SD1 scheduler config (scaled_linear betas 0.00085..0.012, 1000 training steps).

Both sides get the same prompt, seed, steps, CFG scale and 64x64 size, and the same initial noise
(ComfyUI's: ``torch.randn`` of the latent shape from a CPU generator seeded with the seed). Final
latents (sdflow's LATENT holds raw VAE latents, ComfyUI's convention; the pipeline's
``output_type="latent"`` ones are divided by the VAE's scaling factor to match) and decoded images
are compared.

How the two differ, and what the test does about it
----------------------------------------------------
* Initial noise scale. ComfyUI starts a full-denoise run at ``noise * sqrt(1 + sigma_max^2)``
  (the VP prior at t=T written in the VE parametrisation). diffusers' Euler schedulers with
  ``timestep_spacing="linspace"`` report ``init_noise_sigma = sigma_max`` and the pipeline always
  multiplies the given ``latents`` by ``init_noise_sigma`` (so passing ``noise * init_noise_sigma``
  would scale it twice). For SD, sqrt(1 + 14.6146^2) / 14.6146 = 1.00234: left alone this shows as a
  0.23 % relative difference of the final latents, far above float round-off. The test feeds the
  pipeline ``noise * sqrt(1 + sigma_max^2) / init_noise_sigma`` and checks separately that feeding
  bare ``noise`` is *outside* the tight tolerance (so the tolerance can tell such a convention apart).
  DPMSolverMultistepScheduler works in the VP parametrisation (``init_noise_sigma = 1``), where
  ComfyUI's start point is exactly ``noise``, so it needs no correction.
* Timesteps of "normal". ComfyUI's "normal" is linear in timestep from t(sigma_max)=999 to
  t(sigma_min)=0 and maps t -> sigma by log-linear interpolation of the sigma table; diffusers'
  ``timestep_spacing="linspace"`` uses the same timesteps (``linspace(0, 999, steps)`` reversed) but
  interpolates sigma *linearly*. The timestep the UNet sees is the same and the sigmas agree to
  1.3e-5 relative (checked below), so "linspace" is the diffusers config with the same math
  ("leading"/"trailing" give different timesteps altogether). The largest sigma difference is not the
  interpolation but the table: diffusers builds betas/alphas_cumprod in float32, sdflow in float64, and
  sigma_min = sqrt((1 - a0) / a0) with a0 = 1 - 0.00085 loses ~1e-5 of its precision in float32.
* Karras timesteps. DPMSolverMultistepScheduler(use_karras_sigmas=True) uses the same Karras sigmas
  (rho 7 between the table's sigma_min and sigma_max) but *rounds* the model timestep t(sigma) to an
  integer; ComfyUI feeds the fractional timestep. Stock diffusers therefore differs by ~1e-3 relative
  (checked with a loose tolerance); with the scheduler's timesteps replaced by the unrounded ones
  (subclass below, nothing else changed) the runs agree to float round-off.
* Ancestral noise. ComfyUI's euler_ancestral draws each step's noise from a generator on the latent's
  device, seeded with the seed, plus one on the CPU (where the initial noise already used the seed;
  ComfyUI added the + 1 in PR #11528, 0.3.x used the plain seed and so re-added the initial noise);
  diffusers' EulerAncestralDiscreteScheduler draws it with ``randn`` from the pipeline's ``generator``.
  Since the initial latents are passed in, the pipeline draws nothing else from that generator, so
  seeding it with seed + 1 gives identical per-step noise on the CPU (diffusers also draws one unused
  tensor at the final step to sigma=0, after all others). Compared exactly, not by statistics.
* CFG batching. sdflow evaluates [positive, negative] in one batch, diffusers [negative, positive]:
  float round-off only.

Tolerances: latents are O(40) here (random weights do not denoise), so they are compared relative to
their scale (max |diff| / max |ref|): tight = 2e-5 (observed 2.1e-6 .. 2.5e-6), Karras with stock
rounded timesteps = 1e-2 (observed 3.5e-3). Images are in 0..1 and compared absolutely: tight 1e-4
(observed 2.6e-6), stock Karras 1e-2 (observed 3.9e-3). The uncorrected Euler start point gives 2.8e-3.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)

import nodes
from engine.config import RuntimeConfig
from engine.executor import Executor
from engine.node import UI, node
from nodes.models import detect
from nodes.models.tiny import write_tiny_checkpoint
from nodes.sampling import DiscreteSchedule, calculate_sigmas
from nodes.types import Clip, Conditioning, Image, Latent, Model, Vae

SEED = 42
STEPS = 8
CFG = 7.0
SIZE = 64
POSITIVE = "a photo of a cat sitting on a red chair"
NEGATIVE = "blurry, watermark"

TIGHT_REL = 2e-5
IMAGE_ATOL = 1e-4

_probe: dict[str, dict[str, Any]] = {}


@node("ParityProbe", output_node=True, category="testing")
def parity_probe(tag: str, model: Model, clip: Clip, vae: Vae, positive: Conditioning, negative: Conditioning,
                 latent: Latent, image: Image):
    """Test-only output node: keeps the values the graph produced for the comparison."""
    _probe[tag] = dict(model=model, clip=clip, vae=vae, positive=positive, negative=negative,
                       latent=latent["samples"].clone(), image=image.clone())
    return UI()


def _graph(sampler: str, scheduler: str, positive: str = POSITIVE) -> dict:
    tag = f"{sampler}/{scheduler}/{positive}"
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "ParityProbe", "inputs": {
            "tag": tag, "model": ["4", 0], "clip": ["4", 1], "vae": ["4", 2], "positive": ["6", 0],
            "negative": ["7", 0], "latent": ["3", 0], "image": ["8", 0]}},
    }


class Sdflow:
    """One registry + executor over a tiny checkpoint; runs a KSampler graph and returns the probe."""

    def __init__(self, root: Path) -> None:
        cfg = RuntimeConfig(data_dir=root)
        write_tiny_checkpoint(cfg.models_dir / "checkpoints" / "tiny.safetensors", "sd1", seed=3)
        registry, _ = nodes.build_registry(cfg, plugins=False)
        registry.add(parity_probe)
        self.executor = Executor(registry)

    def run(self, sampler: str, scheduler: str, positive: str = POSITIVE) -> dict[str, Any]:
        graph = _graph(sampler, scheduler, positive)
        result = self.executor.execute(graph, f"parity-{sampler}-{scheduler}")
        assert result.status == "success", result.error
        return _probe[graph["9"]["inputs"]["tag"]]


@pytest.fixture(scope="module")
def sdflow(tmp_path_factory: pytest.TempPathFactory) -> Sdflow:
    return Sdflow(tmp_path_factory.mktemp("parity"))


def _scheduler_config() -> dict:
    cfg = detect.shipped_config("sd1", "scheduler")
    assert (cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"]) == (
        "scaled_linear", 0.00085, 0.012, 1000)
    return cfg


def _pipeline(probe: dict[str, Any], scheduler) -> StableDiffusionPipeline:
    """diffusers' pipeline over the very modules sdflow's CheckpointLoaderSimple loaded."""
    clip = probe["clip"]
    pipe = StableDiffusionPipeline(
        vae=probe["vae"].vae, text_encoder=clip.text_encoders["l"], tokenizer=clip.tokenizers["l"],
        unet=probe["model"].unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _comfy_noise() -> torch.Tensor:
    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(SEED))


@torch.no_grad()
def _reference(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents (raw: the pipeline's scaled ones over the scaling factor, as a LATENT holds them)
    and the decoded image [B,H,W,C]."""
    lat = pipe(POSITIVE, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
               height=SIZE, width=SIZE, latents=latents, output_type="latent",
               generator=torch.Generator().manual_seed(SEED + 1)).images   # sdflow's per-step seed on CPU
    decoded = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image = pipe.image_processor.postprocess(decoded, output_type="pt")
    return lat / pipe.vae.config.scaling_factor, image.permute(0, 2, 3, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _comfy_start_factor(scheduler) -> float:
    """Scale that turns the pipeline's ``latents * init_noise_sigma`` into ComfyUI's start point."""
    sigma_max = float(scheduler.sigmas.max())
    return math.sqrt(1.0 + sigma_max**2) / float(scheduler.init_noise_sigma)


# ------------------------------------------------------------------------------------------ tests

def test_prompt_embeddings_match_diffusers(sdflow: Sdflow) -> None:
    probe = sdflow.run("euler", "normal")
    pipe = _pipeline(probe, EulerDiscreteScheduler.from_config(_scheduler_config()))
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(POSITIVE, "cpu", 1, True, NEGATIVE)
    # Same tokenizer, same EOS padding to 77, final-layer-normed last hidden state: identical tensors.
    torch.testing.assert_close(probe["positive"][0][0], pos, atol=1e-6, rtol=0)
    torch.testing.assert_close(probe["negative"][0][0], neg, atol=1e-6, rtol=0)
    # ComfyUI-style weighting of an unweighted prompt is plain encoding; an explicit weight 1.0 too.
    clip = probe["clip"]
    explicit = clip.encode_text(f"({POSITIVE}:1.0)")[0][0]
    torch.testing.assert_close(explicit, pos, atol=1e-6, rtol=0)
    # ... while a real weight changes it (so the comparison above can fail).
    weighted = clip.encode_text(f"({POSITIVE}:1.3)")[0][0]
    assert (weighted - pos).abs().max() > 1e-3


def test_normal_schedule_is_diffusers_linspace() -> None:
    sched = EulerDiscreteScheduler.from_config(_scheduler_config(), timestep_spacing="linspace")
    sched.set_timesteps(STEPS)
    ours = calculate_sigmas(DiscreteSchedule(), "normal", STEPS)
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=3e-5, atol=0)  # observed 1.3e-5
    ours_t = DiscreteSchedule().timestep(ours[:-1])
    torch.testing.assert_close(ours_t.float(), sched.timesteps.float(), rtol=0, atol=1e-3)


def test_euler_normal_matches_diffusers_euler(sdflow: Sdflow) -> None:
    probe = sdflow.run("euler", "normal")
    sched = EulerDiscreteScheduler.from_config(_scheduler_config(), timestep_spacing="linspace")
    sched.set_timesteps(STEPS)
    factor = _comfy_start_factor(sched)
    assert 1.002 < factor < 1.003  # sqrt(1 + sigma_max^2) / sigma_max for SD's schedule
    noise = _comfy_noise()
    lat, image = _reference(_pipeline(probe, sched), noise * factor)
    assert lat.shape == probe["latent"].shape
    assert _rel(probe["latent"], lat) < TIGHT_REL
    assert image.shape == probe["image"].shape == (1, SIZE, SIZE, 3)
    torch.testing.assert_close(probe["image"], image, atol=IMAGE_ATOL, rtol=0)

    # Without the start-point correction diffusers' convention is visible: well outside the tolerance.
    lat_plain, _ = _reference(_pipeline(probe, sched), noise)
    assert _rel(probe["latent"], lat_plain) > 50 * TIGHT_REL


def test_euler_ancestral_matches_diffusers_with_same_noise(sdflow: Sdflow) -> None:
    probe = sdflow.run("euler_ancestral", "normal")
    sched = EulerAncestralDiscreteScheduler.from_config(_scheduler_config(), timestep_spacing="linspace")
    sched.set_timesteps(STEPS)
    lat, image = _reference(_pipeline(probe, sched), _comfy_noise() * _comfy_start_factor(sched))
    assert _rel(probe["latent"], lat) < TIGHT_REL
    torch.testing.assert_close(probe["image"], image, atol=IMAGE_ATOL, rtol=0)
    # The ancestral noise really is in play: the deterministic Euler run ends elsewhere.
    euler = sdflow.run("euler", "normal")
    assert _rel(euler["latent"], lat) > 1e-2


class UnroundedKarrasDPMSolver(DPMSolverMultistepScheduler):
    """diffusers' DPM-Solver++ with Karras sigmas, but the model sees the fractional timestep t(sigma)
    (log-sigma interpolation of the table, as ComfyUI) instead of t(sigma) rounded to an integer."""

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps(*args, **kwargs)
        log_sigmas = np.log(((1 - self.alphas_cumprod) / self.alphas_cumprod).numpy() ** 0.5)
        exact = [self._sigma_to_t(s, log_sigmas) for s in self.sigmas[:-1].numpy()]
        self.timesteps = torch.tensor(np.asarray(exact).ravel(), dtype=torch.float32)


def test_dpmpp_2m_karras_matches_diffusers_dpmsolver(sdflow: Sdflow) -> None:
    probe = sdflow.run("dpmpp_2m", "karras")
    cfg = dict(_scheduler_config(), use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2)
    stock = DPMSolverMultistepScheduler.from_config(cfg)
    stock.set_timesteps(STEPS)
    torch.testing.assert_close(calculate_sigmas(DiscreteSchedule(), "karras", STEPS), stock.sigmas.float(),
                               rtol=3e-5, atol=0)  # sigma_min: float32 table, see docstring
    assert float(stock.init_noise_sigma) == 1.0  # VP space: ComfyUI's start point is the bare noise
    noise = _comfy_noise()

    # Stock diffusers: integer timesteps -> small but visible difference.
    lat_stock, image_stock = _reference(_pipeline(probe, stock), noise)
    assert _rel(probe["latent"], lat_stock) < 1e-2
    torch.testing.assert_close(probe["image"], image_stock, atol=1e-2, rtol=0)

    # Same scheduler with ComfyUI's fractional timesteps: the same math, to float round-off.
    lat, image = _reference(_pipeline(probe, UnroundedKarrasDPMSolver.from_config(cfg)), noise)
    assert _rel(probe["latent"], lat) < TIGHT_REL
    torch.testing.assert_close(probe["image"], image, atol=IMAGE_ATOL, rtol=0)
    assert _rel(probe["latent"], lat_stock) > 10 * TIGHT_REL  # the rounding is what the loose check allowed

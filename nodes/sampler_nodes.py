"""KSampler and KSamplerAdvanced: ComfyUI's sampler nodes over nodes.sampling.

Noise comes from a CPU generator seeded with `seed`, so a seed gives the same image on any device. Each
step reports progress (which is also where an interrupt stops sampling) with a cheap latent->RGB preview.
LATENT values hold model-space latents (the VAE's scaling factor is applied by the VAE nodes).
"""
from __future__ import annotations

import contextlib
from typing import Annotated, Any

import torch

from engine import progress
from engine.inputs import Combo, Float, Int
from engine.node import node

from . import costs
from .models.diffusion_model import DiffusionModelHandle
from .models.memory import release_text_encoders
from .sampling import SAMPLER_NAMES, SCHEDULER_NAMES
from .sampling.model_sampling import DiscreteSchedule
from .sampling.preview import latent_to_rgb
from .sampling.sample import prepare_noise, sample
from .types import Conditioning, Latent, Model

MAX_SEED = 0xFFFFFFFFFFFFFFFF
_PREVIEW_ARCH = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sdxl_refiner": "sdxl", "sd3": "sd3"}


def patched_guider(model) -> Any:
    """The denoiser factory a guider patch (PerpNeg) puts on the model, or None for plain CFG."""
    patch = getattr(model, "sampling_patches", {}).get("guider")
    if patch is None:
        return None
    from .sampling.custom import Guider
    kind, conds, options = patch
    return Guider(model, {"positive": [], "negative": [], **conds}, 1.0, kind, dict(options)).denoiser_factory()


def common_ksampler(model: DiffusionModelHandle, seed: int, steps: int, cfg: float, sampler_name: str,
                    scheduler: str, positive: list, negative: list, latent: dict, denoise: float = 1.0,
                    disable_noise: bool = False, start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> dict:
    samples = latent["samples"]
    batch_index = latent.get("batch_index")
    noise = torch.zeros_like(samples, device="cpu") if disable_noise else prepare_noise(samples, seed, batch_index)
    schedule = model.sampling_schedule() if hasattr(model, "sampling_schedule") else \
        DiscreteSchedule(prediction_type=model.prediction_type)
    device = model.load_device if hasattr(model, "load_device") else samples.device
    preview_arch = _PREVIEW_ARCH.get(model.arch, "sd1")

    def on_step(step: int, total: int, x0: torch.Tensor) -> None:
        preview = latent_to_rgb(x0[:1].float().cpu(), preview_arch) if progress.wants_preview() else None
        progress.report(step + 1, total, preview)

    hooks = model.output_block_hooks() if hasattr(model, "output_block_hooks") else contextlib.nullcontext()
    release_text_encoders()   # the prompts are encoded: the sampled model gets the encoders' room
    with hooks:
        out = sample(model.apply, schedule, noise=noise.to(device), latent_image=samples.to(device),
                     positive=positive, negative=negative, cfg=cfg, sampler_name=sampler_name,
                     scheduler=scheduler, steps=steps, seed=seed, denoise=denoise,
                     noise_mask=latent.get("noise_mask"), start_step=start_step, last_step=last_step,
                     force_full_denoise=force_full_denoise, add_noise=not disable_noise, callback=on_step,
                     patches=getattr(model, "sampling_patches", None), denoiser_factory=patched_guider(model),
                     latent_format=getattr(model, "latent_format", None))
    return {**latent, "samples": out}


@node("KSampler", category="sampling", cost=costs.ksampler)
def ksampler(model: Model,
             seed: Annotated[int, Int(0, min=0, max=MAX_SEED, control_after_generate=True,
                       tooltip="The random seed used for creating the noise.")],
             steps: Annotated[int, Int(20, min=1, max=10000,
                                       tooltip="The number of steps used in the denoising process.")],
             cfg: Annotated[float, Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                        tooltip="Classifier-free guidance scale: higher follows the prompt more closely.")],
             sampler_name: Annotated[str, Combo(SAMPLER_NAMES, tooltip="The algorithm used when sampling.")],
             scheduler: Annotated[str, Combo(SCHEDULER_NAMES, tooltip="How the noise level decreases over the steps.")],
             positive: Conditioning, negative: Conditioning, latent_image: Latent,
             denoise: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.01,
                            tooltip="How much of the latent is replaced by noise (1.0 = all, for text-to-image).")]
             ) -> Latent:
    """Uses the provided model, positive and negative conditioning to denoise the latent image."""
    return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                           latent_image, denoise=denoise)


@node("KSamplerAdvanced", category="sampling", display_name="KSampler (Advanced)", cost=costs.ksampler)
def ksampler_advanced(model: Model, add_noise: Annotated[str, Combo(["enable", "disable"])],
                      noise_seed: Annotated[int, Int(0, min=0, max=MAX_SEED, control_after_generate=True)],
                      steps: Annotated[int, Int(20, min=1, max=10000)],
                      cfg: Annotated[float, Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)],
                      sampler_name: Annotated[str, Combo(SAMPLER_NAMES)],
                      scheduler: Annotated[str, Combo(SCHEDULER_NAMES)],
                      positive: Conditioning, negative: Conditioning, latent_image: Latent,
                      start_at_step: Annotated[int, Int(0, min=0, max=10000)],
                      end_at_step: Annotated[int, Int(10000, min=0, max=10000)],
                      return_with_leftover_noise: Annotated[str, Combo(["disable", "enable"])]) -> Latent:
    """Samples a range of steps of a schedule, for multi-stage workflows (base/refiner hand-off)."""
    return common_ksampler(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                           latent_image, denoise=1.0, disable_noise=add_noise == "disable",
                           start_step=start_at_step, last_step=end_at_step,
                           force_full_denoise=return_with_leftover_noise == "disable")

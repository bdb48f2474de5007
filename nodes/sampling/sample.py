"""The entry point behind KSampler / KSamplerAdvanced (ComfyUI ``common_ksampler`` semantics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .guidance import ApplyModel, Conditioning, make_denoiser, prepare_mask
from .model_sampling import DiscreteSchedule
from .samplers import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, get_sampler
from .schedulers import calculate_sigmas

ProgressCallback = Callable[[int, int, torch.Tensor], None]


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """Initial noise from a CPU generator, so a seed gives the same image on any device (as ComfyUI).

    With ``batch_index`` (latents split from a batch), noise for index i is the (i+1)-th draw of
    ``latent[0]``'s shape, so each image matches its place in the original batch.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    shape = tuple(latent.shape)
    if batch_index is None:
        return torch.randn(shape, dtype=torch.float32, generator=gen, device="cpu").to(latent.dtype)
    single = (1,) + shape[1:]
    wanted = sorted(set(int(i) for i in batch_index))
    draws: dict[int, torch.Tensor] = {}
    for i in range(wanted[-1] + 1 if wanted else 0):
        n = torch.randn(single, dtype=torch.float32, generator=gen, device="cpu")
        if i in wanted:
            draws[i] = n
    return torch.cat([draws[int(i)] for i in batch_index], dim=0).to(latent.dtype)


def sigmas_for(
    schedule: DiscreteSchedule, sampler_name: str, scheduler: str, steps: int, denoise: float = 1.0
) -> torch.Tensor:
    """The sigma sequence KSampler uses: partial denoise keeps the tail of a longer schedule."""
    def compute(n: int) -> torch.Tensor:
        discard = sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        sig = calculate_sigmas(schedule, scheduler, n + 1 if discard else n)
        if discard:
            sig = torch.cat([sig[:-2], sig[-1:]])
        return sig

    if denoise is None or denoise > 0.9999:
        return compute(steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    return compute(int(steps / denoise))[-(steps + 1):]


LatentFormat = tuple[float, float]  # (scale, shift): model space is (raw - shift) * scale


def process_latent_in(x: torch.Tensor, latent_format: LatentFormat | None) -> torch.Tensor:
    if latent_format is None:
        return x
    scale, shift = latent_format
    return (x - shift) * scale


def process_latent_out(x: torch.Tensor, latent_format: LatentFormat | None) -> torch.Tensor:
    if latent_format is None:
        return x
    scale, shift = latent_format
    return x / scale + shift


def _concat_latents_in(conds: Conditioning, latent_format: LatentFormat | None) -> Conditioning:
    """Entries' ``concat_latent_image`` (inpainting / InstructPix2Pix) in model space, as the UNet
    takes it (ComfyUI's concat_cond applies process_latent_in to it)."""
    if latent_format is None:
        return conds
    out = []
    for entry in conds:
        opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else None
        if opts is not None and opts.get("concat_latent_image") is not None:
            entry = [entry[0], {**opts, "concat_latent_image":
                                process_latent_in(opts["concat_latent_image"].float(), latent_format)},
                     *entry[2:]]
        out.append(entry)
    return out


def sample(
    apply_model: ApplyModel,
    schedule: DiscreteSchedule,
    *,
    noise: torch.Tensor | None,
    latent_image: torch.Tensor,
    positive: Conditioning,
    negative: Conditioning,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    steps: int,
    seed: int,
    denoise: float = 1.0,
    noise_mask: torch.Tensor | None = None,
    start_step: int | None = None,
    last_step: int | None = None,
    force_full_denoise: bool = False,
    add_noise: bool = True,
    callback: ProgressCallback | None = None,
    sigmas: torch.Tensor | None = None,
    sampler_options: dict[str, Any] | None = None,
    denoiser_factory: Callable[..., Any] | None = None,
    patches: dict[str, Any] | None = None,
    latent_format: LatentFormat | None = None,
) -> torch.Tensor:
    """Run one KSampler call and return the sampled latent (same space and shape as ``latent_image``).

    ``latent_image`` is [B, C, h, w] raw VAE latents (ComfyUI's LATENT convention) and the result is
    too; ``latent_format`` (the model's (scale, shift)) takes it into model space before noise is
    added and back after sampling, as ComfyUI's process_latent_in/out (None: no rescaling). ``noise``
    is model-space noise and is never rescaled.
    ``callback(step_index, total_steps, x0)`` runs after each step's model evaluation (0-based
    step_index, at most total_steps - 1; progress is step_index + 1); x0 is the denoised estimate
    in model space (what ``preview.latent_to_rgb`` expects, as ComfyUI's previewers). Samplers with their
    own step grid (dpm_fast, dpm_adaptive) report their own step indices, as in ComfyUI. An exception
    raised by the callback propagates and stops sampling (the interrupt path). ``sigmas`` overrides the
    scheduler (custom sampling).
    ``sampler_options`` are keyword arguments for the sampler (eta, s_noise, ...); ``denoiser_factory``
    replaces ``make_denoiser`` (same arguments) for guiders other than CFG (``guiders.py``).
    ``patches`` are the model's sampling patches (``cfg_function``, ``denoise_mask_function``).
    """
    get_sampler(sampler_name)  # fail fast on an unknown name
    device = latent_image.device
    if sigmas is None:
        sigmas = sigmas_for(schedule, sampler_name, scheduler, steps, denoise)
    sigmas = sigmas.to(device=device, dtype=torch.float32)

    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return latent_image
    if sigmas.numel() <= 1:
        return latent_image

    latent = process_latent_in(latent_image.to(torch.float32), latent_format)
    positive = _concat_latents_in(positive, latent_format)
    negative = _concat_latents_in(negative, latent_format)
    if not add_noise or noise is None:
        noise = torch.zeros_like(latent)
    noise = noise.to(device=device, dtype=torch.float32)

    inpaint_noise = noise
    if sampler_name == "ddim" and noise_mask is not None:
        # ComfyUI's ddim re-noises the kept region with fresh noise from seed+1 instead of the initial noise
        gen = torch.Generator(device="cpu").manual_seed((int(seed) + 1) % 2**64)
        inpaint_noise = torch.randn(tuple(noise.shape), generator=gen).to(device)

    denoiser = (denoiser_factory or make_denoiser)(
        apply_model,
        schedule,
        positive,
        negative,
        cfg,
        latent_shape=tuple(latent.shape),
        noise_mask=noise_mask,
        latent_image=latent if noise_mask is not None else None,
        seed=seed,
        noise=inpaint_noise if noise_mask is not None else None,
    )

    patches = patches or {}
    denoiser.cfg_function = patches.get("cfg_function")
    denoiser.mask_function = patches.get("denoise_mask_function")
    denoiser.step_sigmas = sigmas

    x = schedule.noise_scaling(sigmas[0], noise, latent, schedule.is_max_denoise(sigmas))
    total = len(sigmas) - 1
    step_cb = None
    if callback is not None:
        def step_cb(info: dict[str, Any]) -> None:
            # dpm_adaptive may take more steps than planned; ComfyUI's progress bar clamps the same way
            callback(min(int(info["i"]), total - 1), total, info["denoised"])

    sampler = get_sampler(sampler_name)
    x = sampler(denoiser, x, sigmas, extra_args={"seed": int(seed)}, callback=step_cb, **(sampler_options or {}))
    x = schedule.inverse_noise_scaling(sigmas[-1], x)

    if noise_mask is not None and float(sigmas[-1]) == 0.0:
        # exact original outside the mask (float error and non-final-denoise samplers aside)
        mask = prepare_mask(noise_mask, tuple(latent.shape)).to(device)
        if denoiser.mask_function is not None:
            # the mask of the last model call (Differential Diffusion's is binary by then), not the soft one
            mask = denoiser.mask_function(sigmas[-2:-1].expand(latent.shape[0]), mask, sigmas)
        x = x * mask + latent * (1 - mask)
    return process_latent_out(x, latent_format).to(latent_image.dtype)

"""Small helpers shared by the sampler implementations (k-diffusion conventions).

Every sampler is ``sample_X(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts) -> x``
where ``model(x, sigma[B], **kwargs) -> denoised`` and x is in the VE parametrisation (x0 + sigma*eps).
``extra_args`` may carry ``seed`` (consumed by the sampler for its noise) and keyword arguments for
the model. ``callback`` receives ``{"i", "x", "sigma", "sigma_hat", "denoised"}`` once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .noise import BrownianTreeNoiseSampler, NoiseSampler, default_noise_sampler

Denoiser = Callable[..., torch.Tensor]
StepCallback = Callable[[dict[str, Any]], None] | None


def split_extra(extra_args: dict[str, Any] | None) -> tuple[dict[str, Any], int | None]:
    """Model kwargs without the sampler's own ``seed``."""
    kwargs = dict(extra_args or {})
    seed = kwargs.pop("seed", None)
    return kwargs, seed


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    v = torch.as_tensor(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                       eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step to sigma_to into a deterministic step down to sigma_down plus fresh noise of std sigma_up."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def ancestral_noise(x: torch.Tensor, seed: int | None, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    return noise_sampler if noise_sampler is not None else default_noise_sampler(x, seed)


def brownian_noise(
    x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, noise_sampler: NoiseSampler | None, cpu: bool = True
) -> NoiseSampler:
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seed, cpu=cpu)


def report(callback: StepCallback, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor,
           sigma_hat=None) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                  "denoised": denoised})


def sigma_fn(t: torch.Tensor) -> torch.Tensor:
    """sigma from half-log-SNR time t = -log(sigma)."""
    return t.neg().exp()


def t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def uncond_getter(model: Denoiser) -> Callable[[torch.Tensor], torch.Tensor]:
    """For CFG++ samplers: make a CFGDenoiser also compute the negative prediction (even at cfg 1) and
    return a function giving that unconditional estimate after each call. Denoisers without CFG have
    no separate uncond, so the guided estimate stands in (CFG++ then reduces to its base sampler)."""
    if hasattr(model, "need_uncond"):
        model.need_uncond = True

    def get(denoised: torch.Tensor) -> torch.Tensor:
        uncond = getattr(model, "last_uncond", None)
        return denoised if uncond is None else uncond

    return get


# ---- rectified flow ---------------------------------------------------------------------------------
# A flow model (SD3/3.5) has x_sigma = alpha * x0 + sigma * noise with alpha = 1 - sigma; eps/v models, in
# the VE parametrisation used here, have alpha = 1. Samplers whose noise or exponential-integrator
# weights depend on alpha follow it as ComfyUI's do for its CONST sampling (half-log-SNR
# lambda = log(alpha / sigma)); the others (Euler, Heun, LMS, DPM-Solver, ...) integrate the same ODE
# in sigma and need nothing.


def is_flow(model: Denoiser) -> bool:
    """Whether the denoiser samples a rectified-flow model (its schedule's prediction type)."""
    return getattr(getattr(model, "schedule", None), "prediction_type", None) == "flow"


def alpha_of(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    """The signal scale at sigma: 1 - sigma for flow, exactly 1 otherwise (VE results stay bit-identical)."""
    return 1 - sigma if flow else torch.ones_like(sigma)


def half_log_snr(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    """lambda = log(alpha / sigma): -logit(sigma) for flow, -log(sigma) otherwise."""
    return sigma.logit().neg() if flow else sigma.log().neg()


def sigma_of_half_log_snr(lam: torch.Tensor, flow: bool) -> torch.Tensor:
    return lam.neg().sigmoid() if flow else lam.neg().exp()


def offset_first_sigma(model: Denoiser, sigmas: torch.Tensor, flow: bool, percent: float = 1e-4) -> torch.Tensor:
    """A flow schedule starts at sigma 1, where lambda is -inf: the samplers that work in lambda start a
    hair below it instead, at the sigma 0.01% into sampling (as ComfyUI's offset_first_sigma_for_snr)."""
    if not flow or len(sigmas) <= 1 or float(sigmas[0]) < 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = float(model.schedule.percent_to_sigma(percent))  # type: ignore[attr-defined]
    return sigmas

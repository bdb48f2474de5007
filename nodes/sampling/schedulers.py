"""Sigma schedules: ``calculate_sigmas(schedule, name, steps)`` -> descending sigmas ending in 0.

Names and semantics follow ComfyUI's ``KSampler.SCHEDULERS`` so a workflow samples the same sigmas.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .model_sampling import DiscreteSchedule

SCHEDULER_NAMES: list[str] = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]


def _with_zero(values: list[float] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32)
    return torch.cat([t, t.new_zeros(1)])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: uniform steps in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform steps in log-sigma."""
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Polynomial in log-sigma (k-diffusion):
    log sigma_i = log sigma_min + (1 - i/(n-1))^rho (log sigma_max - log sigma_min)."""
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    return _with_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


# Align Your Steps (Sabour et al. 2024) optimised 10-step noise levels, as NVIDIA publishes them.
AYS_NOISE_LEVELS: dict[str, list[float]] = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def align_your_steps_sigmas(model_type: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """AYS levels log-linearly interpolated to steps + 1 values (the published recipe); with denoise < 1
    the last round(steps * denoise) steps; the final sigma set to 0."""
    if denoise <= 0.0:
        return torch.zeros(0)
    total = steps if denoise >= 1.0 else round(steps * denoise)
    levels = np.asarray(AYS_NOISE_LEVELS[model_type], dtype=np.float64)
    if steps + 1 != len(levels):
        xs = np.linspace(0, 1, len(levels))
        levels = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, np.log(levels[::-1])))[::-1].copy()
    out = torch.tensor(levels[-(total + 1):], dtype=torch.float32)
    out[-1] = 0
    return out


def sd_turbo_sigmas(s: DiscreteSchedule, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """SD/SDXL-Turbo: up to 10 steps on the timesteps 999, 899, ..., 99, starting 10 - int(10 denoise) in."""
    start = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start:start + steps]
    return torch.cat([s.sigma(timesteps.double()).float(), torch.zeros(1)])


def kl_optimal_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """'Align Your Steps' KL-optimal schedule (Sabour et al. 2024): linear in atan(sigma)."""
    if steps == 1:
        return _with_zero([sigma_max])
    w = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    return _with_zero((w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)).tan())


def simple_sigmas(s: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Evenly strided table entries counted from the top (sigma_max) down."""
    stride = s.num_timesteps / steps
    return _with_zero([float(s.sigmas[-(1 + int(i * stride))]) for i in range(steps)])


def normal_sigmas(s: DiscreteSchedule, steps: int, sgm: bool = False) -> torch.Tensor:
    """Linear in (continuous) timestep from t(sigma_max) to t(sigma_min)."""
    start = float(s.timestep(s.sigma_max))
    end = float(s.timestep(s.sigma_min))
    append_zero = True
    if sgm:
        # SGM/SDXL "uniform": steps+1 points with the last (sigma_min) replaced by 0
        ts = torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1]
    else:
        if math.isclose(float(s.sigma(torch.tensor(end))), 0.0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        ts = torch.linspace(start, end, steps, dtype=torch.float64)
    sig = s.sigma(ts).float()
    return _with_zero(sig) if append_zero else sig


def ddim_uniform_sigmas(s: DiscreteSchedule, steps: int) -> torch.Tensor:
    """DDIM's uniform timestep skip: every (N // steps)-th table entry from index 1, reversed, then 0.

    As in ComfyUI this can give a few more than steps+1 sigmas when N is not a multiple of steps
    (20 steps -> 21 sampling steps); kept for image parity with ComfyUI workflows.
    """
    idx = 1
    if math.isclose(float(s.sigmas[idx]), 0.0, abs_tol=1e-5):
        steps += 1
        sig: list[float] = []
    else:
        sig = [0.0]
    stride = max(s.num_timesteps // steps, 1)
    while idx < s.num_timesteps:
        sig.append(float(s.sigmas[idx]))
        idx += stride
    return torch.tensor(sig[::-1], dtype=torch.float32)


def beta_sigmas(s: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Beta-distribution quantiles over timesteps (Lee et al. 2024, arXiv 2407.12173); duplicates dropped."""
    from scipy import stats  # scipy ships with torchsde; imported lazily to keep import time low

    total = s.num_timesteps - 1
    q = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(stats.beta.ppf(q, alpha, beta) * total)
    sig: list[float] = []
    last = None
    for t in ts:
        if t != last:
            sig.append(float(s.sigmas[int(t)]))
        last = t
    return _with_zero(sig)


def linear_quadratic_sigmas(s: DiscreteSchedule, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    """Mochi's schedule: linear in the first half up to threshold_noise, then quadratic to 1; inverted, x sigma_max."""
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        lin_steps = steps // 2
        linear = [i * threshold_noise / lin_steps for i in range(lin_steps)]
        quad_steps = steps - lin_steps
        step_diff = lin_steps - threshold_noise * steps
        a = step_diff / (lin_steps * quad_steps**2)
        b = threshold_noise / lin_steps - 2 * step_diff / quad_steps**2
        c = a * lin_steps**2
        quad = [a * i * i + b * i + c for i in range(lin_steps, steps)]
        sched = [1.0 - v for v in linear + quad + [1.0]]
    return torch.tensor(sched, dtype=torch.float32) * float(s.sigma_max)


_BUILDERS: dict[str, Callable[[DiscreteSchedule, int], torch.Tensor]] = {
    "simple": simple_sigmas,
    "sgm_uniform": lambda s, n: normal_sigmas(s, n, sgm=True),
    "karras": lambda s, n: karras_sigmas(n, float(s.sigma_min), float(s.sigma_max)),
    "exponential": lambda s, n: exponential_sigmas(n, float(s.sigma_min), float(s.sigma_max)),
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "normal": normal_sigmas,
    "linear_quadratic": linear_quadratic_sigmas,
    "kl_optimal": lambda s, n: kl_optimal_sigmas(n, float(s.sigma_min), float(s.sigma_max)),
}


def calculate_sigmas(schedule: DiscreteSchedule, scheduler_name: str, steps: int) -> torch.Tensor:
    """Float32 CPU tensor of sigmas, descending, ending in 0 (steps+1 entries except the ddim_uniform/beta quirks).

    An unknown name falls back to "simple", as ComfyUI does.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    builder = _BUILDERS.get(scheduler_name, simple_sigmas)
    return builder(schedule, int(steps)).to(torch.float32)

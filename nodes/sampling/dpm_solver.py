"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927): "dpm_fast" and "dpm_adaptive".

Noise-prediction solvers in t = -log(sigma) (alpha = 1 in the VE parametrisation), singlestep orders
1-3 with the paper's r1 = 1/3, r2 = 2/3 (order 3) and r1 = 1/2 (order 2) intermediate points.
Unlike the other samplers they do not follow the schedule's sigmas: ComfyUI hands them only the
first sigma, the last non-zero one and the step count, and they finish at that last non-zero sigma.
"""

from __future__ import annotations

import math

import torch

from ._common import Denoiser, StepCallback, ancestral_noise, get_ancestral_step, split_extra


class _Solver:
    """eps(x, t) with a per-step cache of the evaluations, and the three singlestep updates."""

    def __init__(self, model: Denoiser, kwargs: dict, x: torch.Tensor) -> None:
        self.model, self.kwargs = model, kwargs
        self.s_in = x.new_ones([x.shape[0]])
        self.cache: dict[str, torch.Tensor] = {}
        self.last_denoised: torch.Tensor | None = None

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def eps(self, key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in self.cache:
            sigma = self.sigma(t)
            denoised = self.model(x, sigma * self.s_in, **self.kwargs)
            if key == "eps":
                self.last_denoised = denoised
            self.cache[key] = (x - denoised) / sigma
        return self.cache[key]

    def step_1(self, x, t, t_next):
        # DPM-Solver-1 (= DDIM): x_t = x_s - sigma_t (e^h - 1) eps_s
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * self.eps("eps", x, t)

    def step_2(self, x, t, t_next, r1=1 / 2):
        h = t_next - t
        eps = self.eps("eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps("eps_r1", u1, s1)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x, t, t_next, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps("eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps("eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps("eps_r2", u2, s2)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _ends(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_start, t_end) from the schedule's first and last non-zero sigma, as ComfyUI's wrappers pick them."""
    sigma_min = sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]
    return sigmas[0].log().neg(), sigma_min.log().neg()


def _ancestral_target(solver: _Solver, t, t_next, t_end, eta: float):
    """Where an ancestral step from t to t_next lands deterministically (in -log sigma), and the noise
    added on top to reach sigma(t_next); eta = 0 is the plain step."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(solver.sigma(t), solver.sigma(t_next), eta)
    t_target = torch.minimum(t_end, sigma_down.log().neg())
    return t_target, (solver.sigma(t_next) ** 2 - solver.sigma(t_target) ** 2) ** 0.5


def _report(callback: StepCallback, i: int, x, t, denoised) -> None:
    if callback is not None:
        sigma = t.neg().exp()
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


# DPM-Solver-fast (Lu et al. 2022, Sec. 3.4): NFE = number of steps, uniform in log-sigma, as many
# third-order steps as fit, then a second/first-order remainder. eta > 0 adds ancestral noise.
@torch.no_grad()
def sample_dpm_fast(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                    eta=0.0, s_noise=1.0, noise_sampler=None):
    if len(sigmas) <= 1:
        return x
    kwargs, seed = split_extra(extra_args)
    nfe = len(sigmas) - 1
    t_start, t_end = _ends(sigmas)
    noise = ancestral_noise(x, seed, noise_sampler) if eta else None
    solver = _Solver(model, kwargs, x)
    m = nfe // 3 + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, device=x.device, dtype=sigmas.dtype)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        solver.cache = {}
        t, t_next = ts[i], ts[i + 1]
        t_target, sigma_up = _ancestral_target(solver, t, t_next, t_end, eta)
        solver.eps("eps", x, t)
        _report(callback, i, x, t, solver.last_denoised)
        step = (solver.step_1, solver.step_2, solver.step_3)[order - 1]
        x = step(x, t, t_target)
        if eta:
            assert noise is not None  # made when eta is set
            x = x + sigma_up * s_noise * noise(solver.sigma(t), solver.sigma(t_next))
    return x


class _PIDStepSize:
    """PID step-size controller (Söderlind 2003) with the arctan limiter, on an error measured in tolerances."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + 1e-8)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


# DPM-Solver-12/23 with adaptive step size (Lu et al. 2022, Sec. 3.5 / Alg. 4-5): each step compares the
# order-(k-1) and order-k solutions sharing their evaluations and a PID controller picks the next h.
# The step count is ignored; callback "i" counts attempted steps (rejected ones included), as ComfyUI.
@torch.no_grad()
def sample_dpm_adaptive(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                        order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None):
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    if len(sigmas) <= 1:
        return x
    kwargs, seed = split_extra(extra_args)
    t_start, t_end = _ends(sigmas)
    noise = ancestral_noise(x, seed, noise_sampler) if eta else None
    solver = _Solver(model, kwargs, x)
    atol_t, rtol_t = torch.tensor(atol, device=x.device), torch.tensor(rtol, device=x.device)
    pid = _PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s = t_start
    x_prev = x
    attempts = 0
    while s < t_end - 1e-5:
        solver.cache = {}
        t = torch.minimum(t_end, s + pid.h)
        t_target, sigma_up = _ancestral_target(solver, s, t, t_end, eta)
        solver.eps("eps", x, s)
        denoised = solver.last_denoised
        if order == 2:
            x_low, x_high = solver.step_1(x, s, t_target), solver.step_2(x, s, t_target)
        else:
            # the r1 = 1/3 second-order step reuses the third-order step's first intermediate evaluation
            x_low, x_high = solver.step_2(x, s, t_target, r1=1 / 3), solver.step_3(x, s, t_target)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5)
        if pid.propose(error):
            x_prev = x_low
            x = x_high
            if eta:
                assert noise is not None  # made when eta is set
                x = x + sigma_up * s_noise * noise(solver.sigma(s), solver.sigma(t))
            s = t
        attempts += 1
        _report(callback, attempts - 1, x, s, denoised)
    return x

"""Noise sources for stochastic samplers.

A noise sampler is ``f(sigma, sigma_next) -> Tensor`` shaped like x with unit variance.
Ancestral samplers use independent draws from a seeded generator; SDE samplers use increments of a
seeded Brownian motion over sigma, so the same seed gives a consistent noise path whatever the
step count (torchsde's BrownianTree, as k-diffusion/ComfyUI do).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from engine.config import current_config

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Independent N(0, 1) draws from a generator on x's device, seeded as ComfyUI seeds it.

    ComfyUI (since PR #11528, in 0.8.x) seeds it with ``seed + 1`` when x is on the CPU and with ``seed``
    on any other device: the initial noise comes from a CPU generator seeded with ``seed``, so on the
    CPU the plain seed would make the first step re-add the initial noise (ComfyUI issue #9819).
    ComfyUI 0.3.x used the plain seed everywhere; sdflow follows the current, fixed rule unless
    ``legacy_cpu_noise_seed`` (see `legacy_cpu_noise_seed`) asks for the old one to reproduce old images.
    tests/nodes/test_sampler_noise_parity.py checks every sampler against this rule and k-diffusion."""
    generator: torch.Generator | None = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        offset = 1 if x.device.type == "cpu" and not legacy_cpu_noise_seed() else 0
        generator.manual_seed((int(seed) + offset) % 2**64)

    def sample(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


LEGACY_SEED_ENV = "SDFLOW_LEGACY_CPU_NOISE_SEED"


def legacy_cpu_noise_seed() -> bool:
    """Whether CPU per-step noise uses ComfyUI's pre-#11528 seed: the running config's switch, else the env.

    The environment variable covers direct calls and embedding code that runs nodes without a config."""
    config = current_config()
    if config is not None and config.legacy_cpu_noise_seed:
        return True
    return os.environ.get(LEGACY_SEED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class BrownianTreeNoiseSampler:
    """Normalised Brownian increments (W(t1) - W(t0)) / sqrt(|t1 - t0|) over sigma in [sigma_min, sigma_max].

    ``cpu=True`` builds the tree on the CPU (device-independent results); the ``*_gpu`` sampler names
    build it on x's device.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: torch.Tensor | float,
        sigma_max: torch.Tensor | float,
        seed: int | None = None,
        cpu: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> None:
        import torchsde  # optional heavy import: only SDE samplers need it

        self.transform = transform
        self.out_device, self.out_dtype = x.device, x.dtype
        tree_device = torch.device("cpu") if cpu else x.device
        t0 = transform(torch.as_tensor(sigma_min, dtype=torch.float32)).to(tree_device, torch.float32)
        t1 = transform(torch.as_tensor(sigma_max, dtype=torch.float32)).to(tree_device, torch.float32)
        self.sign = 1.0
        if t0 > t1:
            t0, t1, self.sign = t1, t0, -1.0
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, []).item())
        self.tree_device = tree_device
        # torchsde rounds its interval ends to 6 digits (tol 1e-6) and warns on queries just outside;
        # clamping first gives the same increments without the warning.
        self._lo, self._hi = round(float(t0), 6), round(float(t1), 6)
        w0 = torch.zeros(x.shape, dtype=torch.float32, device=tree_device)
        self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=int(seed))

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a = self.transform(torch.as_tensor(sigma, dtype=torch.float32)).to(self.tree_device, torch.float32)
        b = self.transform(torch.as_tensor(sigma_next, dtype=torch.float32)).to(self.tree_device, torch.float32)
        sign = self.sign
        if a > b:
            a, b, sign = b, a, -sign
        a_f = min(max(float(a), self._lo), self._hi)
        b_f = min(max(float(b), self._lo), self._hi)
        w = self.tree(a_f, b_f) * sign
        return (w / (b - a).abs().sqrt()).to(self.out_device, self.out_dtype)

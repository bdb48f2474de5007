"""Noise-path parity of every sampler in ``KSampler.SAMPLERS`` against references that are not sdflow.

Three layers, each over the full sampler list:

1. **Where the noise comes from.** For every stochastic sampler, sdflow's own noise (from
   ``extra_args["seed"]``) must equal a noise sampler built here the way ComfyUI builds it:
   * per-step draws (``default_noise_sampler``): ``torch.randn(x.size())`` from a
     ``torch.Generator(device=x.device)`` seeded with ``seed + 1`` when x is on the CPU and ``seed``
     on any other device. ComfyUI added the ``+ 1`` in PR #11528 (present in 0.8.x): before it, the CPU
     generator repeated the initial noise (which ``prepare_noise`` draws from a CPU generator seeded
     with ``seed``) as the first step's fresh noise (ComfyUI issue #9819, "ancestral samplers are
     broken on CPU"). ComfyUI 0.3.x seeded with ``seed`` on every device.
   * SDE samplers (``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_2m_sde_heun``, ``dpmpp_3m_sde`` and their
     ``_gpu`` twins): a Brownian tree over ``[min(sigmas > 0), max(sigmas)]`` with entropy ``seed``,
     here k-diffusion's own ``BrownianTreeNoiseSampler`` (on the CPU the ``_gpu`` variants build the
     same tree).
   Deterministic samplers must not depend on the seed at all.
2. **The whole trajectory against k-diffusion** (the ``k-diffusion`` package, Crowson's reference
   implementation that ComfyUI's samplers derive from), given the ComfyUI-seeded noise sampler.
3. **Paper references written here** for samplers k-diffusion lacks: ddpm (Ho et al. 2020), lcm
   (Luo et al. 2023), euler_cfg_pp / euler_ancestral_cfg_pp (Chung et al. 2024, CFG++), ipndm
   (Zhang & Chen 2022), gradient_estimation and its CFG++ form (Permenter & Yuan 2024), res_multistep
   (Zhang et al. 2023, by quadrature). uni_pc / uni_pc_bh2 are compared with diffusers' UniPC in
   test_sampling_parity.py.

``NO_INDEPENDENT_REFERENCE`` lists the samplers checked only by layer 1: their step formulas are
ComfyUI's own variants (or long papers not re-derived here); their noise source is still checked.

The denoiser is a tiny deterministic eps-model (a fixed random conv, timestep dependent) wrapped as a
VE denoiser D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), sigma), with a second (unconditional)
branch and CFG so the CFG++ samplers have a distinct uncond prediction.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

from nodes.sampling.samplers import SAMPLERS

# k-diffusion's own Brownian tree (the reference) queries sigma_max a float-rounding past its end
pytestmark = pytest.mark.filterwarnings("ignore:Should have tb<=t1:UserWarning")

SHAPE = (2, 4, 8, 8)
SEED = 424242
CFG = 2.5


def _load_k_diffusion_sampling() -> types.ModuleType:
    """Import k-diffusion's ``sampling.py`` without its package ``__init__``.

    ``k_diffusion/__init__.py`` imports the training and evaluation modules (clean-fid, CLIP, kornia,
    torchvision, wandb), which are not installed here and would pull in a CUDA build of torch.
    ``sampling.py`` only needs ``utils.append_dims``; ``utils.py`` imports
    ``torchvision.transforms.functional`` at the top for image helpers that sampling never calls. So the
    package is registered under a private name with no ``__init__`` run, and an empty
    ``torchvision.transforms.functional`` stands in only while ``utils.py`` is imported (then removed,
    so nothing else in the test session ever sees a fake torchvision).
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps 'k-diffusion==0.1.1.post1' torchdiffeq)")
    name = "_kdiffusion_reference"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = pkg
    stubs = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    added = [s for s in stubs if s not in sys.modules]
    for s in added:
        sys.modules[s] = types.ModuleType(s)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]  # type: ignore[attr-defined]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]  # type: ignore[attr-defined]
    try:
        importlib.import_module(f"{name}.utils")
    finally:
        for s in added:
            sys.modules.pop(s, None)
    return importlib.import_module(f"{name}.sampling")


@pytest.fixture(scope="module")
def kd() -> types.ModuleType:
    return _load_k_diffusion_sampling()


# ----------------------------------------------------------------------------- the toy denoiser


class ToyCFGDenoiser:
    """D(x; sigma) with CFG over two fixed eps branches; remembers the last unconditional estimate.

    ``need_uncond``/``last_uncond`` are the attributes sdflow's CFG++ samplers use on its CFGDenoiser.
    """

    def __init__(self, cfg: float = CFG) -> None:
        g = torch.Generator().manual_seed(1234)
        self.convs = []
        for _ in range(2):
            conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.15)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            self.convs.append(conv)
        self.cfg = cfg
        self.need_uncond = False
        self.last_uncond: torch.Tensor | None = None
        self.calls = 0

    @torch.no_grad()
    def _denoise(self, branch: int, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        x_in = x / torch.sqrt(1.0 + s**2)
        eps = 0.7 * x_in + torch.tanh(self.convs[branch](x_in)) * (0.4 + 0.05 * torch.log1p(s))
        return x - s * eps

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        self.calls += 1
        cond = self._denoise(0, x, sigma)
        uncond = self._denoise(1, x, sigma)
        self.last_uncond = uncond
        return uncond + (cond - uncond) * self.cfg

    def both(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided, uncond) for the paper references."""
        guided = self(x, sigma)
        assert self.last_uncond is not None
        return guided, self.last_uncond


def _sigmas(n: int = 10, sigma_min: float = 0.0292, sigma_max: float = 14.6146) -> torch.Tensor:
    """Karras et al. 2022 schedule (rho 7) over SD1's sigma range, with the final 0."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
    return torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1)])


def _x0(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED)) * sigmas[0]


# ----------------------------------------------------------------------------- ComfyUI's noise sources


def comfy_default_noise_sampler(x: torch.Tensor, seed: int) -> Callable[[Any, Any], torch.Tensor]:
    """ComfyUI's per-step noise (k_diffusion/sampling.py ``default_noise_sampler``, since PR #11528)."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed + 1 if x.device.type == "cpu" else seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                 generator=gen)


def comfy_brownian_noise_sampler(kd: types.ModuleType, x: torch.Tensor, sigmas: torch.Tensor, seed: int):
    return kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)


# Per-step (ancestral) noise in ComfyUI: every sampler that calls default_noise_sampler(x, seed).
DEFAULT_NOISE = {
    "euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "ddpm", "lcm", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
}
# Brownian-tree noise (cpu=True; the _gpu names cpu=False, the same tree on a CPU tensor).
BROWNIAN_NOISE = {
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
}
# Samplers that draw no noise during sampling with ComfyUI's defaults (eta=0 / s_churn=0; res_multistep
# and res_multistep_cfg_pp run with eta=0; dpm_fast/dpm_adaptive with eta=0).
DETERMINISTIC = set(SAMPLERS) - DEFAULT_NOISE - BROWNIAN_NOISE

# k-diffusion sampler of the same algorithm, and the keyword arguments ComfyUI passes.
KD_REFERENCE: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("sample_euler", {}),
    "ddim": ("sample_euler", {}),  # ComfyUI runs ddim as euler
    "euler_ancestral": ("sample_euler_ancestral", {}),
    "heun": ("sample_heun", {}),
    "dpm_2": ("sample_dpm_2", {}),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", {}),
    "lms": ("sample_lms", {}),
    "dpm_fast": ("sample_dpm_fast", {}),
    "dpm_adaptive": ("sample_dpm_adaptive", {}),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}),
    "dpmpp_sde": ("sample_dpmpp_sde", {}),
    "dpmpp_sde_gpu": ("sample_dpmpp_sde", {}),
    "dpmpp_2m": ("sample_dpmpp_2m", {}),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {"solver_type": "midpoint"}),
    "dpmpp_2m_sde_gpu": ("sample_dpmpp_2m_sde", {"solver_type": "midpoint"}),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_2m_sde_heun_gpu": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}),
    "dpmpp_3m_sde_gpu": ("sample_dpmpp_3m_sde", {}),
}

PAPER_REFERENCE = {"ddpm", "lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp", "ipndm", "gradient_estimation",
                   "gradient_estimation_cfg_pp", "res_multistep"}

# Compared with diffusers' UniPCMultistepScheduler in tests/nodes/test_sampling_parity.py (deterministic:
# their noise path, none, is checked here by seed independence).
DIFFUSERS_REFERENCE = {"uni_pc", "uni_pc_bh2"}

NO_INDEPENDENT_REFERENCE = {
    "heunpp2", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "ipndm_v", "deis",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
}


def _ours(name: str, sigmas: torch.Tensor, seed: int = SEED, **opts: Any) -> torch.Tensor:
    return SAMPLERS[name](ToyCFGDenoiser(), _x0(sigmas).clone(), sigmas, extra_args={"seed": seed}, **opts)


def test_every_sampler_is_classified() -> None:
    names = set(SAMPLERS)
    assert DEFAULT_NOISE | BROWNIAN_NOISE | DETERMINISTIC == names
    covered = set(KD_REFERENCE) | PAPER_REFERENCE | DIFFUSERS_REFERENCE | NO_INDEPENDENT_REFERENCE
    assert covered == names, f"unclassified: {sorted(names - covered)}, stale: {sorted(covered - names)}"
    assert not (set(KD_REFERENCE) & PAPER_REFERENCE)
    assert not (covered - NO_INDEPENDENT_REFERENCE) & NO_INDEPENDENT_REFERENCE


# ----------------------------------------------------------------------------- layer 1: noise source


@pytest.mark.parametrize("name", sorted(DEFAULT_NOISE))
def test_per_step_noise_is_comfyui_seeded_generator(name: str) -> None:
    sigmas = _sigmas()
    x = _x0(sigmas)
    ours = _ours(name, sigmas)
    injected = SAMPLERS[name](ToyCFGDenoiser(), x.clone(), sigmas, extra_args={},
                              noise_sampler=comfy_default_noise_sampler(x, SEED))
    torch.testing.assert_close(ours, injected, rtol=0, atol=0)
    # the noise matters: the old rule (plain seed on the CPU) and another seed both change the result
    plain = SAMPLERS[name](ToyCFGDenoiser(), x.clone(), sigmas, extra_args={},
                           noise_sampler=comfy_default_noise_sampler(x, SEED - 1))
    assert (ours - plain).abs().max() > 1e-3
    assert (ours - _ours(name, sigmas, seed=SEED + 7)).abs().max() > 1e-3


def test_first_per_step_draw_is_not_the_initial_noise() -> None:
    """The bug ComfyUI's seed + 1 fixes: on the CPU the first fresh noise must not repeat the initial noise."""
    from nodes.sampling.noise import default_noise_sampler

    x = torch.zeros(SHAPE)
    initial = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))
    first = default_noise_sampler(x, SEED)(torch.tensor(1.0), torch.tensor(0.5))
    assert not torch.equal(first, initial)
    assert torch.equal(first, comfy_default_noise_sampler(x, SEED)(1.0, 0.5))


@pytest.mark.parametrize("name", sorted(BROWNIAN_NOISE))
def test_sde_noise_is_comfyui_seeded_brownian_tree(kd: types.ModuleType, name: str) -> None:
    sigmas = _sigmas()
    x = _x0(sigmas)
    ours = _ours(name, sigmas)
    injected = SAMPLERS[name](ToyCFGDenoiser(), x.clone(), sigmas, extra_args={},
                              noise_sampler=comfy_brownian_noise_sampler(kd, x, sigmas, SEED))
    torch.testing.assert_close(ours, injected, rtol=1e-5, atol=1e-5)
    assert (ours - _ours(name, sigmas, seed=SEED + 7)).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_samplers_ignore_the_seed(name: str) -> None:
    sigmas = _sigmas()
    torch.testing.assert_close(_ours(name, sigmas), _ours(name, sigmas, seed=SEED + 7), rtol=0, atol=0)


# ----------------------------------------------------------------------------- layer 2: k-diffusion


def _kd_run(kd: types.ModuleType, name: str, sigmas: torch.Tensor) -> torch.Tensor:
    fn_name, opts = KD_REFERENCE[name]
    fn = getattr(kd, fn_name)
    x = _x0(sigmas)
    model = ToyCFGDenoiser()
    if name in DEFAULT_NOISE:
        opts = {**opts, "noise_sampler": comfy_default_noise_sampler(x, SEED)}
    elif name in BROWNIAN_NOISE:
        opts = {**opts, "noise_sampler": comfy_brownian_noise_sampler(kd, x, sigmas, SEED)}
        if name.startswith("dpmpp_sde"):
            opts["noise_sampler"] = _at_scheduled_sigmas(opts["noise_sampler"], sigmas)
    if name in ("dpm_fast", "dpm_adaptive"):
        # ComfyUI's KSAMPLER wrapper: sigma_min is the last sigma, or the one before a final 0;
        # dpm_fast takes len(sigmas) - 1 model evaluations.
        sigma_min = float(sigmas[-2] if sigmas[-1] == 0 else sigmas[-1])
        if name == "dpm_fast":
            return fn(model, x, sigma_min, float(sigmas[0]), len(sigmas) - 1, disable=True)
        return fn(model, x, sigma_min, float(sigmas[0]), disable=True)
    if name == "lms":
        # k-diffusion 0.1.1 takes a full LMS step to sigma = 0 where ComfyUI (and sdflow) return that
        # step's denoised estimate: the reference is k-diffusion's last reported denoised.
        seen: list[torch.Tensor] = []
        fn(model, x, sigmas, disable=True, callback=lambda info: seen.append(info["denoised"]), **opts)
        return seen[-1]
    return fn(model, x, sigmas, disable=True, **opts)


def _at_scheduled_sigmas(noise: Callable, sigmas: torch.Tensor) -> Callable:
    """k-diffusion 0.1.1's dpmpp_sde asks the Brownian tree for sigma_fn(t_fn(sigma)), the schedule's
    sigma after an exp(-log) round trip; ComfyUI's current one (in half-log-SNR form, shared with flow
    models) asks at the scheduled sigma itself. A Brownian path moves by about sqrt(dt) over a one-ulp
    shift of its time (1e-3 here), so the reference snaps such query times back to the sigma."""
    def snap(value: Any) -> torch.Tensor:
        v = torch.as_tensor(value)
        near = sigmas[(sigmas - v).abs().argmin()]
        return near if float((near - v).abs()) <= 1e-6 * max(float(v.abs()), 1e-12) else v

    return lambda sigma, sigma_next: noise(snap(sigma), snap(sigma_next))


@pytest.mark.parametrize("name", sorted(KD_REFERENCE))
def test_matches_k_diffusion(kd: types.ModuleType, name: str) -> None:
    sigmas = _sigmas()
    ours = _ours(name, sigmas)
    ref = _kd_run(kd, name, sigmas)
    scale = float(ref.abs().max())
    assert float((ours - ref).abs().max()) <= 1e-4 * scale + 1e-5, name


# ----------------------------------------------------------------------------- layer 3: papers


def _ref_ddpm(sigmas: torch.Tensor, noise) -> torch.Tensor:
    """Ho et al. 2020, Alg. 2 over a sigma subsequence: x_{t-1} = posterior mean + sqrt(beta~) z.

    In VP form with abar = 1 / (1 + sigma^2): x_vp = x / sqrt(1 + sigma^2); eps = (x - D) / sigma;
    alpha = abar_t / abar_prev; mean = (x_vp - (1 - alpha) / sqrt(1 - abar_t) eps) / sqrt(alpha);
    beta~ = (1 - abar_prev) / (1 - abar_t) (1 - alpha); back to VE: x = x_vp' * sqrt(1 + sigma_prev^2).
    """
    model = ToyCFGDenoiser()
    x = _x0(sigmas)
    ns = noise(x)
    for i in range(len(sigmas) - 1):
        s, sp = sigmas[i], sigmas[i + 1]
        den = model(x, s * torch.ones(SHAPE[0]))
        eps = (x - den) / s
        abar, abar_prev = 1 / (1 + s**2), 1 / (1 + sp**2)
        alpha = abar / abar_prev
        x_vp = x / torch.sqrt(1 + s**2)
        mean = (x_vp - (1 - alpha) / torch.sqrt(1 - abar) * eps) / torch.sqrt(alpha)
        if sp > 0:
            mean = mean + torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - alpha)) * ns(s, sp)
            x = mean * torch.sqrt(1 + sp**2)
        else:
            x = mean
    return x


def _ref_lcm(sigmas: torch.Tensor, noise) -> torch.Tensor:
    """Luo et al. 2023, Alg. 1 (multistep consistency sampling): x0 = f(x, t); x = x0 + sigma_next z."""
    model = ToyCFGDenoiser()
    x = _x0(sigmas)
    ns = noise(x)
    for i in range(len(sigmas) - 1):
        x0 = model(x, sigmas[i] * torch.ones(SHAPE[0]))
        x = x0 + sigmas[i + 1] * ns(sigmas[i], sigmas[i + 1]) if sigmas[i + 1] > 0 else x0
    return x


def _ref_euler_cfg_pp(sigmas: torch.Tensor, noise, eta: float) -> torch.Tensor:
    """CFG++ (Chung et al. 2024) with Euler/DDIM steps in the VE parametrisation: the clean estimate is
    the guided one, the direction back to noise the unconditional one; ancestral split as Song et al.
    (sigma_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)), sigma_down = sqrt(s'^2 - sigma_up^2))."""
    model = ToyCFGDenoiser()
    x = _x0(sigmas)
    ns = noise(x)
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        guided, uncond = model.both(x, s * torch.ones(SHAPE[0]))
        up = min(float(sn), eta * math.sqrt(float(sn**2 * (s**2 - sn**2) / s**2))) if eta else 0.0
        down = math.sqrt(max(float(sn**2) - up**2, 0.0))
        x = guided + (x - uncond) / s * down
        if up > 0:
            x = x + ns(s, sn) * up
    return x


def _ref_ipndm(sigmas: torch.Tensor) -> torch.Tensor:
    """Zhang & Chen 2022 (DEIS paper, iPNDM): Adams-Bashforth on dx/dsigma with the fixed-step
    coefficients of orders 1..4 (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24),
    lower order while history builds up, and the denoised estimate at the final sigma = 0."""
    coeffs = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    model = ToyCFGDenoiser()
    x = _x0(sigmas)
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        den = model(x, s * torch.ones(SHAPE[0]))
        ds.insert(0, (x - den) / s)
        del ds[4:]
        if sn == 0:
            x = den
            continue
        c = coeffs[len(ds)]
        x = x + (sn - s) * sum(ci * di for ci, di in zip(c, ds))
    return x


def _ref_gradient_estimation(sigmas: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Permenter & Yuan 2024 ("Interpreting and improving diffusion models from an optimization
    perspective"), Alg. 2: step along d_bar = gamma d_t + (1 - gamma) d_{t+1} (Euler on the first step),
    the denoised estimate at sigma = 0."""
    model = ToyCFGDenoiser()
    x = _x0(sigmas)
    d_prev = None
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        den = model(x, s * torch.ones(SHAPE[0]))
        d = (x - den) / s
        if sn == 0:
            x = den
        else:
            d_bar = d if d_prev is None else gamma * d + (1 - gamma) * d_prev
            x = x + d_bar * (sn - s)
        d_prev = d
    return x


def _ref_gradient_estimation_cfg_pp(sigmas: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Gradient estimation with CFG++'s split: the step starts from the guided estimate and follows the
    unconditional direction, x' = D_guided + sigma' d_u with d_u = (x - D_uncond) / sigma; the
    correction (gamma - 1)(d_u - d_u,prev)(sigma' - sigma) as in the plain sampler."""
    model = ToyCFGDenoiser()
    x = _x0(sigmas)
    d_prev = None
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        guided, uncond = model.both(x, s * torch.ones(SHAPE[0]))
        d = (x - uncond) / s
        if sn == 0:
            x = guided
        else:
            x = guided + d * sn
            if d_prev is not None:
                x = x + (gamma - 1) * (d - d_prev) * (sn - s)
        d_prev = d
    return x


def _ref_res_multistep(sigmas: torch.Tensor) -> torch.Tensor:
    """RES second-order multistep (Zhang et al. 2023, arXiv 2308.02157) in data prediction: the exact
    solution of the probability-flow ODE with D linear in lambda = -log sigma through the last two
    estimates, x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D(lambda),
    the integral by numerical quadrature (not the phi-function closed form). The first step (no history)
    is an Euler step and the last returns the denoised estimate, as ComfyUI runs it."""
    from scipy import integrate

    model = ToyCFGDenoiser()
    x = _x0(sigmas)
    prev: tuple[float, torch.Tensor] | None = None
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        den = model(x, s * torch.ones(SHAPE[0]))
        lam = -math.log(float(s))
        if sn == 0:
            x = den
        elif prev is None:
            x = x + (x - den) / s * (sn - s)
        else:
            lam_prev, den_prev = prev
            lam_t = -math.log(float(sn))
            i0 = integrate.quad(lambda u: math.exp(u), lam, lam_t)[0]
            i1 = integrate.quad(lambda u, at=lam: math.exp(u) * (u - at), lam, lam_t)[0]
            slope = (den - den_prev) / (lam - lam_prev)
            x = (sn / s) * x + float(sn) * (i0 * den + i1 * slope)
        prev = (lam, den)
    return x


def _comfy_noise(x: torch.Tensor):
    return comfy_default_noise_sampler(x, SEED)


PAPER_CASES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ddpm": lambda sig: _ref_ddpm(sig, _comfy_noise),
    "lcm": lambda sig: _ref_lcm(sig, _comfy_noise),
    "euler_cfg_pp": lambda sig: _ref_euler_cfg_pp(sig, _comfy_noise, eta=0.0),
    "euler_ancestral_cfg_pp": lambda sig: _ref_euler_cfg_pp(sig, _comfy_noise, eta=1.0),
    "ipndm": _ref_ipndm,
    "gradient_estimation": _ref_gradient_estimation,
    "gradient_estimation_cfg_pp": _ref_gradient_estimation_cfg_pp,
    "res_multistep": _ref_res_multistep,
}


def test_paper_cases_cover_paper_reference() -> None:
    assert set(PAPER_CASES) == PAPER_REFERENCE


@pytest.mark.parametrize("name", sorted(PAPER_CASES))
def test_matches_paper_reference(name: str) -> None:
    sigmas = _sigmas()
    ours = _ours(name, sigmas)
    ref = PAPER_CASES[name](sigmas)
    scale = float(ref.abs().max())
    assert float((ours - ref).abs().max()) <= 1e-4 * scale + 1e-5, name


# ----------------------------------------------------------------------------- the legacy seed switch


def _comfy_pre_11528_noise_sampler(x: torch.Tensor, seed: int) -> Callable[[Any, Any], torch.Tensor]:
    """ComfyUI's per-step noise before PR #11528: a generator on x's device seeded with ``seed`` everywhere."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                 generator=gen)


def _run_under(config: Any, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    from engine.config import reset_current_config, set_current_config

    token = set_current_config(config)
    try:
        return fn()
    finally:
        reset_current_config(token)


def test_legacy_cpu_noise_seed_reproduces_pre_11528_euler_ancestral(kd: types.ModuleType, tmp_path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.config import RuntimeConfig

    monkeypatch.delenv("SDFLOW_LEGACY_CPU_NOISE_SEED", raising=False)
    sigmas = _sigmas()
    x = _x0(sigmas)
    legacy_ref = kd.sample_euler_ancestral(ToyCFGDenoiser(), x.clone(), sigmas, disable=True,
                                           noise_sampler=_comfy_pre_11528_noise_sampler(x, SEED))
    current_ref = kd.sample_euler_ancestral(ToyCFGDenoiser(), x.clone(), sigmas, disable=True,
                                            noise_sampler=comfy_default_noise_sampler(x, SEED))
    assert (legacy_ref - current_ref).abs().max() > 1e-3   # the two rules give different images

    on = RuntimeConfig(data_dir=tmp_path / "on", legacy_cpu_noise_seed=True)
    off = RuntimeConfig(data_dir=tmp_path / "off")
    torch.testing.assert_close(_run_under(on, lambda: _ours("euler_ancestral", sigmas)), legacy_ref,
                               rtol=1e-5, atol=1e-5)
    # default rule unchanged: no config, and a config without the switch, follow ComfyUI's current rule
    torch.testing.assert_close(_ours("euler_ancestral", sigmas), current_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_run_under(off, lambda: _ours("euler_ancestral", sigmas)), current_ref,
                               rtol=1e-5, atol=1e-5)
    # the environment variable switches it for code that runs samplers without a config
    monkeypatch.setenv("SDFLOW_LEGACY_CPU_NOISE_SEED", "1")
    torch.testing.assert_close(_ours("euler_ancestral", sigmas), legacy_ref, rtol=1e-5, atol=1e-5)


def test_cli_switch_sets_the_config_and_the_ray_worker_env(tmp_path) -> None:
    from server.cli import build_parser, make_config
    from server.ray_backend import WorkerSpec

    parser = build_parser()
    plain = make_config(parser.parse_args(["run", "wf.json", "--data-dir", str(tmp_path / "a")]))
    legacy = make_config(parser.parse_args(["run", "wf.json", "--data-dir", str(tmp_path / "b"),
                                            "--legacy-cpu-noise-seed"]))
    assert plain.legacy_cpu_noise_seed is False and legacy.legacy_cpu_noise_seed is True
    assert "SDFLOW_LEGACY_CPU_NOISE_SEED" not in WorkerSpec.from_config(plain).env
    assert WorkerSpec.from_config(legacy).env["SDFLOW_LEGACY_CPU_NOISE_SEED"] == "1"

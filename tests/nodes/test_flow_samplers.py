"""Every KSampler sampler on a rectified-flow schedule (SD3/3.5, issue 14) keeps x on the flow's path.

On a flow model x_sigma = (1 - sigma) * x0 + sigma * noise. With the exact denoiser of a point mass at
x0 (D(x; sigma) = x0 for every x), a sampler that is right for flow keeps every state it reports at
mean (1 - sigma) * x0 and standard deviation sigma, whatever its step sizes: deterministic samplers
integrate dx/dsigma = (x - D) / sigma, which is the same ODE for VE and flow, and the stochastic ones
must re-noise in flow's terms (ComfyUI's _RF ancestral steps, and its half-log-SNR form of the SDE and
exponential-integrator samplers). The VE forms of those drift off it at once: euler_ancestral from
sigma 1 to 0.8 would land at mean 0.36 * x0 instead of 0.2 * x0.

Three samplers stay in their VE form on flow models in ComfyUI too (it gives them no flow branch);
sdflow keeps them so for the same pixels, and this test leaves them out. So is ipndm_v: its order-4
variable-step weights, as ComfyUI has them, do not sum to 1 (0.92 on these steps), so it leaves any
path, VE or flow alike. dpm_fast and dpm_adaptive stop at the last non-zero sigma (ComfyUI's KSAMPLER
gives them sigma_min = sigmas[-2]), so their output is checked on the path there.
"""
from __future__ import annotations

import pytest
import torch

from nodes.sampling import SAMPLER_NAMES
from nodes.sampling.model_sampling import FlowSchedule
from nodes.sampling.sample import sigmas_for
from nodes.sampling.samplers import SAMPLERS

VE_ON_FLOW_IN_COMFYUI = {"ddpm", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp"}
OFF_ANY_PATH = {"ipndm_v"}
STOP_AT_SIGMA_MIN = {"dpm_fast", "dpm_adaptive"}
X0 = 3.0
SHAPE = (1, 4, 96, 96)   # 36864 values: the mean is good to ~0.5% of sigma, the std to ~0.4%


class PointMass:
    """The exact denoiser of data that is always x0, with the flow schedule the samplers look at."""

    def __init__(self, schedule: FlowSchedule) -> None:
        self.schedule = schedule
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(x, X0)


@pytest.mark.parametrize("scheduler", ["simple", "beta"])
@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if n not in VE_ON_FLOW_IN_COMFYUI | OFF_ANY_PATH])
def test_sampler_stays_on_the_flow_path(name: str, scheduler: str) -> None:
    schedule = FlowSchedule(shift=3.0)
    sigmas = sigmas_for(schedule, name, scheduler, 8, 1.0).to(torch.float32)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    x = schedule.noise_scaling(sigmas[0], noise, torch.zeros(SHAPE))    # pure noise, as sample() starts
    states: list[tuple[float, float, float]] = []

    def seen(info: dict) -> None:
        s, xs = float(info["sigma"]), info["x"]
        states.append((s, float(xs.mean()), float(xs.std())))

    model = PointMass(schedule)
    out = SAMPLERS[name](model, x, sigmas, extra_args={"seed": 7}, callback=seen)
    assert model.calls >= 2 and len(states) >= 2
    if name in STOP_AT_SIGMA_MIN:
        states.append((float(sigmas[-2]), float(out.mean()), float(out.std())))
    for sigma, mean, std in states:
        assert abs(mean - (1 - sigma) * X0) <= 0.03 * sigma + 1e-3, (name, sigma, mean, (1 - sigma) * X0)
        assert abs(std - sigma) <= 0.03 * sigma + 1e-3, (name, sigma, std)
    if name not in STOP_AT_SIGMA_MIN:
        # UniPC's last step lands 0.1% short (its VP-time form of the same ODE); everything else exactly
        torch.testing.assert_close(out, torch.full(SHAPE, X0), rtol=0, atol=1e-2)


@pytest.mark.parametrize("name", sorted(VE_ON_FLOW_IN_COMFYUI))
def test_the_ve_only_samplers_still_run_on_flow_sigmas(name: str) -> None:
    """Not on the flow path (as in ComfyUI), but finite and ending at the denoised estimate."""
    schedule = FlowSchedule(shift=3.0)
    sigmas = sigmas_for(schedule, name, "simple", 8, 1.0).to(torch.float32)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    out = SAMPLERS[name](PointMass(schedule), x, sigmas, extra_args={"seed": 7})
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, torch.full(SHAPE, X0), rtol=0, atol=2e-3)


def test_euler_cfg_pp_is_the_ancestral_one_at_eta_0_on_flow() -> None:
    """ComfyUI defines euler_cfg_pp as euler_ancestral_cfg_pp with eta = 0; both start at a flow's sigma 1,
    where alpha is 0, with a denoiser that depends on x."""
    schedule = FlowSchedule(shift=3.0)
    sigmas = sigmas_for(schedule, "euler", "simple", 8, 1.0).to(torch.float32)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))

    class Affine(PointMass):
        def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
            return 0.5 * x + 1.0

    a = SAMPLERS["euler_ancestral_cfg_pp"](Affine(schedule), x, sigmas, extra_args={"seed": 1}, eta=0.0)
    b = SAMPLERS["euler_cfg_pp"](Affine(schedule), x, sigmas, extra_args={"seed": 1})
    assert bool(torch.isfinite(a).all())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

"""Sampler registry: ComfyUI sampler names -> ``sample_X`` functions.

``SAMPLER_NAMES`` keeps ComfyUI's ``KSampler.SAMPLERS`` order for the names implemented here, so a
workflow's ``sampler_name`` widget value means the same algorithm in both tools.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .deis import sample_deis
from .dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from .res_multistep import (
    sample_res_multistep,
    sample_res_multistep_ancestral,
    sample_res_multistep_ancestral_cfg_pp,
    sample_res_multistep_cfg_pp,
)
from .sa_solver import sample_sa_solver, sample_sa_solver_pece
from .samplers_ode import (
    sample_dpm_2,
    sample_dpmpp_2m,
    sample_dpmpp_2m_cfg_pp,
    sample_euler,
    sample_euler_cfg_pp,
    sample_gradient_estimation,
    sample_gradient_estimation_cfg_pp,
    sample_heun,
    sample_heunpp2,
    sample_ipndm,
    sample_ipndm_v,
    sample_lms,
)
from .samplers_sde import (
    sample_ddpm,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_2s_ancestral_cfg_pp,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_er_sde,
    sample_euler_ancestral,
    sample_euler_ancestral_cfg_pp,
    sample_lcm,
    sample_seeds_2,
    sample_seeds_3,
)
from .uni_pc import sample_uni_pc, sample_uni_pc_bh2

SamplerFn = Callable[..., torch.Tensor]


def _gpu(fn: SamplerFn) -> SamplerFn:
    """The ``*_gpu`` names: same SDE sampler with the Brownian tree built on x's device."""
    return functools.partial(fn, cpu_noise=False)


# Order = ComfyUI's KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"] (all of them).
SAMPLERS: dict[str, SamplerFn] = {
    "euler": sample_euler,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral": sample_euler_ancestral,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": _gpu(sample_dpmpp_sde),
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": _gpu(sample_dpmpp_2m_sde),
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": _gpu(sample_dpmpp_2m_sde_heun),
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": _gpu(sample_dpmpp_3m_sde),
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "res_multistep": sample_res_multistep,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": sample_gradient_estimation,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
    # ComfyUI runs "ddim" as Euler (with fresh random noise for the inpainting re-noise, see sample.py)
    "ddim": sample_euler,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}

SAMPLER_NAMES: list[str] = list(SAMPLERS)

# These compute steps+1 sigmas and drop the second-to-last one (ComfyUI KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS).
DISCARD_PENULTIMATE_SIGMA_SAMPLERS: frozenset[str] = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def get_sampler(name: str) -> SamplerFn:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLER_NAMES}") from None

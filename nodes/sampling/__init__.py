"""sdflow's sampling machinery: noise schedule, sigma schedulers, samplers, CFG guidance, previews.

Pure torch; imports nothing else from sdflow, the model is passed in as a callable.
"""

from .guidance import CFGDenoiser, make_denoiser, prepare_mask
from .model_sampling import DiscreteSchedule
from .preview import latent_to_rgb
from .sample import prepare_noise, sample, sigmas_for
from .samplers import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, SAMPLER_NAMES, get_sampler
from .schedulers import SCHEDULER_NAMES, calculate_sigmas

__all__ = [
    "CFGDenoiser",
    "DISCARD_PENULTIMATE_SIGMA_SAMPLERS",
    "DiscreteSchedule",
    "SAMPLER_NAMES",
    "SCHEDULER_NAMES",
    "calculate_sigmas",
    "get_sampler",
    "latent_to_rgb",
    "make_denoiser",
    "prepare_mask",
    "prepare_noise",
    "sample",
    "sigmas_for",
]

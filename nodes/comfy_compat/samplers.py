"""ComfyUI's `comfy.samplers`: the sampler and scheduler names (packs build combos from them)."""
from __future__ import annotations

from typing import Any

from ..sampling import SAMPLER_NAMES, SCHEDULER_NAMES
from .stubs import NotSupportedBySdflow

KSAMPLER_NAMES = list(SAMPLER_NAMES)


class KSampler:
    SAMPLERS = list(SAMPLER_NAMES)
    SCHEDULERS = list(SCHEDULER_NAMES)
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotSupportedBySdflow("comfy.samplers.KSampler objects are not supported by sdflow; "
                                   "call nodes.KSampler().sample(...) or nodes.common_ksampler instead")


def sampler_object(name: str) -> Any:
    raise NotSupportedBySdflow("comfy.samplers.sampler_object is not supported by sdflow")


def __getattr__(name: str) -> Any:
    # What sdflow does not offer of comfy.samplers is a placeholder that says so when called.
    if name.startswith("__"):
        raise AttributeError(name)
    from .stubs import placeholder
    return placeholder("comfy.samplers", name)

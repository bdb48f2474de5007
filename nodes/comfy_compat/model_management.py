"""ComfyUI's `comfy.model_management`: device queries, interrupt checks and cache release for packs.

sdflow runs on one device per executor and loads models itself, so the loading/offloading functions are
not offered; what packs call around their own tensors is."""
from __future__ import annotations

import gc
from enum import Enum
from typing import Any

import torch

from engine.progress import Interrupted, check_interrupt

# Raising sdflow's own exception means a pack's interrupt ends the prompt as an interrupt, not an error.
InterruptProcessingException = Interrupted


class VRAMState(Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class CPUState(Enum):
    GPU = 0
    CPU = 1
    MPS = 2


_interrupt_requested = False


def get_torch_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


vram_state = VRAMState.NORMAL_VRAM if torch.cuda.is_available() else VRAMState.DISABLED
cpu_state = CPUState.GPU if torch.cuda.is_available() else CPUState.CPU


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def text_encoder_offload_device() -> torch.device:
    return torch.device("cpu")


def vae_offload_device() -> torch.device:
    return torch.device("cpu")


def text_encoder_device() -> torch.device:
    return get_torch_device()


def vae_device() -> torch.device:
    return get_torch_device()


def is_device_type(device: Any, kind: str) -> bool:
    return getattr(device, "type", None) == kind


def is_device_cpu(device: Any) -> bool:
    return is_device_type(device, "cpu")


def is_device_mps(device: Any) -> bool:
    return is_device_type(device, "mps")


def is_device_cuda(device: Any) -> bool:
    return is_device_type(device, "cuda")


def cpu_mode() -> bool:
    return get_torch_device().type == "cpu"


def mps_mode() -> bool:
    return get_torch_device().type == "mps"


def is_nvidia() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None


def xformers_enabled() -> bool:
    return False


def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
    dev = dev if dev is not None else get_torch_device()
    if getattr(dev, "type", "cpu") == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return (free, free) if torch_free_too else free
    import psutil
    free = psutil.virtual_memory().available
    return (free, free) if torch_free_too else free


def get_total_memory(dev: Any = None, torch_total_too: bool = False) -> Any:
    dev = dev if dev is not None else get_torch_device()
    if getattr(dev, "type", "cpu") == "cuda":
        total = torch.cuda.mem_get_info(dev)[1]
    else:
        import psutil
        total = psutil.virtual_memory().total
    return (total, total) if torch_total_too else total


def _fast_dtype(device: Any = None) -> torch.dtype:
    dev = device if device is not None else get_torch_device()
    return torch.float16 if getattr(dev, "type", "cpu") == "cuda" else torch.float32


def unet_dtype(device: Any = None, *args: Any, **kwargs: Any) -> torch.dtype:
    return _fast_dtype(device)


def vae_dtype(device: Any = None, *args: Any, **kwargs: Any) -> torch.dtype:
    return torch.float32


def text_encoder_dtype(device: Any = None) -> torch.dtype:
    return _fast_dtype(device)


def should_use_fp16(device: Any = None, *args: Any, **kwargs: Any) -> bool:
    return _fast_dtype(device) == torch.float16


def should_use_bf16(device: Any = None, *args: Any, **kwargs: Any) -> bool:
    return False


def soft_empty_cache(force: bool = False) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cleanup_models(*args: Any, **kwargs: Any) -> None:
    gc.collect()


def unload_all_models() -> None:
    """sdflow's cache owns the models: nothing to unload on a pack's request."""


def load_models_gpu(*args: Any, **kwargs: Any) -> None:
    """sdflow's nodes place models on the device themselves; a pack asking is a no-op."""


def interrupt_current_processing(value: bool = True) -> None:
    global _interrupt_requested
    _interrupt_requested = value


def processing_interrupted() -> bool:
    if _interrupt_requested:
        return True
    try:
        check_interrupt()
    except Interrupted:
        return True
    return False


def throw_exception_if_processing_interrupted() -> None:
    global _interrupt_requested
    if _interrupt_requested:
        _interrupt_requested = False
        raise InterruptProcessingException("interrupted")
    check_interrupt()


def __getattr__(name: str) -> Any:
    # What sdflow does not offer of comfy.model_management is a placeholder that says so when called.
    if name.startswith("__"):
        raise AttributeError(name)
    from .stubs import placeholder
    return placeholder("comfy.model_management", name)

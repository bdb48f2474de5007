"""Speed switches for the UNet and VAE: attention backend, weight precision, channels_last.

The choices come from `RuntimeConfig.speed` (set by the CLI flags, ComfyUI's names:
--use-pytorch-cross-attention, --use-split-cross-attention, --use-quad-cross-attention, --force-fp16,
--force-fp32, --bf16-unet, --fp16-unet, --fp32-vae, --bf16-vae, --fp16-vae); an empty dict is the automatic
choice. Kept in the config rather than in module state so Ray workers and several configured
environments in one process each get their own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.config import current_config

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "sdpa", "sliced", "basic")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SpeedSettings:
    attention: str = "auto"          # one of ATTENTION_CHOICES
    unet_dtype: str | None = None    # "fp32" | "fp16" | "bf16"; None = automatic per device
    vae_dtype: str | None = None     # None = float32 (the SD VAEs overflow in fp16)
    channels_last: bool = False      # off by default: slower on the CPU we measured (bench/pipeline.py)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not {self.attention!r}")
        for name in ("unet_dtype", "vae_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, not {value!r}")


def speed_settings() -> SpeedSettings:
    config = current_config()
    given: dict[str, Any] = dict(getattr(config, "speed", None) or {}) if config is not None else {}
    return SpeedSettings(**given)


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """None where no GPU can be asked (a CUDA device named on a machine without one): no downgrade then."""
    return torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None


def unet_dtype(device: torch.device | str, settings: SpeedSettings | None = None,
               capability: tuple[int, int] | None = None) -> torch.dtype:
    """Weight dtype of the UNet (and text encoders) computing on `device`.

    Asked for: that dtype, except bf16 on a CUDA GPU older than Ampere (capability 8), which has no bf16
    units, and half precision on a CUDA GPU older than Pascal-class fp16 (capability 6): float32 there.
    Automatic: float16 on CUDA (see memory.compute_dtype), float32 elsewhere -- half precision on the CPU
    is only used when asked for (bf16 is fast on CPUs with AVX512-BF16/AMX, slow on others)."""
    settings = settings or speed_settings()
    dev = torch.device(device)
    if dev.type == "cuda":
        cap = capability if capability is not None else _cuda_capability(dev)
        wanted = settings.unet_dtype or "fp16"
        if wanted == "bf16" and cap is not None and cap < (8, 0):
            log.warning("bf16 asked for, but CUDA capability %d.%d has no bf16; using fp16", *cap)
            wanted = "fp16"
        if wanted == "fp16" and cap is not None and cap < (6, 0):
            wanted = "fp32"
        return DTYPES[wanted]
    return DTYPES[settings.unet_dtype or "fp32"]


def vae_dtype(settings: SpeedSettings | None = None) -> torch.dtype:
    settings = settings or speed_settings()
    return DTYPES[settings.vae_dtype or "fp32"]


# ---- attention --------------------------------------------------------------------------------------

def attention_scores_bytes(batch: int, heads: int, tokens: int, context_tokens: int, element_size: int) -> int:
    """Bytes of one attention layer's full score matrix (what the plain and math-SDPA paths materialise)."""
    return batch * heads * tokens * context_tokens * element_size


def choose_attention(device_type: str, *, batch: int, heads: int, tokens: int, element_size: int,
                     free_bytes: int | None, requested: str = "auto") -> tuple[str, int | None]:
    """(backend, slice size) for an attention layer of `tokens` query tokens (self-attention at the
    UNet's largest resolution: the worst case).

    A requested backend wins. Automatic rule: on CUDA, SDPA (its flash / memory-efficient kernels never
    hold the score matrix, so size does not matter). Elsewhere SDPA too, unless the full score matrix
    would take more than a quarter of the free memory: then sliced attention, with slices of batch*heads
    rows small enough that one slice's scores fit in that quarter. (Recent torch's CPU SDPA kernel is
    blocked too, so on the CPU this is a safety margin; on MPS SDPA holds the whole matrix.)"""
    rows = batch * heads
    if requested == "sliced":
        return "sliced", _slice_size(rows, tokens, element_size, free_bytes)
    if requested in ("sdpa", "basic"):
        return requested, None
    if device_type == "cuda" or free_bytes is None:
        return "sdpa", None
    need = attention_scores_bytes(batch, heads, tokens, tokens, element_size)
    if need <= free_bytes // 4:
        return "sdpa", None
    return "sliced", _slice_size(rows, tokens, element_size, free_bytes)


def _slice_size(rows: int, tokens: int, element_size: int, free_bytes: int | None) -> int:
    if free_bytes is None:
        return max(1, rows // 2)
    per_row = tokens * tokens * element_size
    return max(1, min(rows, (free_bytes // 4) // max(per_row, 1)))


def set_attention(unet: nn.Module, backend: str, slice_size: int | None = None) -> None:
    """Install diffusers' attention processor for `backend` in every attention layer of `unet`."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

    if backend == "sdpa":
        processor: Any = AttnProcessor2_0()
    elif backend == "sliced":
        processor = SlicedAttnProcessor(slice_size or 1)
    elif backend == "basic":
        processor = AttnProcessor()
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    unet.set_attn_processor(processor)  # type: ignore[operator]


def attention_shape(config: Any, height: int, width: int) -> tuple[int, int]:
    """(heads, query tokens) of the UNet's highest-resolution attention layer for a latent of
    height x width: the largest score matrix of a call. SDXL's first block has no attention, so its
    first attention runs at half the latent size. (diffusers' `attention_head_dim` of the SD UNets holds
    the head count, a historical misnomer.)"""
    blocks = list(getattr(config, "down_block_types", None) or ["CrossAttnDownBlock2D"])
    level = next((i for i, kind in enumerate(blocks) if "Attn" in kind), len(blocks) - 1)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        heads = heads[min(level, len(heads) - 1)]
    tokens = -(-height // 2 ** level) * -(-width // 2 ** level)
    return int(heads or 8), tokens


def free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def configure_unet(unet: nn.Module, x: torch.Tensor, settings: SpeedSettings | None = None) -> str:
    """Pick and install the attention backend (and memory format) for a UNet call on input `x`; cheap
    when nothing changed (the choice is remembered on the module). Returns the backend in use."""
    settings = settings or speed_settings()
    dtype = next(unet.parameters()).dtype
    heads, tokens = attention_shape(unet.config, x.shape[-2], x.shape[-1])
    backend, slices = choose_attention(
        x.device.type, batch=x.shape[0], heads=heads, tokens=tokens,
        element_size=torch.finfo(dtype).bits // 8, requested=settings.attention,
        free_bytes=free_memory(x.device) if settings.attention == "auto" or settings.attention == "sliced"
        else None)
    key = (backend, slices, settings.channels_last)
    previous = getattr(unet, "_sdflow_speed", None)
    if previous != key:
        set_attention(unet, backend, slices)
        # Weights are only touched when channels_last is, or was, asked for (split/streamed UNets alike).
        if settings.channels_last or (previous is not None and previous[2]):
            memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
            unet.to(memory_format=memory_format)  # type: ignore[call-overload]
        unet._sdflow_speed = key  # type: ignore[assignment]
    return backend


def compile_unet(unet: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile of the UNet (compiled lazily, on the first call). The compiled module shares the
    original's parameters and forwards attribute reads (`.config`) to it."""
    return torch.compile(unet, backend=backend)  # type: ignore[return-value]

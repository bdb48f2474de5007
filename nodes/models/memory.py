"""Footprint/offload protocol for the runtime objects on MODEL / CLIP / VAE sockets.

The engine's cache accounting is duck-typed: any cached value that has

    footprint() -> dict[str, int]      # bytes held per device string ("cpu", "cuda:0", ...)
    to_device(device: str) -> None     # move the weights there (offload or reload)

is measured and may be moved between devices under the cache's byte budget. Handles that are
clones of one another share their weights; `weights_key()` names the shared storage so an
accountant that wants to count shared weights once can group by it.

Each handle has a *load device* (where it computes: cuda when available, else cpu). `to_device`
only moves storage; the next use moves the weights back to the load device on its own
(`ensure_loaded`), so the engine can offload freely without breaking later runs.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from engine.config import current_config
from engine.memory import accelerator_budgets, device_kind, notify_moved, request_room, room, tensor_part

from .streaming import PartialLoad, load_partial
from .weight_patch import InPlacePatcher

_SERIALS = itertools.count(1)


def vram_mode() -> str:
    """The running configuration's --gpu-only/--highvram/--normalvram/--lowvram/--novram/--cpu choice."""
    config = current_config()
    return config.vram_mode if config is not None else "normal"


def default_device() -> str:
    """Where models compute unless told otherwise (--cpu: the CPU even where CUDA exists)."""
    return "cuda" if torch.cuda.is_available() and vram_mode() != "cpu" else "cpu"


def resident_limit(mode: str, nbytes: int, free: int | None) -> int | None:
    """How many of a model's `nbytes` may stay on an accelerator with `free` bytes of room (None: no
    limit known), as ComfyUI decides it: --gpu-only and --highvram load whole models; the normal and
    --lowvram modes load whole models that fit and split the others (the blocks that fit stay, the rest
    stream per forward); --novram keeps nothing resident. None = load it whole."""
    if mode in ("gpu-only", "highvram", "cpu"):
        return None
    if mode == "novram":
        return 0
    if free is None or nbytes <= free:
        return None
    return free


def _room_on(device: str) -> int | None:
    free = room(device)
    if free is None and vram_mode() in ("lowvram", "novram"):
        free = accelerator_budgets().get(device_kind(device))
    return free


def compute_dtype(device: torch.device | str, *, vae: bool = False) -> torch.dtype:
    """The dtype models are loaded in for computing on `device`.

    On CUDA the UNet and text encoders run in float16: half the memory and several times the
    speed of float32. float16 rather than bfloat16 (even where the GPU supports bf16): SD1/SD2/
    SDXL UNets and CLIP are published and run in fp16 without overflowing (SD2's config upcasts
    attention), and fp16's longer mantissa keeps results closer to fp32 -- ComfyUI's default too.
    The VAE stays float32 everywhere: the SD VAE decoders overflow to inf/NaN in fp16.
    On the CPU (and other devices) everything is float32, where half precision is slow or missing.
    """
    from .speed import unet_dtype, vae_dtype  # the --fp16-unet/--bf16-vae/... switches override this

    return vae_dtype() if vae else unet_dtype(device)


def device_key(device: torch.device | str) -> str:
    """Canonical device string for accounting: 'cpu', 'cuda:0', 'mps', ..."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return dev.type if dev.index is None else f"{dev.type}:{dev.index}"


def module_footprint(modules: Iterable[nn.Module | None]) -> dict[str, int]:
    """Bytes of parameters and buffers per device; a tensor shared by several modules counts once."""
    seen: set[tuple] = set()
    totals: dict[str, int] = {}
    for module in modules:
        if module is None:
            continue
        for tensor in _tensors(module):
            # Tied weights (the same storage under two names) must not be double counted.
            try:
                ident = tensor.untyped_storage().data_ptr() or id(tensor)
            except (RuntimeError, NotImplementedError):
                ident = id(tensor)
            key = (ident, tensor.device.type, tensor.device.index)
            if key in seen:
                continue
            seen.add(key)
            dev = device_key(tensor.device)
            totals[dev] = totals.get(dev, 0) + tensor.numel() * tensor.element_size()
    return totals


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def modules_device(modules: Iterable[nn.Module | None]) -> torch.device | None:
    """Device of the first parameter found, or None for parameterless modules."""
    for module in modules:
        if module is None:
            continue
        for tensor in _tensors(module):
            return tensor.device
    return None


class WeightsHolder:
    """Shared by all clones of a handle: the modules and one lock that serialises device moves."""

    def __init__(self, modules: dict[str, nn.Module | None]) -> None:
        self.modules = modules
        self.lock = threading.RLock()
        self.partial: PartialLoad | None = None    # set while the modules are split (see streaming.py)
        # Names these weights in patch keys: unlike id(), never reused by a later holder.
        self.serial = next(_SERIALS)
        self.patchers: dict[str, InPlacePatcher] = {}

    def patcher(self, name: str) -> InPlacePatcher:
        """The in-place patcher of one module (one per module, shared by every handle on these weights)."""
        with self.lock:
            patcher = self.patchers.get(name)
            if patcher is None:
                module = self.modules[name]
                assert module is not None
                patcher = self.patchers[name] = InPlacePatcher(module, self.lock)
            return patcher

    def _restore_patches(self) -> None:
        # Before a move: the originals never have to follow their weights to another device, and the
        # next use re-applies its patch where the weights now are.
        for patcher in self.patchers.values():
            patcher.restore()

    def present(self) -> list[nn.Module]:
        return [m for m in self.modules.values() if m is not None]

    def footprint(self) -> dict[str, int]:
        totals = module_footprint(self.present())
        for patcher in self.patchers.values():
            for tensor in patcher.originals():
                dev = device_key(tensor.device)
                totals[dev] = totals.get(dev, 0) + tensor.numel() * tensor.element_size()
        return totals

    def memory_parts(self) -> dict:
        """Each weight storage as a part, so the engine's cache counts weights shared between handles
        (clones, LoRA-patched copies) once; plus the kept originals of weights patched in place (each
        patcher's `extra_bytes()`), the only memory a patch costs."""
        out = {}
        for module in self.present():
            for tensor in _tensors(module):
                key, part = tensor_part(tensor)
                out[key] = part
        for patcher in self.patchers.values():
            for tensor in patcher.originals():
                key, part = tensor_part(tensor)
                out[key] = part
        return out

    def move(self, device: str | torch.device) -> None:
        """Move every module to `device`, telling the engine's accounting before (so it can offload least
        recently used entries to make room) and after (so it re-measures where these weights live). The
        notifications happen outside `self.lock`: the cache may move other handles while making room."""
        target = torch.device(device)
        partial = self.partial
        if partial is not None and _same_device(partial.device, target):
            return   # split onto this device already: that is as loaded as it gets
        self.load(target, None if target.type == "cpu" else "auto")

    def load(self, device: str | torch.device, limit: int | None | str = "auto") -> None:
        """Put the modules on `device`, whole (`limit` None) or split so at most `limit` bytes stay
        resident and the rest stream from the CPU per forward; "auto" asks the budget and the VRAM mode
        (`resident_limit`)."""
        target = torch.device(device)
        with self.lock:
            partial = self.partial
            if partial is not None and _same_device(partial.device, target) and limit == "auto":
                return   # already loaded as far as it goes
        split = isinstance(limit, int) or partial is not None    # a (re)split touches every module
        pending = [m for m in self.present() if split or not _on_device(m, target)]
        if not pending:
            return
        key = device_key(target)
        needed = sum(module_footprint(pending).values())
        request_room(key, needed)
        if limit == "auto":
            limit = resident_limit(vram_mode(), needed, _room_on(key)) if target.type != "cpu" else None
        with self.lock:
            self._restore_patches()
            if self.partial is not None:
                self.partial.release()
                self.partial = None
            if isinstance(limit, int):
                for module in self.present():
                    module.to("cpu")
                # A split onto the CPU is a simulation (the CPU is home): copying per visit stands
                # for the transfer a real accelerator makes.
                self.partial = load_partial(self.present(), target, limit, copy_always=target.type == "cpu")
            else:
                for module in pending:
                    if not _on_device(module, target):
                        module.to(target)
            if target.type == "cpu" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        notify_moved(self)

    @property
    def compute_device(self) -> torch.device | None:
        """Where the modules compute: the load device of a split model, else where their weights are."""
        partial = self.partial
        return partial.device if partial is not None else modules_device(self.present())

    def ensure_on(self, device: str | torch.device) -> None:
        self.move(device)


def _on_device(module: nn.Module, target: torch.device) -> bool:
    current = modules_device([module])
    return current is None or _same_device(current, target)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    return device_key(a) == device_key(b)


class ResidentMixin:
    """Implements the protocol for a handle whose weights live in `self._weights` (a WeightsHolder)."""

    _weights: WeightsHolder
    load_device: str

    def footprint(self) -> dict[str, int]:
        return self._weights.footprint()

    def memory_parts(self) -> dict:
        return self._weights.memory_parts()

    def to_device(self, device: str) -> None:
        self._weights.move(device)

    def weights_key(self) -> str:
        return f"{type(self).__name__}:{id(self._weights):x}"

    def ensure_loaded(self) -> None:
        """Move the weights to the load device if something offloaded them."""
        self._weights.ensure_on(self.load_device)

    @property
    def current_device(self) -> torch.device | None:
        return modules_device(self._weights.present())

    @property
    def compute_device(self) -> torch.device | None:
        return self._weights.compute_device


# ---- text encoders leave the accelerator when sampling starts ------------------------------------------
OFFLOAD_DEVICE = "cpu"
_text_encoders: weakref.WeakSet[WeightsHolder] = weakref.WeakSet()
_text_encoders_lock = threading.Lock()


def register_text_encoder(holder: WeightsHolder) -> WeightsHolder:
    """Mark `holder` as text-encoder weights (CLIP, T5), which `release_text_encoders` offloads. Weakly:
    a holder no handle uses any more is forgotten with it."""
    with _text_encoders_lock:
        _text_encoders.add(holder)
    return holder


def release_text_encoders() -> list[WeightsHolder]:
    """Move every text encoder that sits on an accelerator to the CPU; returns the holders moved.

    Called when a sampling run starts: the prompts are encoded by then, and T5-XXL alone can take more
    room than the sampled model. The moves go through `WeightsHolder.move`, so the cache's accounting
    follows, and the next encode brings the weights back (`ensure_loaded`). --gpu-only keeps them (it
    stores everything on the GPU, as ComfyUI's does); so does --highvram, whose promise (ComfyUI's too)
    is that models stay in GPU memory after use instead of going back to the CPU. On a CPU-only machine
    nothing sits on an accelerator: a no-op."""
    if vram_mode() in ("gpu-only", "highvram"):
        return []
    with _text_encoders_lock:
        holders = list(_text_encoders)
    moved = []
    for holder in holders:
        device = holder.compute_device
        if device is None or device.type == OFFLOAD_DEVICE:
            continue
        holder.move(OFFLOAD_DEVICE)
        moved.append(holder)
    return moved


def is_out_of_memory(error: BaseException) -> bool:
    """True for the allocator errors that a smaller batch or tiling can work around."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()

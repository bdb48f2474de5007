"""What the MODEL socket carries: a diffusers UNet plus the facts a sampler needs about it."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .memory import ResidentMixin, WeightsHolder, default_device


class DiffusionModelHandle(ResidentMixin):
    """A UNet2DConditionModel with its architecture facts; `apply` runs one denoiser evaluation."""

    def __init__(self, unet: nn.Module, arch: str, prediction_type: str = "epsilon",
                 device: str | None = None) -> None:
        if arch not in ("sd1", "sd2", "sdxl"):
            raise ValueError(f"unknown architecture {arch!r}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction type {prediction_type!r}")
        self._weights = WeightsHolder({"unet": unet})
        self.arch = arch
        self.prediction_type = prediction_type
        self.load_device = device or default_device()

    # A ModelSampling* node's noise schedule (nodes/model_patches.py); None = the checkpoint's own.
    model_sampling: Any = None
    # Sampling patches set by model-patch nodes on a clone (see with_patches): "cfg_function",
    # "denoise_mask_function" (read by nodes.sampling.sample), "guider" (a (kind, ...) tuple for
    # guiders other than CFG) and "output_block_patches" (functions (h, skip) -> (h, skip) applied to
    # every UNet up-block input before it is concatenated with its skip connection).
    sampling_patches: Mapping[str, Any] = MappingProxyType({})

    def with_patches(self, **patches: Any) -> DiffusionModelHandle:
        """A clone with these sampling patches added; output_block_patches accumulate, others replace."""
        twin = self.clone()
        merged = dict(self.sampling_patches)
        for key, value in patches.items():
            if key == "output_block_patches":
                value = tuple(merged.get(key, ())) + tuple(value)
            merged[key] = value
        twin.sampling_patches = merged
        return twin

    def with_model_sampling(self, schedule: Any) -> DiffusionModelHandle:
        twin = self.clone()
        twin.model_sampling = schedule
        return twin

    @contextlib.contextmanager
    def output_block_hooks(self):
        """Run output_block_patches inside the UNet while the context is open (a sampling run: apply()
        calls inside it see them). The weights are shared with other handles, so the hooks live only
        that long. In a diffusers up block each resnet's input is
        cat([h, skip]); the split point follows from the block's channel layout."""
        patches = self.sampling_patches.get("output_block_patches") or ()
        if not patches:
            yield
            return
        handles = []

        def make_hook(h_channels: int):
            def hook(module, args):
                h, skip = args[0][:, :h_channels], args[0][:, h_channels:]
                h = h.clone()
                for patch in patches:
                    h, skip = patch(h, skip)
                return (torch.cat([h, skip.to(h.dtype)], dim=1),) + tuple(args[1:])
            return hook

        try:
            for block in getattr(self.unet, "up_blocks", ()):
                resnets = list(getattr(block, "resnets", ()))
                for i, resnet in enumerate(resnets):
                    out_ch = int(resnet.out_channels)
                    h_ch = int(resnet.in_channels) - out_ch if i == 0 and len(resnets) > 1 else out_ch
                    handles.append(resnet.register_forward_pre_hook(make_hook(h_ch)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def sampling_schedule(self) -> Any:
        """The DiscreteSchedule (or override) samplers use with this model."""
        if self.model_sampling is not None:
            return self.model_sampling
        from ..sampling.model_sampling import DiscreteSchedule
        return DiscreteSchedule(prediction_type=self.prediction_type)

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, device: str | None = None) -> "DiffusionModelHandle":
        """From a `nodes.models.checkpoint.LoadedCheckpoint` (duck-typed)."""
        if checkpoint.unet is None:
            raise ValueError(f"{getattr(checkpoint, 'source', 'checkpoint')} has no diffusion model")
        return cls(checkpoint.unet, checkpoint.arch, checkpoint.prediction_type, device=device)

    @property
    def unet(self) -> nn.Module:
        return self._weights.modules["unet"]

    def clone(self) -> "DiffusionModelHandle":
        """Shares the weights; attributes set on the clone leave the original alone."""
        twin = object.__new__(DiffusionModelHandle)
        twin.__dict__.update(self.__dict__)
        return twin

    def with_unet(self, unet: nn.Module) -> "DiffusionModelHandle":
        """A clone holding different weights (e.g. a LoRA-merged copy); settings carried over."""
        twin = self.clone()
        twin._weights = WeightsHolder({"unet": unet})
        return twin

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def in_channels(self) -> int:
        return int(getattr(self.unet.config, "in_channels", 4))

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    # no_grad rather than inference_mode: callers may update the result in place afterwards.
    @torch.no_grad()
    def apply(self, x_in: torch.Tensor, timestep: torch.Tensor | float, cond: dict[str, Any]) -> torch.Tensor:
        """Raw UNet output (eps or v) for model-space input `x_in` [B,C,h,w] at `timestep`
        (model timesteps 0..999, scalar or [B]).

        `cond`: "context" [B|1, T, D] (required); "pooled" [B|1, P] and "size_cond" [B|1, 6]
        (SDXL's added conditioning: text_embeds / time_ids); optional "control" as a dict with
        "down" (list of residuals, one per UNet skip connection) and "mid" (the middle block's
        residual), added inside the UNet the way a ControlNet's outputs are; anything else is ignored.
        Batch-1 conditioning is broadcast to the batch of `x_in`. Inputs are cast to the UNet's
        dtype (float16 on CUDA); the result is on `x_in`'s device in float32 (or `x_in`'s dtype if
        that is wider), so samplers keep full precision whatever the weights are stored in.
        """
        self.ensure_loaded()
        device = next(self.unet.parameters()).device
        dtype = self.dtype
        batch = x_in.shape[0]

        def prep(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype)
            if t.shape[0] != batch:
                if t.shape[0] != 1:
                    raise ValueError(f"conditioning batch {t.shape[0]} does not match input batch {batch}")
                t = t.expand(batch, *t.shape[1:])
            return t

        if "context" not in cond:
            raise ValueError("cond needs a 'context' tensor")
        context = prep(cond["context"])
        x = x_in.to(device=device, dtype=dtype)
        t = torch.as_tensor(timestep, device=device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(batch)
        kwargs: dict[str, Any] = {}
        if self._needs_added_cond():
            pooled, size_cond = cond.get("pooled"), cond.get("size_cond")
            if pooled is None or size_cond is None:
                raise ValueError("SDXL models need 'pooled' and 'size_cond' in cond")
            kwargs["added_cond_kwargs"] = {"text_embeds": prep(pooled), "time_ids": prep(size_cond)}
        control = cond.get("control")
        if control is not None and not isinstance(control, dict) and hasattr(control, "get_control"):
            # A ControlNet application (nodes/models/controlnet.py) computes residuals for this input.
            control = control.get_control(x_in, timestep, cond)
        if isinstance(control, dict) and (control.get("down") is not None or control.get("mid") is not None):
            # diffusers only applies residuals when both parts are given.
            if control.get("down") is None or control.get("mid") is None:
                raise ValueError("control residuals need both 'down' and 'mid'")
            kwargs["down_block_additional_residuals"] = [prep(r) for r in control["down"]]
            kwargs["mid_block_additional_residual"] = prep(control["mid"])
        out = self.unet(x, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        return out.to(device=x_in.device, dtype=torch.promote_types(x_in.dtype, torch.float32))

    def _needs_added_cond(self) -> bool:
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

"""What the MODEL socket carries: a diffusers UNet plus the facts a sampler needs about it."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from engine.memory import notify_moved

from .inpaint import extra_input
from .memory import ResidentMixin, WeightsHolder, default_device
from .speed import configure_unet

ARCHES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
# (scale, shift) of each architecture's latent format (ComfyUI's comfy.latent_formats): LATENT values
# hold raw VAE latents and sampling works on (x - shift) * scale.
LATENT_FORMATS: dict[str, tuple[float, float]] = {
    "sd1": (0.18215, 0.0), "sd2": (0.18215, 0.0), "sdxl": (0.13025, 0.0), "sdxl_refiner": (0.13025, 0.0),
    "sd3": (1.5305, 0.0609),
}
# The SDXL refiner's aesthetic score when a conditioning does not give one (ComfyUI's defaults).
REFINER_ASCORE = {0: 6.0, 1: 2.5}  # cond_or_uncond: 0 = positive, 1 = negative


class DiffusionModelHandle(ResidentMixin):
    """A UNet2DConditionModel with its architecture facts; `apply` runs one denoiser evaluation."""

    def __init__(self, unet: nn.Module, arch: str, prediction_type: str = "epsilon",
                 device: str | None = None) -> None:
        if arch not in ARCHES:
            raise ValueError(f"unknown architecture {arch!r}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction type {prediction_type!r}")
        self._weights = WeightsHolder({"unet": unet})
        self.arch = arch
        self.prediction_type = prediction_type
        self.load_device = device or default_device()

    @property
    def latent_format(self) -> tuple[float, float]:
        """(scale, shift) between a LATENT's raw VAE latents and the model space sampling runs in."""
        return LATENT_FORMATS[self.arch]

    # A ModelSampling* node's noise schedule (nodes/model_patches.py); None = the checkpoint's own.
    model_sampling: Any = None
    # Sampling patches set by model-patch nodes on a clone (see with_patches): "cfg_function",
    # "denoise_mask_function" (read by nodes.sampling.sample), "guider" (a (kind, ...) tuple for
    # guiders other than CFG) and "output_block_patches" (functions (h, skip) -> (h, skip) applied to
    # every UNet up-block input before it is concatenated with its skip connection); "hypernetworks"
    # (HypernetworkPatch objects, accumulated) rewrite the attention key/value inputs.
    sampling_patches: Mapping[str, Any] = MappingProxyType({})
    # SD2.1 unCLIP: the checkpoint's noise-augmentor statistics (mean, std), each [1, D]; see models/unclip.py.
    unclip_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def with_patches(self, **patches: Any) -> DiffusionModelHandle:
        """A clone with these sampling patches added; output_block_patches accumulate, others replace."""
        twin = self.clone()
        merged = dict(self.sampling_patches)
        for key, value in patches.items():
            if key in ("output_block_patches", "hypernetworks"):
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
            for block in getattr(self.base_unet, "up_blocks", ()):
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
    def from_checkpoint(cls, checkpoint: Any, device: str | None = None) -> DiffusionModelHandle:
        """From a `nodes.models.checkpoint.LoadedCheckpoint` (duck-typed)."""
        if checkpoint.unet is None:
            raise ValueError(f"{getattr(checkpoint, 'source', 'checkpoint')} has no diffusion model")
        handle = cls(checkpoint.unet, checkpoint.arch, checkpoint.prediction_type, device=device)
        stats = getattr(checkpoint, "extras", {}).get("noise_augmentor")
        if stats is not None:
            handle.unclip_stats = stats
        return handle

    # Weight patches recorded on this handle (merge.MergePatch, lora.LoraPatch), applied in place to the
    # shared base UNet when this handle's `unet` is used.
    weight_patches: tuple = ()

    @property
    def base_unet(self) -> nn.Module:
        """The loaded UNet, without this handle's merge patches."""
        unet = self._weights.modules["unet"]
        assert unet is not None  # a diffusion model handle always holds its UNet
        return unet

    @property
    def unet(self) -> nn.Module:
        """The UNet holding this handle's weights: the shared base module, patched in place to this
        handle's patch list (merges, LoRAs) or restored to its originals for the base handle. The
        module stays right for this handle until another handle on the same base asks for it."""
        if not self.weight_patches and not self._weights.patchers:
            return self.base_unet
        from .merge import handle_patch_fn, patch_key

        key = patch_key(self)
        patcher = self._weights.patcher("unet")
        before = patcher.key
        module = patcher.sync(key, handle_patch_fn(self) if key else None)
        if patcher.key != before:
            # The kept originals changed: the cache re-measures (outside the sync, as after a move). Should
            # that re-measure offload these weights, the move restored them: patch again.
            notify_moved(self._weights)
            module = patcher.sync(key, handle_patch_fn(self) if key else None)
        return module

    def with_merge(self, patch: Any) -> DiffusionModelHandle:
        """A clone with one more weight patch, a merge or a LoRA (nothing is computed until the model
        is used)."""
        twin = self.clone()
        twin.weight_patches = tuple(self.weight_patches) + (patch,)
        return twin

    def clone(self) -> DiffusionModelHandle:
        """Shares the weights; attributes set on the clone leave the original alone."""
        twin = object.__new__(DiffusionModelHandle)
        twin.__dict__.update(self.__dict__)
        return twin

    def with_unet(self, unet: nn.Module) -> DiffusionModelHandle:
        """A clone holding different weights (e.g. a LoRA-merged copy); settings carried over."""
        twin = self.clone()
        twin._weights = WeightsHolder({"unet": unet})
        twin.weight_patches = ()  # the given weights already include them
        return twin

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base_unet.parameters()).dtype

    @property
    def in_channels(self) -> int:
        return int(getattr(self.base_unet.config, "in_channels", 4))

    @property
    def is_sdxl(self) -> bool:
        return self.arch in ("sdxl", "sdxl_refiner")

    @property
    def is_inpaint(self) -> bool:
        """A 9-channel inpainting model: its input is the latent plus mask and masked-image latent."""
        return self.in_channels == 9

    # no_grad rather than inference_mode: callers may update the result in place afterwards.
    @torch.no_grad()
    def apply(self, x_in: torch.Tensor, timestep: torch.Tensor | float, cond: dict[str, Any]) -> torch.Tensor:
        """Raw UNet output (eps or v) for model-space input `x_in` [B,C,h,w] at `timestep`
        (model timesteps 0..999, scalar or [B]).

        `cond`: "context" [B|1, T, D] (required); "pooled" [B|1, P] and "size_cond" [B|1, 6]
        (SDXL's added conditioning: text_embeds / time_ids); optional "control" as a dict with
        "down" (list of residuals, one per UNet skip connection) and "mid" (the middle block's
        residual), added inside the UNet the way a ControlNet's outputs are, or "intrablock" (a
        T2I-Adapter's features, added inside the down blocks); "concat" [B|1, 9, h, w] (mask, inpainting
        and pix2pix image latents, see models/inpaint.py): inpainting models append its first 5
        channels to their input, InstructPix2Pix models the last 4 (blanks when absent), others ignore
        it; "gligen" as (GligenHandle, its diffusers kwargs) grounds the call on text boxes; anything else
        is ignored.
        For the SDXL refiner, "size_cond" may hold the base model's 6 numbers (the aesthetic score
        then defaults per "cond_or_uncond"), and the base model takes the refiner's 5.
        Batch-1 conditioning is broadcast to the batch of `x_in`. Inputs are cast to the UNet's
        dtype (float16 on CUDA); the result is on `x_in`'s device in float32 (or `x_in`'s dtype if
        that is wider), so samplers keep full precision whatever the weights are stored in.
        """
        self.ensure_loaded()
        unet = self.unet   # once per call: each read syncs the shared weights to this handle's patches
        device = self.compute_device or next(unet.parameters()).device   # a split UNet: its load device
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
            size_cond = self._fit_time_ids(size_cond, pooled.shape[-1], cond.get("cond_or_uncond"))
            if cond.get("unclip") is not None:
                pooled = self._revision_pooled(cond["unclip"], prep(pooled), int(cond.get("seed", 0)))
            kwargs["added_cond_kwargs"] = {"text_embeds": prep(pooled), "time_ids": prep(size_cond)}
        if self.class_input_dim:
            kwargs["class_labels"] = prep(self._unclip_labels(cond.get("unclip"), batch, int(cond.get("seed", 0))))
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
        if isinstance(control, dict) and control.get("intrablock") is not None:
            kwargs["down_intrablock_additional_residuals"] = [prep(r) for r in control["intrablock"]]
        if x.shape[1] < self.in_channels:
            x = torch.cat([x, prep(extra_input(cond.get("concat"), x_in, self.in_channels - x.shape[1]))], dim=1)
        gligen = cond.get("gligen")  # (GligenHandle, {"boxes", "positive_embeddings", "masks"}), see models/gligen.py
        grounding = contextlib.nullcontext()
        if gligen is not None:
            kwargs["cross_attention_kwargs"] = {"gligen": {k: prep(v) for k, v in gligen[1].items()}}
            grounding = gligen[0].attached(unet)
        configure_unet(unet, x)
        if x.is_contiguous(memory_format=torch.contiguous_format) and _channels_last(unet):
            x = x.contiguous(memory_format=torch.channels_last)
        with self._hypernetwork_hooks(unet), grounding:
            out = unet(x, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        return out.to(device=x_in.device, dtype=torch.promote_types(x_in.dtype, torch.float32))

    @contextlib.contextmanager
    def _hypernetwork_hooks(self, unet: nn.Module):
        """Hypernetworks (models/hypernetwork.py) on the attention projections, for one call (the weights
        are shared with other handles)."""
        patches = self.sampling_patches.get("hypernetworks") or ()
        handles = []
        try:
            for patch in patches:
                handles.extend(patch.hooks(unet))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _fit_time_ids(self, size_cond: torch.Tensor, pooled_dim: int, cond_or_uncond: Any) -> torch.Tensor:
        cfg = self.base_unet.config
        per = int(getattr(cfg, "addition_time_embed_dim", 0) or 0)
        total = getattr(cfg, "projection_class_embeddings_input_dim", None)
        if not per or total is None:
            return size_cond
        want = (int(total) - int(pooled_dim)) // per
        have = size_cond.shape[-1]
        if want == have:
            return size_cond
        if want == 5 and have == 6:  # refiner given base conditioning: (h, w, crop_h, crop_w) + aesthetic score
            rows = size_cond.shape[0]
            flags = list(cond_or_uncond) if cond_or_uncond else [0]
            per_job = max(1, rows // len(flags))
            score = torch.tensor([REFINER_ASCORE.get(int(flags[min(i // per_job, len(flags) - 1)]), 6.0)
                                  for i in range(rows)], dtype=size_cond.dtype, device=size_cond.device)
            return torch.cat([size_cond[:, :4], score[:, None]], dim=1)
        if want == 6 and have == 5:  # base given refiner conditioning: the target size is the size
            return torch.cat([size_cond[:, :4], size_cond[:, :2]], dim=1)
        raise ValueError(f"the model's added conditioning takes {want} size numbers, got {have}")

    @property
    def class_input_dim(self) -> int:
        """Width of the class-label input of an unCLIP model (image embedding + noise-level embedding); 0 if none."""
        cfg: Any = self.base_unet.config
        if getattr(cfg, "class_embed_type", None) != "projection":
            return 0
        return int(cfg.projection_class_embeddings_input_dim)

    def _unclip_rows(self, unclip: list, batch: int, make) -> torch.Tensor:
        per_job = max(1, batch // len(unclip))
        return torch.cat([make(entries).expand(per_job, -1) for entries in unclip])

    def _unclip_labels(self, unclip: list | None, batch: int, seed: int) -> torch.Tensor:
        from .unclip import NoiseAugmentor, unclip_adm

        dim = self.class_input_dim
        if unclip is None:  # no image: zeros, as ComfyUI feeds an unCLIP model without unCLIP conditioning
            return torch.zeros(batch, dim)
        mean, std = self.unclip_stats if self.unclip_stats is not None else (None, None)
        augmentor = NoiseAugmentor(mean, std)

        def make(entries: list) -> torch.Tensor:
            adm = unclip_adm(entries, augmentor, merge=0.05, seed=seed)
            if adm.shape[1] != dim:
                raise ValueError(f"unCLIPConditioning: the image embeddings give {adm.shape[1]} class inputs, "
                                 f"this unCLIP model takes {dim} (use the CLIP vision model it was trained with)")
            return adm
        return self._unclip_rows(unclip, batch, make)

    def _revision_pooled(self, unclip: list, pooled: torch.Tensor, seed: int) -> torch.Tensor:
        from .unclip import revision_pooled

        rows = self._unclip_rows(unclip, pooled.shape[0], lambda e: revision_pooled(e, pooled.shape[-1], seed))
        return rows.to(pooled)

    def _needs_added_cond(self) -> bool:
        return getattr(self.base_unet.config, "addition_embed_type", None) == "text_time"


def _channels_last(unet: nn.Module) -> bool:
    return bool(getattr(unet, "_sdflow_speed", (None, None, False))[2])

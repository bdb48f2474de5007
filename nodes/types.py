"""The Stable Diffusion socket types: real Python types with ComfyUI's wire names.

Data conventions are ComfyUI's: IMAGE is float32 [B,H,W,C] in 0..1, MASK is [B,H,W] (1 = masked),
LATENT is a dict {"samples": [B,C,H/8,W/8], "noise_mask"?: [B,1,H,W], "batch_index"?: list[int]},
CONDITIONING is a list of [tensor [B,T,D], dict of options].
"""
from __future__ import annotations

from typing import Annotated, Any, TypeAlias

import torch

from engine.inputs import Socket

from .models.clip_vision import ClipVisionHandle, ClipVisionOutput as ClipVisionOutputValue
from .models.diffusion_model import DiffusionModelHandle
from .models.text_encoder import ClipHandle
from .models.vae import VaeHandle
from .sampling.custom import Guider as GuiderValue, NoiseSource, SamplerChoice

Model: TypeAlias = Annotated[DiffusionModelHandle, Socket("MODEL")]
Clip: TypeAlias = Annotated[ClipHandle, Socket("CLIP")]
Vae: TypeAlias = Annotated[VaeHandle, Socket("VAE")]
Conditioning: TypeAlias = Annotated[list, Socket("CONDITIONING")]
Latent: TypeAlias = Annotated[dict, Socket("LATENT")]
Image: TypeAlias = Annotated[torch.Tensor, Socket("IMAGE")]
Mask: TypeAlias = Annotated[torch.Tensor, Socket("MASK")]
ControlNet: TypeAlias = Annotated[Any, Socket("CONTROL_NET")]
ClipVision: TypeAlias = Annotated[ClipVisionHandle, Socket("CLIP_VISION")]
ClipVisionOutput: TypeAlias = Annotated[ClipVisionOutputValue, Socket("CLIP_VISION_OUTPUT")]
UpscaleModel: TypeAlias = Annotated[Any, Socket("UPSCALE_MODEL")]
# custom sampling: SIGMAS is a 1-D float tensor of descending noise levels (usually ending in 0)
Sigmas: TypeAlias = Annotated[torch.Tensor, Socket("SIGMAS")]
Sampler: TypeAlias = Annotated[SamplerChoice, Socket("SAMPLER")]
Guider: TypeAlias = Annotated[GuiderValue, Socket("GUIDER")]
Noise: TypeAlias = Annotated[NoiseSource, Socket("NOISE")]

MAX_RESOLUTION = 16384

"""The Stable Diffusion socket types: real Python types with ComfyUI's wire names.

Data conventions are ComfyUI's: IMAGE is float32 [B,H,W,C] in 0..1, MASK is [B,H,W] (1 = masked),
LATENT is a dict {"samples": [B,C,H/8,W/8], "noise_mask"?: [B,1,H,W], "batch_index"?: list[int]},
CONDITIONING is a list of [tensor [B,T,D], dict of options].
"""
from __future__ import annotations

from typing import Any

import torch

from engine.inputs import socket

from .models.diffusion_model import DiffusionModelHandle
from .models.text_encoder import ClipHandle
from .models.vae import VaeHandle

Model = socket("MODEL", DiffusionModelHandle)
Clip = socket("CLIP", ClipHandle)
Vae = socket("VAE", VaeHandle)
Conditioning = socket("CONDITIONING", list)
Latent = socket("LATENT", dict)
Image = socket("IMAGE", torch.Tensor)
Mask = socket("MASK", torch.Tensor)
ControlNet = socket("CONTROL_NET", Any)
UpscaleModel = socket("UPSCALE_MODEL", Any)

MAX_RESOLUTION = 16384

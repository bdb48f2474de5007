"""T2I-Adapter style models (STYLE_MODEL): a small transformer that turns a CLIP vision tower's last hidden
state into extra text-conditioning tokens (TencentARC's t2iadapter_style: width 1024 from ViT-L, 8 heads,
3 layers, 8 tokens, 768-wide output).

Keys as released: `style_embedding` [1, tokens, width], `ln_pre.*`, `transformer_layes.N.*` (CLIP residual
attention blocks: `attn.in_proj_*`, `attn.out_proj.*`, `ln_1.*`, `mlp.c_fc.*`, `mlp.c_proj.*`, `ln_2.*`),
`ln_post.*`, `proj` [width, context]. Sizes are read from the tensors; the head count (not visible in
weights) is the release's 8.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .memory import ResidentMixin, WeightsHolder, default_device
from .state_dict import ModelFileError, read_state_dict

HEADS = 8


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [L, N, D]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(nn.Module):
    def __init__(self, width: int, context_dim: int, layers: int, tokens: int, heads: int = HEADS) -> None:
        super().__init__()
        self.transformer_layes = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.style_embedding = nn.Parameter(torch.zeros(1, tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, context_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, width] vision hidden states -> [B, tokens, context_dim] conditioning tokens."""
        tokens = self.style_embedding.shape[1]
        style = self.style_embedding.expand(x.shape[0], -1, -1).to(x)
        h = self.ln_pre(torch.cat([x, style], dim=1)).permute(1, 0, 2)
        h = self.transformer_layes(h).permute(1, 0, 2)
        return self.ln_post(h[:, -tokens:, :]) @ self.proj


def style_adapter_from_state_dict(sd: Mapping[str, torch.Tensor], path: str | Path) -> StyleAdapter:
    if "style_embedding" not in sd or "proj" not in sd:
        hint = "a LoRA" if any("lora" in k for k in sd) else "no style_embedding / proj tensors"
        raise ModelFileError(path, f"not a T2I-Adapter style model ({hint})")
    emb, proj = sd["style_embedding"], sd["proj"]
    layers = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"transformer_layes\.(\d+)\.", k))), default=-1)
    model = StyleAdapter(int(emb.shape[-1]), int(proj.shape[1]), layers, int(emb.shape[1]))
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise ModelFileError(path, f"unusable style model tensors: {e}") from None
    return model.eval().requires_grad_(False)


class StyleModelHandle(ResidentMixin):
    def __init__(self, model: StyleAdapter, device: str | None = None) -> None:
        self._weights = WeightsHolder({"style": model})
        self.load_device = device or default_device()

    @property
    def model(self) -> StyleAdapter:
        model = self._weights.modules["style"]
        assert isinstance(model, StyleAdapter)
        return model

    @torch.no_grad()
    def get_cond(self, clip_vision_output) -> torch.Tensor:
        self.ensure_loaded()
        param = next(self.model.parameters())
        hidden = clip_vision_output.last_hidden_state.to(device=param.device, dtype=param.dtype)
        if hidden.shape[-1] != self.model.style_embedding.shape[-1]:
            raise ValueError(f"the CLIP vision output is {hidden.shape[-1]} wide, this style model takes "
                             f"{self.model.style_embedding.shape[-1]} (use the CLIP vision model it was trained with)")
        return self.model(hidden).float().cpu()


def load_style_model(path: str | Path) -> StyleModelHandle:
    return StyleModelHandle(style_adapter_from_state_dict(read_state_dict(path), path))

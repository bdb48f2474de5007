"""GLIGEN text-box grounding: the gated self-attention "fusers" and the box/phrase projection of a GLIGEN
file, run inside an ordinary SD UNet.

The file keeps the original GLIGEN (LDM) names: ``position_net.*`` and, per transformer block,
``{input_blocks|middle_block|output_blocks}.N.1.transformer_blocks.K.fuser.*``. Below the ``fuser.`` and
``position_net.`` prefixes diffusers' ``GatedSelfAttentionDense`` / ``GLIGENTextBoundingboxProjection`` use
the same names, so the weights load as they are. Rather than rebuilding the UNet as a diffusers "gated"
UNet, the modules are attached to its transformer blocks for the length of one call (``attached``):
diffusers' blocks run ``self.fuser`` whenever ``cross_attention_kwargs`` carries "gligen", and the UNet
runs ``self.position_net`` on it first.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state_dict import ModelFileError, read_state_dict

MAX_OBJECTS = 30  # boxes per conditioning entry: the position net's token count (ComfyUI's max_objs)

# input_blocks.N.1.<spatial transformer>, middle_block.1.<...>, output_blocks.N.1.<...>
_FUSER_KEY = re.compile(r"(?:^|\.)(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?\d+\."
                        r"transformer_blocks\.(\d+)\.fuser\.(.+)$")
_GROUP_ORDER = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}


class GligenHandle:
    """A loaded GLIGEN model: one fuser per UNet transformer block (in forward order) + the position net."""

    def __init__(self, fusers: Sequence[nn.Module], position_net: nn.Module, key_dim: int, name: str = ""):
        self.fusers = nn.ModuleList(fusers)
        self.position_net = position_net
        self.key_dim = key_dim  # width of the phrase embeddings (the CLIP's pooled output)
        self.name = name

    def __repr__(self) -> str:
        return f"GligenHandle({self.name!r}, {len(self.fusers)} fusers)"

    def inputs_for(self, boxes: Sequence[tuple[torch.Tensor, int, int, int, int]], batch: int, latent_h: int,
                   latent_w: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """diffusers' gligen kwargs for boxes ``(pooled [1, D], h, w, y, x)`` in latent pixels: corners
        normalised by the latent size, padded with masked-out slots to MAX_OBJECTS."""
        if len(boxes) > MAX_OBJECTS:
            raise ValueError(f"GLIGENTextBoxApply: at most {MAX_OBJECTS} text boxes per conditioning, got "
                             f"{len(boxes)}")
        corners = torch.zeros(MAX_OBJECTS, 4)
        phrases = torch.zeros(MAX_OBJECTS, self.key_dim)
        masks = torch.zeros(MAX_OBJECTS)
        for i, (pooled, h, w, y, x) in enumerate(boxes):
            if x >= latent_w or y >= latent_h:
                raise ValueError(f"GLIGENTextBoxApply: the text box at x={x * 8}, y={y * 8} (size {w * 8}x{h * 8}) "
                                 f"lies outside the {latent_w * 8}x{latent_h * 8} image")
            corners[i] = torch.tensor([x / latent_w, y / latent_h, (x + w) / latent_w, (y + h) / latent_h])
            phrases[i] = pooled.reshape(-1).float()
            masks[i] = 1.0
        return {name: t.unsqueeze(0).expand(batch, *t.shape).to(device=device, dtype=dtype)
                for name, t in (("boxes", corners), ("positive_embeddings", phrases), ("masks", masks))}

    @contextlib.contextmanager
    def attached(self, unet: Any) -> Iterator[None]:
        """Attach the fusers and position net to ``unet`` for one call; the UNet is left as it was after."""
        blocks = transformer_blocks(unet)
        if len(blocks) != len(self.fusers):
            raise ValueError(f"the GLIGEN model {self.name!r} has {len(self.fusers)} fuser blocks, the model has "
                             f"{len(blocks)} transformer blocks (a GLIGEN model for another architecture?)")
        param = next(unet.parameters())
        self.fusers.to(device=param.device, dtype=param.dtype)
        self.position_net.to(device=param.device, dtype=param.dtype)
        fusers: list[Any] = list(self.fusers)
        if any(f.linear.weight.shape[0] != b.attn1.to_q.in_features for b, f in zip(blocks, fusers)):
            raise ValueError(f"the GLIGEN model {self.name!r} does not fit this model's transformer widths")
        try:
            for block, fuser in zip(blocks, fusers):
                fuser.attn.heads = block.attn1.heads  # the file does not say; the block's own head count does
                block.fuser = fuser
            unet.position_net = self.position_net
            yield
        finally:
            for block in blocks:
                block.__dict__.get("_modules", {}).pop("fuser", None)
            unet.__dict__.get("_modules", {}).pop("position_net", None)


def transformer_blocks(unet: Any) -> list[Any]:
    """The UNet's BasicTransformerBlocks in forward order (down, mid, up), as GLIGEN numbers its fusers."""
    from diffusers.models.attention import BasicTransformerBlock

    out: list[Any] = []
    for part in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
        for attn in getattr(part, "attentions", None) or []:
            out.extend(m for m in attn.modules() if isinstance(m, BasicTransformerBlock))
    return out


def gligen_from_state_dict(sd: dict[str, torch.Tensor], path: str | Path = "<memory>") -> GligenHandle:
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    groups: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _FUSER_KEY.search(key)
        if m:
            groups.setdefault((_GROUP_ORDER[m[1]], int(m[2] or 0), int(m[3])), {})[m[4]] = value
    if not groups or "position_net.null_positive_feature" not in sd:
        raise ModelFileError(path, "not a GLIGEN model (no 'position_net.*' and '...transformer_blocks.N.fuser.*' "
                                   "weights)")
    fusers = []
    key_dim = None
    for where in sorted(groups):
        w = groups[where]
        if "linear.weight" not in w:
            raise ModelFileError(path, f"GLIGEN fuser {where} has no linear.weight")
        query_dim, key_dim = w["linear.weight"].shape
        # heads are set per block when attached; 8 is SD1's count, only a placeholder here
        fuser = GatedSelfAttentionDense(query_dim, key_dim, 8, max(1, query_dim // 8))
        try:
            fuser.load_state_dict(w, strict=True)
        except RuntimeError as e:
            raise ModelFileError(path, f"GLIGEN fuser weights do not fit: {str(e).splitlines()[0]}") from None
        fusers.append(fuser.eval().requires_grad_(False))
    pos = {k[len("position_net."):]: v for k, v in sd.items() if k.startswith("position_net.")}
    net = GLIGENTextBoundingboxProjection(pos["null_positive_feature"].shape[0], pos["linears.4.weight"].shape[0])
    try:
        net.load_state_dict(pos, strict=True)
    except RuntimeError as e:
        raise ModelFileError(path, f"GLIGEN position_net weights do not fit: {str(e).splitlines()[0]}") from None
    return GligenHandle(fusers, net.eval().requires_grad_(False), int(pos["null_positive_feature"].shape[0]),
                        Path(path).name)


def load_gligen(path: str | Path) -> GligenHandle:
    return gligen_from_state_dict(read_state_dict(path), path)


def ldm_fuser_prefixes(unet: Any) -> list[str]:
    """The original (LDM) key prefix of each transformer block's fuser, in forward order; for writing files."""
    cfg = unet.config
    per = cfg.layers_per_block if isinstance(cfg.layers_per_block, int) else cfg.layers_per_block[0]
    out = []
    for i, block in enumerate(unet.down_blocks):
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            out += [f"input_blocks.{1 + i * (per + 1) + j}.1.transformer_blocks.{k}.fuser."
                    for k in range(len(attn.transformer_blocks))]
    for attn in getattr(unet.mid_block, "attentions", None) or []:
        out += [f"middle_block.1.transformer_blocks.{k}.fuser." for k in range(len(attn.transformer_blocks))]
    for i, block in enumerate(unet.up_blocks):
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            out += [f"output_blocks.{i * (per + 1) + j}.1.transformer_blocks.{k}.fuser."
                    for k in range(len(attn.transformer_blocks))]
    return out

"""Conditioning nodes: prompt encoding and the ways conditionings are combined or restricted."""
from __future__ import annotations

from typing import Annotated, Any, NamedTuple

import torch
import torch.nn.functional as F

from engine.inputs import Boolean, Combo, Float, Int, Socket, String
from engine.node import node

from .models.gligen import MAX_OBJECTS as MAX_GLIGEN_BOXES
from .models.prompt_weights import check_nesting
from .types import MAX_RESOLUTION, Clip, ClipVision, ClipVisionOutput, Conditioning, Image, Latent, Mask, Vae


def _check_text(text) -> bool | str:
    """Up front: the text is a string (numbers are taken as text) that the weight parser can read."""
    if text is None:
        return True                  # linked: known only at run time
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        return f"text must be a string, not {type(text).__name__}"
    return check_nesting(str(text)) or True


@node("CLIPTextEncode", category="conditioning", display_name="CLIP Text Encode (Prompt)", validate=_check_text)
def clip_text_encode(text: Annotated[str, String(multiline=True, dynamic_prompts=True,
                                                  tooltip="The text to be encoded.")],
                     clip: Clip) -> Conditioning:
    """Encodes a text prompt with a CLIP model into a conditioning that guides the diffusion model.
    Supports (text:1.2) weights, (text) emphasis, escaped \\( \\) and embedding:name."""
    if clip is None:
        raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                           "your checkpoint does not contain a valid clip or text encoder model.")
    return clip.encode_text(text if isinstance(text, str) else str(text))


@node("CLIPSetLastLayer", category="conditioning")
def clip_set_last_layer(clip: Clip, stop_at_clip_layer: Annotated[int, Int(-1, min=-24, max=-1, step=1)]) -> Clip:
    """Uses the output of an earlier CLIP layer ("clip skip"): -1 is the last layer, -2 the one before."""
    clip = clip.clone()
    clip.set_last_layer(stop_at_clip_layer)
    return clip


@node("ConditioningCombine", category="conditioning", display_name="Conditioning (Combine)")
def conditioning_combine(conditioning_1: Conditioning, conditioning_2: Conditioning) -> Conditioning:
    """Both conditionings guide the sampler; each is predicted separately and the results averaged."""
    return conditioning_1 + conditioning_2


def _with(conditioning: list, **options) -> list:
    return [[cond, {**opts, **options}] for cond, opts in conditioning]


@node("ConditioningSetArea", category="conditioning", display_name="Conditioning (Set Area)")
def conditioning_set_area(conditioning: Conditioning,
                          width: Annotated[int, Int(64, min=64, max=MAX_RESOLUTION, step=8)],
                          height: Annotated[int, Int(64, min=64, max=MAX_RESOLUTION, step=8)],
                          x: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                          y: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                          strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.01)]) -> Conditioning:
    """Restricts a conditioning to a rectangle of the image (pixel units; applied in latent units)."""
    return _with(conditioning, area=(height // 8, width // 8, y // 8, x // 8), strength=strength,
                 set_area_to_bounds=False)


@node("ConditioningSetAreaPercentage", category="conditioning")
def conditioning_set_area_percentage(conditioning: Conditioning,
                                     width: Annotated[float, Float(1.0, min=0, max=1.0, step=0.01)],
                                     height: Annotated[float, Float(1.0, min=0, max=1.0, step=0.01)],
                                     x: Annotated[float, Float(0, min=0, max=1.0, step=0.01)],
                                     y: Annotated[float, Float(0, min=0, max=1.0, step=0.01)],
                                     strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.01)],
                                     ) -> Conditioning:
    """Restricts a conditioning to a rectangle given as fractions of the image size."""
    return _with(conditioning, area=("percentage", height, width, y, x), strength=strength,
                 set_area_to_bounds=False)


@node("ConditioningSetAreaStrength", category="conditioning")
def conditioning_set_area_strength(conditioning: Conditioning,
                                   strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.01)],
                                   ) -> Conditioning:
    return _with(conditioning, strength=strength)


@node("ConditioningZeroOut", category="advanced/conditioning")
def conditioning_zero_out(conditioning: Conditioning) -> Conditioning:
    """Replaces the prompt embedding (and pooled output) with zeros."""
    out = []
    for cond, opts in conditioning:
        opts = dict(opts)
        if opts.get("pooled_output") is not None:
            opts["pooled_output"] = opts["pooled_output"].new_zeros(opts["pooled_output"].shape)
        out.append([cond.new_zeros(cond.shape), opts])
    return out


@node("ConditioningSetTimestepRange", category="advanced/conditioning")
def conditioning_set_timestep_range(conditioning: Conditioning,
                                    start: Annotated[float, Float(0.0, min=0.0, max=1.0, step=0.001)],
                                    end: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.001)]) -> Conditioning:
    """Applies a conditioning only between two fractions of the sampling schedule."""
    return _with(conditioning, start_percent=start, end_percent=end)


@node("CLIPTextEncodeSDXLRefiner", category="advanced/conditioning")
def clip_text_encode_sdxl_refiner(ascore: Annotated[float, Float(6.0, min=0.0, max=1000.0, step=0.01)],
                                  width: Annotated[int, Int(1024, min=0, max=MAX_RESOLUTION)],
                                  height: Annotated[int, Int(1024, min=0, max=MAX_RESOLUTION)],
                                  text: Annotated[str, String(multiline=True, dynamic_prompts=True)],
                                  clip: Clip) -> Conditioning:
    """Encodes a prompt for the SDXL refiner, with the aesthetic score and original size it conditions on."""
    if clip is None:
        raise RuntimeError("clip input is invalid: None")
    return _with(clip.encode_text(text), aesthetic_score=ascore, width=width, height=height)


@node("CLIPTextEncodeSDXL", category="advanced/conditioning")
def clip_text_encode_sdxl(width: Annotated[int, Int(1024, min=0, max=MAX_RESOLUTION)],
                          height: Annotated[int, Int(1024, min=0, max=MAX_RESOLUTION)],
                          crop_w: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION)],
                          crop_h: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION)],
                          target_width: Annotated[int, Int(1024, min=0, max=MAX_RESOLUTION)],
                          target_height: Annotated[int, Int(1024, min=0, max=MAX_RESOLUTION)],
                          text_g: Annotated[str, String(multiline=True, dynamic_prompts=True)],
                          clip: Clip,
                          text_l: Annotated[str, String(multiline=True, dynamic_prompts=True)]) -> Conditioning:
    """Encodes separate prompts for SDXL's two text encoders (text_g: OpenCLIP-G, text_l: CLIP-L), with
    the size and crop numbers SDXL conditions on."""
    if clip is None:
        raise RuntimeError("clip input is invalid: None")
    keys = {spec.key for spec in clip.specs}
    if "g" not in keys:
        raise ValueError(f"clip: CLIPTextEncodeSDXL needs an SDXL text encoder (OpenCLIP-G); this CLIP is {clip.arch}")
    tokens = clip.tokenize(text_g)
    if "l" in keys:
        tokens.chunks["l"] = clip.tokenize(text_l).chunks["l"]
        empty = clip.tokenize("").chunks
        # both encoders must give the same number of 77-token chunks: pad the shorter with empty prompts
        for short, other in (("l", "g"), ("g", "l")):
            while len(tokens.chunks[short]) < len(tokens.chunks[other]):
                tokens.chunks[short] = tokens.chunks[short] + empty[short]
        tokens.text = f"{text_g}\n{text_l}"
    cond, pooled = clip.encode(tokens)
    return [[cond, {"pooled_output": pooled, "width": width, "height": height, "crop_w": crop_w,
                    "crop_h": crop_h, "target_width": target_width, "target_height": target_height}]]


class InpaintModelOutputs(NamedTuple):
    positive: Conditioning
    negative: Conditioning
    latent: Latent


@node("InpaintModelConditioning", category="conditioning/inpaint")
def inpaint_model_conditioning(
        positive: Conditioning, negative: Conditioning, vae: Vae, pixels: Image, mask: Mask,
        noise_mask: Annotated[bool, Boolean(True, tooltip=(
            "Add a noise mask to the latent so sampling will only happen within the mask. Might improve "
            "results or completely break things depending on the model."))]) -> InpaintModelOutputs:
    """Prepares an image and mask for an inpainting model: the masked image's latent and the mask go
    into both conditionings (the model's extra input channels); the latent is the whole image's."""
    if mask.ndim < 2 or mask.numel() == 0:
        raise ValueError(f"mask: expected a [B,H,W] mask, got shape {tuple(mask.shape)}")
    ratio = vae.downscale_ratio
    h, w = (pixels.shape[1] // ratio) * ratio, (pixels.shape[2] // ratio) * ratio
    if h == 0 or w == 0:
        raise ValueError(f"pixels: the image ({pixels.shape[2]}x{pixels.shape[1]}) is smaller than the "
                         f"VAE's {ratio}-pixel stride")
    mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(),
                         size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    masked = pixels[..., :3].clone()
    if pixels.shape[1] != h or pixels.shape[2] != w:
        y0, x0 = (pixels.shape[1] % ratio) // 2, (pixels.shape[2] % ratio) // 2
        masked = masked[:, y0:y0 + h, x0:x0 + w, :]
        mask = mask[:, :, y0:y0 + h, x0:x0 + w]
    keep = (1.0 - mask.round()).squeeze(1).unsqueeze(-1).to(masked.dtype)
    if keep.shape[0] != masked.shape[0] and 1 not in (keep.shape[0], masked.shape[0]):
        raise ValueError(f"mask: batch of {keep.shape[0]} does not match the image batch of {masked.shape[0]}")
    masked = (masked - 0.5) * keep + 0.5          # masked pixels become neutral grey
    concat_latent = vae.encode(masked)            # raw; sampling takes it into model space
    latent: dict = {"samples": vae.encode(pixels)}
    if noise_mask:
        latent["noise_mask"] = mask
    extra = {"concat_latent_image": concat_latent, "concat_mask": mask}
    return InpaintModelOutputs(_with(positive, **extra), _with(negative, **extra), latent)


# ---- masks, averages and concatenation (ComfyUI core) --------------------------------------------
# (imports kept with the section: the top of this module is edited by others too)




def _cond_need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@node("ConditioningSetMask", category="conditioning", display_name="Conditioning (Set Mask)")
def conditioning_set_mask(conditioning: Conditioning, mask: Mask,
                          strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.01)],
                          set_cond_area: Annotated[str, Combo(["default", "mask bounds"])]) -> Conditioning:
    """Restricts a conditioning to a mask (resized to the latent when sampling); "mask bounds" predicts
    only on the mask's bounding box, at full resolution there."""
    _cond_need(isinstance(mask, torch.Tensor) and mask.dim() in (2, 3, 4), "mask: not a MASK tensor")
    m = mask.reshape((-1,) + tuple(mask.shape[-2:]))
    return _with(conditioning, mask=m, set_area_to_bounds=set_cond_area != "default", mask_strength=strength)


def _tokens_to(t: torch.Tensor, length: int) -> torch.Tensor:
    if t.shape[1] >= length:
        return t[:, :length]
    pad = t.new_zeros((t.shape[0], length - t.shape[1], t.shape[2]))
    return torch.cat([t, pad], dim=1)


@node("ConditioningAverage", category="conditioning")
def conditioning_average(conditioning_to: Conditioning, conditioning_from: Conditioning,
                         conditioning_to_strength: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.01)],
                         ) -> Conditioning:
    """Each entry of conditioning_to mixed with the first entry of conditioning_from (tokens padded or cut
    to conditioning_to's length); the pooled outputs are mixed the same way."""
    _cond_need(len(conditioning_from) > 0, "conditioning_from: empty conditioning")
    if len(conditioning_from) > 1:
        import logging
        logging.getLogger(__name__).warning("ConditioningAverage: conditioning_from has %d entries; only the first "
                                            "is used", len(conditioning_from))
    src, src_opts = conditioning_from[0]
    src_pooled = src_opts.get("pooled_output")
    out = []
    for cond, opts in conditioning_to:
        _cond_need(cond.shape[-1] == src.shape[-1],
                   f"conditioning_from: embedding width {src.shape[-1]} differs from "
                   f"conditioning_to's {cond.shape[-1]} (different text encoders)")
        w = conditioning_to_strength
        mixed = cond * w + _tokens_to(src, cond.shape[1]).to(cond) * (1.0 - w)
        new_opts = dict(opts)
        pooled = opts.get("pooled_output")
        if pooled is not None and src_pooled is not None and pooled.shape == src_pooled.shape:
            new_opts["pooled_output"] = pooled * w + src_pooled.to(pooled) * (1.0 - w)
        elif pooled is None and src_pooled is not None:
            new_opts["pooled_output"] = src_pooled
        out.append([mixed, new_opts])
    return out


@node("ConditioningConcat", category="conditioning")
def conditioning_concat(conditioning_to: Conditioning, conditioning_from: Conditioning) -> Conditioning:
    """Appends the tokens of conditioning_from's first entry to every entry of conditioning_to."""
    _cond_need(len(conditioning_from) > 0, "conditioning_from: empty conditioning")
    src = conditioning_from[0][0]
    out = []
    for cond, opts in conditioning_to:
        _cond_need(cond.shape[-1] == src.shape[-1],
                   f"conditioning_from: embedding width {src.shape[-1]} differs from "
                   f"conditioning_to's {cond.shape[-1]}")
        out.append([torch.cat([cond, _batch_like(src, cond).to(cond)], dim=1), dict(opts)])
    return out


def _batch_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.shape[0] == like.shape[0] or t.shape[0] != 1:
        return t
    return t.expand(like.shape[0], -1, -1)


# ---- CLIP vision: image prompts ---------------------------------------------------------------------

@node("CLIPVisionEncode", category="conditioning")
def clip_vision_encode(clip_vision: ClipVision, image: Image,
                       crop: Annotated[str, Combo(["center", "none"])]) -> ClipVisionOutput:
    """Encodes an image with a CLIP vision model: resized so its shortest side fits the model and
    center-cropped ("center") or squashed to a square ("none")."""
    if crop not in ("center", "none"):
        raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"image must be an IMAGE batch [B,H,W,3], got shape {tuple(image.shape)}")
    return clip_vision.encode_image(image, crop=crop == "center")


@node("unCLIPConditioning", category="conditioning")
def unclip_conditioning(conditioning: Conditioning, clip_vision_output: ClipVisionOutput,
                        strength: Annotated[float, Float(1.0, min=-10.0, max=10.0, step=0.01)],
                        noise_augmentation: Annotated[float, Float(0.0, min=0.0, max=1.0, step=0.01)],
                        ) -> Conditioning:
    """Adds an image's CLIP embedding to a conditioning, for unCLIP models (SD2.1 unCLIP) and SDXL
    ("revision", with the ViT-bigG vision model); noise_augmentation blurs how closely it is followed."""
    if strength == 0:
        return conditioning
    entry = {"clip_vision_output": clip_vision_output, "strength": strength,
             "noise_augmentation": noise_augmentation}
    return [[cond, {**opts, "unclip_conditioning": [*opts.get("unclip_conditioning", []), entry]}]
            for cond, opts in conditioning]


@node("StyleModelApply", category="conditioning/style_model")
def style_model_apply(conditioning: Conditioning, style_model: Annotated[Any, Socket("STYLE_MODEL")],
                      clip_vision_output: ClipVisionOutput,
                      strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.001)],
                      strength_type: Annotated[str, Combo(["multiply", "attn_bias"])]) -> Conditioning:
    """Appends a style model's tokens (from an image's CLIP vision encoding) to every conditioning entry."""
    if strength_type not in ("multiply", "attn_bias"):
        raise ValueError(f"strength_type must be 'multiply' or 'attn_bias', got {strength_type!r}")
    if strength_type == "attn_bias" and strength != 1.0:
        raise NotImplementedError("StyleModelApply: strength_type 'attn_bias' with a strength other than 1 is not "
                                  "supported by sdflow yet (use 'multiply')")
    tokens = style_model.get_cond(clip_vision_output)
    tokens = tokens.flatten(0, 1).unsqueeze(0)
    if strength_type == "multiply":
        tokens = tokens * strength
    out = []
    for cond, opts in conditioning:
        if cond.shape[-1] != tokens.shape[-1]:
            raise ValueError(f"StyleModelApply: the style model makes {tokens.shape[-1]}-wide tokens, the "
                             f"conditioning is {cond.shape[-1]} wide (an SD1.x style model needs an SD1.x CLIP)")
        out.append([torch.cat([cond, tokens.to(cond).expand(cond.shape[0], -1, -1)], dim=1), dict(opts)])
    return out


@node("GLIGENTextBoxApply", category="conditioning/gligen")
def gligen_text_box_apply(conditioning_to: Conditioning, clip: Clip,
                          gligen_textbox_model: Annotated[Any, Socket("GLIGEN")],
                          text: Annotated[str, String(multiline=True, dynamic_prompts=True)],
                          width: Annotated[int, Int(64, min=8, max=MAX_RESOLUTION, step=8)],
                          height: Annotated[int, Int(64, min=8, max=MAX_RESOLUTION, step=8)],
                          x: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)],
                          y: Annotated[int, Int(0, min=0, max=MAX_RESOLUTION, step=8)]) -> Conditioning:
    """Places `text` in a box (image pixels) for GLIGEN: the box's phrase is the text's pooled CLIP output,
    added to the boxes already on each conditioning entry."""
    _, pooled = clip.encode(clip.tokenize(text))
    if pooled is None:
        raise ValueError("GLIGENTextBoxApply input clip: this CLIP gives no pooled output for the box text")
    if pooled.shape[-1] != gligen_textbox_model.key_dim:
        raise ValueError(f"GLIGENTextBoxApply input gligen_textbox_model: it takes {gligen_textbox_model.key_dim}-wide "
                         f"phrase embeddings, the CLIP gives {pooled.shape[-1]} (a GLIGEN model for another CLIP?)")
    box = (pooled[0:1], height // 8, width // 8, y // 8, x // 8)  # latent pixels
    out = []
    for cond, opts in conditioning_to:
        prev = list(opts["gligen"][2]) if opts.get("gligen") else []
        if len(prev) >= MAX_GLIGEN_BOXES:
            raise ValueError(f"GLIGENTextBoxApply: at most {MAX_GLIGEN_BOXES} text boxes per conditioning")
        out.append([cond, {**opts, "gligen": ("position", gligen_textbox_model, prev + [box])}])
    return out

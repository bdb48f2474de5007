"""Conditioning nodes: prompt encoding and the ways conditionings are combined or restricted."""
from __future__ import annotations

from typing import Annotated

from engine.inputs import Float, Int, String
from engine.node import node

from .models.prompt_weights import check_nesting
from .types import MAX_RESOLUTION, Clip, Conditioning


def _check_text(text) -> bool | str:
    """Up front: the text is a string (numbers are taken as text) that the weight parser can read."""
    if text is None:
        return True                  # linked: known only at run time
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        return f"text must be a string, not {type(text).__name__}"
    return check_nesting(str(text)) or True


@node("CLIPTextEncode", category="conditioning", display_name="CLIP Text Encode (Prompt)", validate=_check_text)
def clip_text_encode(text: Annotated[str, String(multiline=True, dynamic_prompts=True, tooltip="The text to be encoded.")],
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
                                     strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.01)]) -> Conditioning:
    """Restricts a conditioning to a rectangle given as fractions of the image size."""
    return _with(conditioning, area=("percentage", height, width, y, x), strength=strength,
                 set_area_to_bounds=False)


@node("ConditioningSetAreaStrength", category="conditioning")
def conditioning_set_area_strength(conditioning: Conditioning,
                                   strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.01)]) -> Conditioning:
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

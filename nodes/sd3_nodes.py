"""Stable Diffusion 3 / 3.5 nodes: text-encoder loaders, the 16-channel empty latent, SD3 prompt
encoding and the flow shift. Names, inputs, defaults and ranges are ComfyUI's.

CheckpointLoaderSimple hands SD3 files here (`load_sd3_handles`); a checkpoint without text encoders
gives a CLIP output that refuses use with a message pointing at TripleCLIPLoader, so the templates that
load the encoders separately (and leave that output unconnected) run.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, cast

import torch

from engine.inputs import Combo, Float, Int, String
from engine.node import node

from .models.memory import default_device
from .models.sd3 import ENCODER_NAMES, load_sd3_checkpoint, load_text_encoder_file
from .models.sd3_handles import SD3ClipHandle, SD3ModelHandle, SkipLayerGuidance, t5_chunk, t5_tokenizer_for
from .models.tokenizer import load_tokenizer
from .models.vae import VaeHandle
from .runtime import model_file_exists, model_file_fingerprint, model_files, runtime
from .types import Clip, Conditioning, Latent, Model

MAX_RESOLUTION = 16384
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image"]
DUAL_CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]


def _encoders_exist(*params: str):
    """Every named text-encoder input must name a present file."""
    checks = {p: model_file_exists("text_encoders", p, "text encoder") for p in params}

    def validate(**values) -> bool | str:
        for p, check in checks.items():
            result = check(**{p: values[p]})
            if result is not True:
                return result
        return True
    validate.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY) for p in params])
    return validate


class MissingTextEncoders:
    """The CLIP output of an SD3 checkpoint that ships without text encoders."""

    def __init__(self, source: str) -> None:
        self._source = source

    arch = "sd3"

    def _refuse(self, *_args: Any, **_kwargs: Any) -> Any:
        raise ValueError(f"{self._source} has no text encoders: load clip_l, clip_g and t5xxl with TripleCLIPLoader "
                         "and use its CLIP output")

    tokenize = encode = encode_text = encode_from_tokens = clone = set_last_layer = with_text_encoders = _refuse

    @property
    def text_encoders(self) -> dict:
        return self._refuse()

    def __repr__(self) -> str:
        return f"<no text encoders in {self._source}>"


def load_sd3_handles(path: Path, name: str, dtypes: dict, embedding_dirs) -> tuple[Any, Any, Any]:
    ck = load_sd3_checkpoint(path, **dtypes)
    clip: Any = MissingTextEncoders(name)
    if ck.text_encoders:   # any of CLIP-L, CLIP-G and T5 inside: the missing ones give zeros, as in ComfyUI
        clip = _clip_handle(ck.text_encoders, embedding_dirs)
    assert ck.transformer is not None and ck.vae is not None
    return SD3ModelHandle(ck.transformer, ck.variant), clip, VaeHandle(ck.vae)


def _clip_handle(encoders: dict, embedding_dirs) -> SD3ClipHandle:
    tokenizers = {"l": load_tokenizer("l"), "g": load_tokenizer("g")}
    if "t5" in encoders:
        tokenizers["t5"] = t5_tokenizer_for(encoders["t5"])
    return SD3ClipHandle(encoders, tokenizers, embedding_dirs=embedding_dirs)


def _encoders_clip(node_name: str, names: list[str], clip_type: str = "sd3") -> Any:
    if clip_type != "sd3":
        raise NotImplementedError(f"{node_name}: type {clip_type!r} text encoders are not supported by sdflow yet")
    rt = runtime()
    from .loaders import _dtypes

    encoders: dict[str, Any] = {}
    files: dict[str, str] = {}
    for name in names:
        kind, model = load_text_encoder_file(rt.folders.require("text_encoders", name), dtype=_dtypes()["dtype"])
        if kind in encoders:
            raise ValueError(f"{node_name}: two {ENCODER_NAMES[kind]} files given ({name!r})")
        encoders[kind], files[kind] = model, name
    # Any set runs (clip_l + t5, clip_g + t5, t5 alone, ...): ComfyUI's SD3 encoder puts zeros where an
    # encoder is missing.
    t5 = encoders.get("t5")
    if t5 is not None:
        # The prompt embedding is padded to the T5 width; every released SD3 transformer takes T5-XXL's 4096.
        width = int(getattr(t5.config, "d_model", 0))
        expected = _expected_t5_width(encoders)
        if expected is not None and width != expected:
            raise ValueError(f"{node_name}: {files['t5']!r} is a T5 encoder of width {width}; SD3 expects T5-XXL "
                             f"(width {expected}: t5xxl_fp16 or t5xxl_fp8_e4m3fn)")
    return _clip_handle(encoders, rt.folders.paths("embeddings"))


def _expected_t5_width(encoders: dict[str, Any]) -> int | None:
    """The T5 width an SD3 transformer takes beside these CLIPs: T5-XXL's 4096 beside the real CLIP-L (768)
    or OpenCLIP-G (1280), the tiny test T5's beside the tiny test CLIPs; None (unchecked) otherwise."""
    from .models import tiny_sd3
    from .models.sd3 import T5_WIDTH

    known = {"l": {768: T5_WIDTH, tiny_sd3.CLIP_WIDTH["l"]: tiny_sd3.T5_WIDTH},
             "g": {1280: T5_WIDTH, tiny_sd3.CLIP_WIDTH["g"]: tiny_sd3.T5_WIDTH}}
    for key in ("g", "l"):
        if key in encoders:
            return known[key].get(int(encoders[key].config.hidden_size))
    return None


@node("TripleCLIPLoader", category="advanced/loaders", display_name="TripleCLIPLoader",
      validate=_encoders_exist("clip_name1", "clip_name2", "clip_name3"))
def triple_clip_loader(clip_name1: Annotated[str, Combo(model_files("text_encoders"))],
                       clip_name2: Annotated[str, Combo(model_files("text_encoders"))],
                       clip_name3: Annotated[str, Combo(model_files("text_encoders"))]) -> Clip:
    """[Recipes]

    sd3: clip-l, clip-g, t5"""
    return _encoders_clip("TripleCLIPLoader", [clip_name1, clip_name2, clip_name3])


@node("DualCLIPLoader", category="advanced/loaders", display_name="DualCLIPLoader",
      validate=_encoders_exist("clip_name1", "clip_name2"),
      fingerprint=model_file_fingerprint("text_encoders", "clip_name1"))
def dual_clip_loader(clip_name1: Annotated[str, Combo(model_files("text_encoders"))],
                     clip_name2: Annotated[str, Combo(model_files("text_encoders"))],
                     type: Annotated[str, Combo(DUAL_CLIP_TYPES)],
                     device: Annotated[str, Combo(["default", "cpu"], advanced=True)] | None = None) -> Clip:
    """[Recipes]

    sdxl: clip-l, clip-g
    sd3: clip-l, clip-g / clip-l, t5 / clip-g, t5"""
    if type == "sdxl":
        from . import loaders
        return loaders.dual_clip_loader(clip_name1, clip_name2, type, device)
    return _encoders_clip("DualCLIPLoader", [clip_name1, clip_name2], type)


@node("CLIPLoader", category="advanced/loaders", display_name="Load CLIP",
      validate=model_file_exists("text_encoders", "clip_name", "text encoder"),
      fingerprint=model_file_fingerprint("text_encoders", "clip_name"))
def clip_loader(clip_name: Annotated[str, Combo(model_files("text_encoders"))],
                type: Annotated[str, Combo(CLIP_TYPES)],
                device: Annotated[str, Combo(["default", "cpu"], advanced=True)] | None = None) -> Clip:
    """[Recipes]

    stable_diffusion: clip-l (SD1) / OpenCLIP-H (SD2)
    sd3: t5 xxl/ clip-g / clip-l"""
    if type == "stable_diffusion":
        from . import loaders
        return loaders.clip_loader(clip_name, type, device)
    return _encoders_clip("CLIPLoader", [clip_name], type)


@node("EmptySD3LatentImage", category="latent/sd3")
def empty_sd3_latent_image(width: Annotated[int, Int(1024, min=16, max=MAX_RESOLUTION, step=16)],
                           height: Annotated[int, Int(1024, min=16, max=MAX_RESOLUTION, step=16)],
                           batch_size: Annotated[int, Int(1, min=1, max=4096)]) -> Latent:
    """An empty 16-channel latent (1/8 of the image size) for SD3 models."""
    return {"samples": torch.zeros([batch_size, 16, height // 8, width // 8], device=default_device())}


@node("CLIPTextEncodeSD3", category="advanced/conditioning")
def clip_text_encode_sd3(clip: Clip,
                         clip_l: Annotated[str, String(multiline=True, dynamic_prompts=True)],
                         clip_g: Annotated[str, String(multiline=True, dynamic_prompts=True)],
                         t5xxl: Annotated[str, String(multiline=True, dynamic_prompts=True)],
                         empty_padding: Annotated[str, Combo(["none", "empty_prompt"])]) -> Conditioning:
    """Encodes separate prompts for CLIP-L, CLIP-G and T5-XXL. empty_padding "none" is ComfyUI's: with
    clip_l and clip_g both empty the context has no CLIP tokens and the pooled vector is zeros (one of them
    empty is still padded with the empty prompt, to match the other's tokens); an empty t5xxl gives T5's
    encoding of its end token alone (one token), or no T5 tokens without a T5 encoder."""
    if not isinstance(clip, SD3ClipHandle):
        raise ValueError("CLIPTextEncodeSD3: input 'clip' must come from an SD3 checkpoint or TripleCLIPLoader")
    no_padding = empty_padding == "none"
    tokens = clip.tokenize(clip_g)
    if "l" in clip.clip_keys:   # a partial encoder set may have no CLIP-L
        tokens.chunks["l"] = clip.tokenize(clip_l).chunks["l"]
    t5_tokens = clip.tokenize(t5xxl)
    with_clip = not (no_padding and not clip_l and not clip_g)
    if no_padding and not t5xxl and clip.has_t5:
        t5_tokens.chunks["t5"] = [t5_chunk([clip.t5_eos()])]
    cond, pooled = clip.encode(tokens, t5_tokens=t5_tokens, with_clip=with_clip)
    return [[cond, {"pooled_output": pooled}]]


@node("ModelSamplingSD3", category="advanced/model")
def model_sampling_sd3(model: Model, shift: Annotated[float, Float(3.0, min=0.0, max=100.0, step=0.01)]) -> Model:
    """Samples the model as a rectified-flow model with this time shift (SD3's default: 3.0)."""
    from .sampling.model_sampling import FlowSchedule

    return model.with_model_sampling(FlowSchedule(shift=shift))


@node("SkipLayerGuidanceSD3", category="advanced/guidance")
def skip_layer_guidance_sd3(model: Model,
                            layers: Annotated[str, String("7, 8, 9", multiline=False)],
                            scale: Annotated[float, Float(3.0, min=0.0, max=10.0, step=0.1)],
                            start_percent: Annotated[float, Float(0.01, min=0.0, max=1.0, step=0.001)],
                            end_percent: Annotated[float, Float(0.15, min=0.0, max=1.0, step=0.001)]) -> Model:
    """Generic version of SkipLayerGuidance node that can be used on every DiT model (sdflow: SD3 / SD3.5)."""
    if not isinstance(model, SD3ModelHandle):
        raise ValueError("SkipLayerGuidanceSD3: input 'model' must be an SD3 / SD3.5 model")
    try:
        idx = [int(p) for p in layers.replace(" ", "").split(",") if p]
    except ValueError:
        raise ValueError(f"SkipLayerGuidanceSD3: input 'layers' must be comma-separated block numbers, got {layers!r}"
                         ) from None
    # Numbers past the model's last block skip nothing (as in ComfyUI, where they patch no block).
    schedule = model.sampling_schedule()
    slg = SkipLayerGuidance(idx, scale, schedule.percent_to_sigma(start_percent),
                            schedule.percent_to_sigma(end_percent))
    twin = cast(SD3ModelHandle, model.with_patches(cfg_function=slg.cfg_function))
    twin.skip_layer_guidance = slg
    return twin

"""Model merging and saving nodes (ComfyUI's comfy_extras model-merging set).

Merges are recorded, not computed (see nodes/models/merge.py): the merged UNet is built once when the
model is used. Saving writes one safetensors file in the original single-file (LDM) layout, with the
prompt and the workflow in its metadata as ComfyUI writes them, under the output folder (the
filename_prefix may name a subfolder; it cannot leave the output folder).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, cast

import torch

from engine.inputs import Float, Hidden, String, spec_from_annotation
from engine.node import InputDecl, node
from engine.paths import contained_path
from engine.png_metadata import png_text_chunks

from .models.diffusion_model import DiffusionModelHandle
from .models.merge import MergePatch
from .runtime import runtime
from .types import Clip, Model, Vae

_RATIO = Float(1.0, min=0.0, max=1.0, step=0.01)
MODELSPEC_ARCH = {"sdxl": "stable-diffusion-xl-v1-base", "sdxl_refiner": "stable-diffusion-xl-v1-refiner"}


def _same_arch(model1: DiffusionModelHandle, model2: DiffusionModelHandle, node_name: str) -> None:
    if model1.arch != model2.arch:
        raise ValueError(f"{node_name}: model2 is an {model2.arch} model, model1 an {model1.arch} model; "
                         "only models of one architecture can be merged")


@node("ModelMergeSimple", category="advanced/model_merging")
def model_merge_simple(model1: Model, model2: Model, ratio: Annotated[float, _RATIO]) -> Model:
    """ratio * model1 + (1 - ratio) * model2, weight by weight."""
    _same_arch(model1, model2, "ModelMergeSimple")
    return model1.with_merge(MergePatch(model2, "simple", float(ratio)))


@node("ModelMergeBlocks", category="advanced/model_merging")
def model_merge_blocks(model1: Model, model2: Model, input: Annotated[float, _RATIO],
                       middle: Annotated[float, _RATIO], out: Annotated[float, _RATIO]) -> Model:
    """Like ModelMergeSimple with one ratio for the input blocks, one for the middle block and one for the
    output blocks (the first for everything else)."""
    _same_arch(model1, model2, "ModelMergeBlocks")
    blocks = (("input", float(input)), ("middle", float(middle)), ("out", float(out)))
    return model1.with_merge(MergePatch(model2, "blocks", blocks=blocks))


@node("ModelMergeSubtract", category="advanced/model_merging")
def model_merge_subtract(model1: Model, model2: Model,
                         multiplier: Annotated[float, Float(1.0, min=-10.0, max=10.0, step=0.01)]) -> Model:
    """multiplier * (model1 - model2): the difference, e.g. what a fine-tune added to its base."""
    _same_arch(model1, model2, "ModelMergeSubtract")
    return model1.with_merge(MergePatch(model2, "subtract", float(multiplier)))


@node("ModelMergeAdd", category="advanced/model_merging")
def model_merge_add(model1: Model, model2: Model) -> Model:
    """model1 + model2 (add a difference made by ModelMergeSubtract back to another model)."""
    _same_arch(model1, model2, "ModelMergeAdd")
    return model1.with_merge(MergePatch(model2, "add"))


def _block_names(levels: int) -> list[str]:
    return (["time_embed.", "label_emb."] if levels == 9 else ["time_embed."]) + \
        [f"input_blocks.{i}." for i in range(levels)] + [f"middle_block.{i}." for i in range(3)] + \
        [f"output_blocks.{i}." for i in range(levels)] + ["out."]


def _merge_by_names(node_name: str, model1: DiffusionModelHandle, model2: DiffusionModelHandle,
                    ratios: dict[str, Any]) -> DiffusionModelHandle:
    _same_arch(model1, model2, node_name)
    blocks = tuple((name, float(value)) for name, value in ratios.items())
    return model1.with_merge(MergePatch(model2, "blocks", blocks=blocks))


def _declare_blocks(fn: Any, names: list[str]) -> None:
    # These inputs are named after LDM key prefixes ("input_blocks.4."), which are not Python names.
    spec = spec_from_annotation(Annotated[float, _RATIO])
    inputs = fn.__sdflow_node__.inputs
    for name in names:
        inputs[name] = InputDecl(name, spec, "required")


@node("ModelMergeSD1", category="advanced/model_merging/model_specific")
def model_merge_sd1(model1: Model, model2: Model, **ratios: Any) -> Model:
    """A ratio per SD1 UNet block (time embedding, 12 input, 3 middle, 12 output blocks, final layers)."""
    return _merge_by_names("ModelMergeSD1", model1, model2, ratios)


@node("ModelMergeSD2", category="advanced/model_merging/model_specific")
def model_merge_sd2(model1: Model, model2: Model, **ratios: Any) -> Model:
    """A ratio per SD2 UNet block (the same blocks as SD1)."""
    return _merge_by_names("ModelMergeSD2", model1, model2, ratios)


@node("ModelMergeSDXL", category="advanced/model_merging/model_specific")
def model_merge_sdxl(model1: Model, model2: Model, **ratios: Any) -> Model:
    """A ratio per SDXL UNet block (time and label embeddings, 9 input, 3 middle, 9 output blocks, final layers)."""
    return _merge_by_names("ModelMergeSDXL", model1, model2, ratios)


_declare_blocks(model_merge_sd1, _block_names(12))
_declare_blocks(model_merge_sd2, _block_names(12))
_declare_blocks(model_merge_sdxl, _block_names(9))


# ---- saving ------------------------------------------------------------------------------------------

def _output_file(prefix: str, node_name: str, suffix: str = ".safetensors") -> tuple[Path, str]:
    """`<output>/<folder>/<stem>_<counter:05>_<suffix>` (the counter continues after the highest one)."""
    folder_part, _, stem = str(prefix).replace("\\", "/").rpartition("/")
    if not stem:
        raise ValueError(f"{node_name}: filename_prefix {prefix!r} has no file name part")
    base = runtime().output_dir
    try:
        folder = contained_path(base, folder_part) if folder_part else contained_path(base)
    except ValueError as e:
        raise ValueError(f"{node_name}: filename_prefix {prefix!r}: {e}") from None
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})_")
    counter = 1 + max((int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))), default=0)
    return folder / f"{stem}_{counter:05}_{suffix}", f"{stem} {counter}"


def _metadata(model: DiffusionModelHandle | None, title: str, prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    meta: dict[str, str] = {}
    if model is not None:
        if model.arch in MODELSPEC_ARCH:
            meta.update({"modelspec.architecture": MODELSPEC_ARCH[model.arch], "modelspec.sai_model_spec": "1.0.0",
                         "modelspec.implementation": "sgm", "modelspec.title": title})
        meta["modelspec.predict_key"] = "v" if model.prediction_type == "v_prediction" else "epsilon"
    meta.update(dict(png_text_chunks(prompt, extra_pnginfo)))
    return meta


def _write(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".part")
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def checkpoint_state_dict(model: DiffusionModelHandle | None, clip: Any, vae: Any) -> dict[str, torch.Tensor]:
    from .models.checkpoint import LoadedCheckpoint, checkpoint_to_ldm_state_dict

    arch = model.arch if model is not None else (clip.arch if clip is not None else "sd1")
    extras = {}
    if model is not None and model.unclip_stats is not None:
        extras["noise_augmentor"] = model.unclip_stats
    ckpt = LoadedCheckpoint(arch=arch, prediction_type=model.prediction_type if model is not None else "epsilon",
                            unet=cast(Any, model.unet) if model is not None else None,
                            vae=vae.vae if vae is not None else None,
                            text_encoders=dict(clip.text_encoders) if clip is not None else {}, tokenizers={},
                            source=Path("<save>"), extras=extras)
    sd = checkpoint_to_ldm_state_dict(ckpt)
    if model is not None and model.prediction_type == "v_prediction":
        sd["v_pred"] = torch.tensor([])  # how ComfyUI marks v-prediction checkpoints
    return sd


@node("CheckpointSave", category="advanced/model_merging", display_name="Save Checkpoint", output_node=True)
def checkpoint_save(model: Model, clip: Clip, vae: Vae,
                    filename_prefix: Annotated[str, String("checkpoints/ComfyUI")],
                    prompt: Annotated[Any, Hidden("PROMPT")] = None,
                    extra_pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> None:
    """Saves the model, CLIP and VAE as one checkpoint (original single-file layout) in the output folder."""
    if clip.arch != model.arch:
        raise ValueError(f"CheckpointSave: clip is from an {clip.arch} model, model is {model.arch}")
    path, title = _output_file(filename_prefix, "CheckpointSave")
    model.ensure_loaded()
    _write(path, checkpoint_state_dict(model, clip, vae), _metadata(model, title, prompt, extra_pnginfo))


@node("ModelSave", category="advanced/model_merging", output_node=True)
def model_save(model: Model, filename_prefix: Annotated[str, String("diffusion_models/ComfyUI")],
               prompt: Annotated[Any, Hidden("PROMPT")] = None,
               extra_pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> None:
    """Saves the diffusion model alone (model.diffusion_model.* keys, loadable by UNETLoader)."""
    path, title = _output_file(filename_prefix, "ModelSave")
    model.ensure_loaded()
    _write(path, checkpoint_state_dict(model, None, None), _metadata(model, title, prompt, extra_pnginfo))


@node("VAESave", category="advanced/model_merging", output_node=True)
def vae_save(vae: Vae, filename_prefix: Annotated[str, String("vae/ComfyUI_vae")],
             prompt: Annotated[Any, Hidden("PROMPT")] = None,
             extra_pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> None:
    """Saves the VAE in the original layout (encoder.* / decoder.* keys, as the VAE files people share)."""
    from .models import ldm_keys

    path, _ = _output_file(filename_prefix, "VAESave")
    sd = ldm_keys.vae_diffusers_to_ldm(vae.vae.state_dict(), vae.vae.config)
    _write(path, sd, dict(png_text_chunks(prompt, extra_pnginfo)))



# ---- CLIP ---------------------------------------------------------------------------------------------
# Text encoders are merged when the node runs (they are a fraction of a UNet's size), into copies;
# position ids and logit scales are never merged (ComfyUI skips them too).

def _merge_clips(node_name: str, clip1: Any, clip2: Any, kind: str, a: float, b: float) -> Any:
    from .models.merge import module_with_state

    if clip1.arch != clip2.arch:
        raise ValueError(f"{node_name}: clip2 is from an {clip2.arch} model, clip1 from an {clip1.arch} model")
    merged = {}
    for key in clip1.base_text_encoders:
        # clip2's weights copied out first: clip1 may share the encoder with it (a LoRA'd clip and its
        # base), and asking for clip1's encoder re-patches that shared module to clip1's weights
        other = {name: t.clone() for name, t in clip2.encoder(key).state_dict().items()}
        enc = clip1.encoder(key)
        state = {}
        for name, w in enc.state_dict().items():
            w2 = other.get(name)
            if (w2 is None or w2.shape != w.shape or not w.is_floating_point()
                    or name.endswith((".position_ids", ".logit_scale"))):
                continue
            w2 = w2.to(w)
            state[name] = w * a + w2 * b if kind != "subtract" else (w - w2) * a
        merged[key] = module_with_state(enc, state)
    return clip1.with_text_encoders(merged)


@node("CLIPMergeSimple", category="advanced/model_merging")
def clip_merge_simple(clip1: Clip, clip2: Clip, ratio: Annotated[float, _RATIO]) -> Clip:
    """ratio * clip1 + (1 - ratio) * clip2, weight by weight."""
    return _merge_clips("CLIPMergeSimple", clip1, clip2, "simple", float(ratio), 1.0 - float(ratio))


@node("CLIPMergeSubtract", category="advanced/model_merging")
def clip_merge_subtract(clip1: Clip, clip2: Clip,
                        multiplier: Annotated[float, Float(1.0, min=-10.0, max=10.0, step=0.01)]) -> Clip:
    """multiplier * (clip1 - clip2)."""
    return _merge_clips("CLIPMergeSubtract", clip1, clip2, "subtract", float(multiplier), 0.0)


@node("CLIPMergeAdd", category="advanced/model_merging")
def clip_merge_add(clip1: Clip, clip2: Clip) -> Clip:
    """clip1 + clip2."""
    return _merge_clips("CLIPMergeAdd", clip1, clip2, "add", 1.0, 1.0)


CLIP_FILE_TAGS = {"l": "clip_l", "g": "clip_g", "h": "clip_h"}


@node("CLIPSave", category="advanced/model_merging", output_node=True)
def clip_save(clip: Clip, filename_prefix: Annotated[str, String("clip/ComfyUI")],
              prompt: Annotated[Any, Hidden("PROMPT")] = None,
              extra_pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> None:
    """Saves each text encoder to its own file (`<prefix>_clip_l_00001_.safetensors`, ...) in the
    transformers layout (text_model.*), as ComfyUI does."""
    from .models.checkpoint import clip_file_state_dict

    meta = dict(png_text_chunks(prompt, extra_pnginfo))
    for key, enc in clip.text_encoders.items():
        path, _ = _output_file(f"{filename_prefix}_{CLIP_FILE_TAGS.get(key, key)}", "CLIPSave")
        sd = {k: v for k, v in clip_file_state_dict(cast(Any, enc)).items() if not k.endswith(".position_ids")}
        _write(path, sd, meta)

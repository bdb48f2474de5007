"""Tiny random-weight Stable Diffusion models for tests and demos.

They use the real diffusers/transformers classes and the real block structure of each
architecture (SD1: conv projections and 8 heads; SD2: linear projections and an OpenCLIP-H
style encoder; SDXL: an attention-free first level, deeper second level, text-time embedding
and two encoders; SDXL refiner: OpenCLIP-G only, attention-free first and last levels, 5 embedded
size/score numbers), only with tiny widths; `inpaint=True` gives the 9-channel inpainting UNet.
T2I-Adapters (full, light, SDXL) are sized to fit these UNets. The VAE keeps four levels so images are still
downscaled by 8. Configs are derived from the shipped full-size ones with the same rules the
loader uses to infer them back from tensor shapes (detect.py), so a written tiny checkpoint
loads into identical models.

The weights are random: every parameter is jittered so that no two tensors are alike and a
swapped key in a conversion cannot go unnoticed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from . import detect
from .checkpoint import CLIP_LAYER_DEFAULTS, LoadedCheckpoint, checkpoint_to_ldm_state_dict, scheduler_config
from .detect import CLIP_COMPONENTS, clip_heads, unet_heads
from .tokenizer import load_tokenizer

DEMO_NAME = "sdflow-demo-RANDOM-WEIGHTS-sd15.safetensors"
CLIP_HIDDEN = 32
SDXL_TIME_EMBED = 8  # per size/crop number; real SDXL uses 256
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl_refiner": "stable-diffusion-xl-v1-refiner",
}


def tiny_configs(arch: str = "sd1", *, inpaint: bool = False, unclip: bool = False) -> dict[str, dict]:
    """diffusers/transformers configs of the tiny models: keys unet, vae, l/h/g.

    `inpaint`: a 9-channel inpainting UNet (latent + mask + masked-image latent). `unclip` (SD2): the
    SD2.1 unCLIP UNet, taking a noise-augmented image embedding + noise-level embedding as class labels."""
    clips: dict[str, dict] = {}
    for kind, component in CLIP_COMPONENTS[arch].items():
        cfg = detect.shipped_config(arch, component)
        cfg.update(
            hidden_size=CLIP_HIDDEN,
            intermediate_size=2 * CLIP_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=clip_heads(CLIP_HIDDEN),
            projection_dim=CLIP_HIDDEN,
        )
        clips[kind] = cfg
    context = sum(c["hidden_size"] for c in clips.values())  # SDXL concatenates L and G

    unet = detect.shipped_config(arch, "unet")
    channels = [32, 64]
    unet.update(block_out_channels=channels, layers_per_block=1, cross_attention_dim=context)
    if inpaint:
        unet["in_channels"] = 9
    if arch == "sdxl_refiner":
        # the refiner's shape: no attention in the first and last levels, pooled G + 5 size/score numbers
        channels = [32, 64, 64]
        unet.update(
            block_out_channels=channels,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[2, 2, 2],
            addition_time_embed_dim=SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=clips["g"]["projection_dim"] + 5 * SDXL_TIME_EMBED,
            attention_head_dim=[unet_heads(arch, c) for c in channels],
        )
    elif arch == "sdxl":
        unet.update(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2],
            addition_time_embed_dim=SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=clips["g"]["projection_dim"] + 6 * SDXL_TIME_EMBED,
            attention_head_dim=[unet_heads(arch, c) for c in channels],
        )
    else:
        unet.update(
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            transformer_layers_per_block=[1, 1],
            attention_head_dim=(unet_heads(arch, channels[0]) if arch == "sd1"
                                else [unet_heads(arch, c) for c in channels]),
        )

    if unclip:
        if arch != "sd2":
            raise ValueError("unCLIP models are SD2")
        unet.update(class_embed_type="projection", projection_class_embeddings_input_dim=2 * CLIP_HIDDEN)
    vae = detect.shipped_config(arch, "vae")
    vae.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    return {"unet": unet, "vae": vae, **clips}


def _jitter(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _clip_model(cfg: dict) -> CLIPTextModel | CLIPTextModelWithProjection:
    kwargs = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    with_proj = "CLIPTextModelWithProjection" in cfg.get("architectures", [])
    cls = CLIPTextModelWithProjection if with_proj else CLIPTextModel
    return cls(CLIPTextConfig(**kwargs))


def tiny_checkpoint_models(arch: str = "sd1", *, prediction_type: str = "epsilon", seed: int = 0,
                           inpaint: bool = False, unclip: bool = False) -> LoadedCheckpoint:
    """In-memory tiny models of `arch`, deterministic for a seed (the global RNG is left alone).
    `unclip`: an SD2.1 unCLIP checkpoint, with its OpenCLIP image tower and noise-augmentor statistics."""
    if arch not in detect.ARCHES:
        raise ValueError(f"unknown architecture {arch!r}")
    cfgs = tiny_configs(arch, inpaint=inpaint, unclip=unclip)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(cfgs["unet"])
        vae = AutoencoderKL.from_config(cfgs["vae"])
        encoders = {kind: _clip_model(cfgs[kind]) for kind in CLIP_COMPONENTS[arch]}
    for model in (unet, vae, *encoders.values()):
        _jitter(model, gen)
        model.eval().requires_grad_(False)
    return LoadedCheckpoint(
        arch=arch,
        prediction_type=prediction_type,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers={kind: load_tokenizer(kind) for kind in encoders},
        source=Path(f"<tiny-{arch}-seed{seed}>"),
        scheduler_config=scheduler_config(arch, prediction_type),
        metadata={"sdflow.random_weights": "true", "modelspec.prediction_type": prediction_type},
        clip_layers=dict(CLIP_LAYER_DEFAULTS[arch]),
        extras=_unclip_extras(seed) if unclip else {},
    )


def _unclip_extras(seed: int) -> dict:
    vision = tiny_clip_vision(seed=seed + 1000)
    gen = torch.Generator().manual_seed(seed + 1001)
    stats = (torch.randn(1, CLIP_HIDDEN, generator=gen), 0.5 + torch.rand(1, CLIP_HIDDEN, generator=gen))
    return {"noise_augmentor": stats,
            "clip_vision": {k: v for k, v in vision.state_dict().items() if not k.endswith("position_ids")}}


def write_tiny_checkpoint(
    path: str | Path, arch: str = "sd1", *, prediction_type: str = "epsilon", seed: int = 0,
    inpaint: bool = False, unclip: bool = False,
) -> Path:
    """Write a tiny single-file `.safetensors` checkpoint in the original LDM layout."""
    from safetensors.torch import save_file

    path = Path(path)
    ckpt = tiny_checkpoint_models(arch, prediction_type=prediction_type, seed=seed, inpaint=inpaint, unclip=unclip)
    metadata = {
        "sdflow.random_weights": "true",
        "modelspec.prediction_type": prediction_type,
        "modelspec.architecture": MODELSPEC_ARCH[arch] + ("-inpainting" if inpaint else "")
        + ("-unclip" if unclip else ""),
        "modelspec.title": f"sdflow tiny {arch} (random weights)",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file(checkpoint_to_ldm_state_dict(ckpt), str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def write_tiny_diffusers_folder(
    path: str | Path, arch: str = "sd1", seed: int = 0, *, prediction_type: str = "epsilon",
    inpaint: bool = False,
) -> Path:
    """Write the tiny models of `arch` as a diffusers pipeline folder."""
    path = Path(path)
    ckpt = tiny_checkpoint_models(arch, prediction_type=prediction_type, seed=seed, inpaint=inpaint)
    path.mkdir(parents=True, exist_ok=True)
    assert ckpt.unet is not None and ckpt.vae is not None
    ckpt.unet.save_pretrained(path / "unet")
    ckpt.vae.save_pretrained(path / "vae")
    for kind, sub in CLIP_COMPONENTS[arch].items():
        ckpt.text_encoders[kind].save_pretrained(path / sub)
        ckpt.tokenizers[kind].save_pretrained(path / sub.replace("text_encoder", "tokenizer"))
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(ckpt.scheduler_config, indent=2))
    (path / "model_index.json").write_text(json.dumps(detect.shipped_config(arch, "model_index"), indent=2))
    return path


def write_demo_checkpoint(models_dir: str | Path) -> Path:
    """Ensure `models_dir/checkpoints/sdflow-demo-RANDOM-WEIGHTS-sd15.safetensors` exists (tiny SD1,
    random weights: it runs every node end to end but produces noise-like images)."""
    path = Path(models_dir) / "checkpoints" / DEMO_NAME
    if not path.exists():
        write_tiny_checkpoint(path, "sd1")
    return path


def tiny_t2i_adapter(arch: str = "sd1", *, light: bool = False, in_channels: int = 3, seed: int = 0):
    """A tiny random-weight diffusers T2IAdapter whose features fit the tiny UNet of `arch`: the
    full adapter (SD1/SD2), the SDXL full adapter (unshuffle by 16) or, with `light`, the light one."""
    from diffusers.models.adapter import T2IAdapter

    if light:
        kwargs = {"channels": [32, 64], "num_res_blocks": 2, "downscale_factor": 8, "adapter_type": "light_adapter"}
    elif arch == "sdxl":
        kwargs = {"channels": [32, 64], "num_res_blocks": 2, "downscale_factor": 16, "adapter_type": "full_adapter_xl"}
    else:
        kwargs = {"channels": [32, 64], "num_res_blocks": 2, "downscale_factor": 8, "adapter_type": "full_adapter"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = T2IAdapter(in_channels=in_channels, **kwargs)
    _jitter(adapter, torch.Generator().manual_seed(seed + 1))
    return adapter.eval().requires_grad_(False)


def write_tiny_t2i_adapter(path: str | Path, arch: str = "sd1", *, layout: str = "diffusers", light: bool = False,
                           in_channels: int = 3, seed: int = 0) -> Path:
    """Write a tiny T2I-Adapter: `layout` "diffusers" (bare file), "folder" (save_pretrained) or
    "original" (TencentARC key names)."""
    from safetensors.torch import save_file

    from .t2i_adapter import diffusers_to_original

    path = Path(path)
    adapter = tiny_t2i_adapter(arch, light=light, in_channels=in_channels, seed=seed)
    if layout == "folder":
        adapter.save_pretrained(path)
        return path
    sd = {k: v.contiguous() for k, v in adapter.state_dict().items()}
    if layout == "original":
        sd = diffusers_to_original(sd, adapter.config.num_res_blocks, light)
    elif layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def tiny_clip_vision(*, projection_dim: int = CLIP_HIDDEN, seed: int = 0, image_size: int = 28, patch_size: int = 14):
    """A tiny CLIPVisionModelWithProjection shaped like the OpenCLIP towers (GELU, 64-wide heads rule)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from .clip_vision import shipped_config

    cfg = {k: v for k, v in shipped_config("vit_h").items() if k not in ("architectures", "model_type")}
    cfg.update(hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN, num_hidden_layers=3,
               num_attention_heads=clip_heads(CLIP_HIDDEN), projection_dim=projection_dim,
               image_size=image_size, patch_size=patch_size)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
    _jitter(model, gen)
    return model.eval().requires_grad_(False)


def write_tiny_clip_vision(path: str | Path, *, layout: str = "openclip", projection_dim: int = CLIP_HIDDEN,
                           seed: int = 0) -> Path:
    """Write a tiny CLIP vision tower: `layout` "openclip" (`visual.*`, as open_clip exports) or "hf"
    (`vision_model.*`, as ComfyUI's clip_vision folder files and transformers' model.safetensors)."""
    from safetensors.torch import save_file

    from .clip_vision import hf_vision_to_openclip

    model = tiny_clip_vision(projection_dim=projection_dim, seed=seed)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if layout == "openclip":
        sd = hf_vision_to_openclip(sd)
    elif layout != "hf":
        raise ValueError(f"unknown layout {layout!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".pt", ".pth", ".bin"):
        torch.save(sd, path)
    else:
        save_file(sd, str(path), metadata={"sdflow.random_weights": "true"})
    return path


def _hn_layers(width: int, gen: torch.Generator, layer_norm: bool) -> dict:
    """One MLP as A1111's Sequential names it for layer_structure [1, 2, 1], relu, layer norm and dropout:
    0 Linear(w, 2w), 1 ReLU, 2 LayerNorm(2w), 3 Dropout, 4 Linear(2w, w), 5 LayerNorm(w)."""
    def ln(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 + 0.1 * torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen)

    sd = {"linear.0.weight": 0.2 * torch.randn(2 * width, width, generator=gen),
          "linear.0.bias": 0.1 * torch.randn(2 * width, generator=gen)}
    if layer_norm:
        sd["linear.2.weight"], sd["linear.2.bias"] = ln(2 * width)
    sd["linear.4.weight"] = 0.2 * torch.randn(width, 2 * width, generator=gen)
    sd["linear.4.bias"] = 0.1 * torch.randn(width, generator=gen)
    if layer_norm:
        sd["linear.5.weight"], sd["linear.5.bias"] = ln(width)
    return sd


def write_tiny_hypernetwork(path: str | Path, widths: tuple[int, ...] = (CLIP_HIDDEN, 64), *, layer_norm: bool = True,
                            activation: str = "relu", seed: int = 0) -> dict:
    """An A1111 hypernetwork .pt for the tiny SD1 UNet (attention widths 32 and 64), layer_structure
    [1, 2, 1], in the file layout A1111 saves (per-width [key, value] layer dicts plus its settings)."""
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    obj: dict[Any, Any] = {w: [_hn_layers(w, gen, layer_norm), _hn_layers(w, gen, layer_norm)] for w in widths}
    obj.update({"layer_structure": [1, 2, 1], "activation_func": activation, "is_layer_norm": layer_norm,
                "use_dropout": True, "activate_output": False, "last_layer_dropout": False,
                "name": path.stem, "step": 1000, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "tiny"})
    torch.save(obj, path)
    return obj


def write_tiny_style_model(path: str | Path, *, width: int = CLIP_HIDDEN, context_dim: int = CLIP_HIDDEN,
                           layers: int = 2, tokens: int = 8, seed: int = 0) -> Path:
    """A T2I-Adapter style model sized for the tiny CLIP vision tower and SD1 UNet, saved as TencentARC
    released theirs (a .pth state dict with the original key names)."""
    from .style_model import StyleAdapter

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StyleAdapter(width, context_dim, layers, tokens)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def tiny_gligen_unet(arch: str = "sd1", *, seed: int = 0, gligen_seed: int = 1) -> UNet2DConditionModel:
    """The tiny checkpoint's UNet rebuilt as a diffusers GLIGEN ("gated") UNet: the same weights plus random
    fusers (with non-zero gates, so grounding shows) and a text-box position net sized for the tiny CLIP."""
    ckpt = tiny_checkpoint_models(arch, seed=seed)
    assert ckpt.unet is not None
    cfg = {k: v for k, v in ckpt.unet.config.items() if k != "_use_default_values"}  # else defaults win
    cfg["attention_type"] = "gated"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(gligen_seed)
        unet = UNet2DConditionModel.from_config(cfg)
    state = unet.state_dict()
    state.update(ckpt.unet.state_dict())
    gen = torch.Generator().manual_seed(gligen_seed)
    for key, value in state.items():
        if ".fuser." in key or key.startswith("position_net."):
            state[key] = (value + 0.3 * torch.randn(value.shape, generator=gen)) if "alpha" not in key \
                else torch.full_like(value, 0.8)
    unet.load_state_dict(state, strict=True)
    return unet.eval().requires_grad_(False)


def write_tiny_gligen(path: str | Path, unet: Any) -> Path:
    """A GLIGEN file in the original layout (as gligen_sd14_textbox_pruned.safetensors) from a gated UNet."""
    from safetensors.torch import save_file

    from .gligen import ldm_fuser_prefixes, transformer_blocks

    out = {f"position_net.{k}": v.contiguous() for k, v in unet.position_net.state_dict().items()}
    for prefix, block in zip(ldm_fuser_prefixes(unet), transformer_blocks(unet), strict=True):
        fuser: Any = block.fuser
        out.update({prefix + k: v.contiguous() for k, v in fuser.state_dict().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path

"""CLIPVisionLoader / CLIPVisionEncode / unCLIPConditioning on tiny vision towers written in the OpenCLIP
and the transformers layouts; parity with transformers' vision tower and diffusers' unCLIP noising."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.executor import Executor
from nodes.conditioning import clip_text_encode, clip_vision_encode, unclip_conditioning
from nodes.loaders import checkpoint_loader_simple, clip_vision_loader
from nodes.models import clip_vision as cv
from nodes.models.tiny import tiny_clip_vision, write_tiny_checkpoint, write_tiny_clip_vision
from nodes.models.unclip import NoiseAugmentor, revision_pooled, unclip_adm

from .conftest import activate

TINY_XL = "tiny-sdxl-base.safetensors"
FILES = {"openclip": "tiny-vit-openclip.safetensors", "hf": "tiny-vit-hf.safetensors",
         "pickle": "tiny-vit-openclip.pth"}


@pytest.fixture(scope="module")
def vision_files(sd_env):
    activate(sd_env)
    _, config = sd_env
    root = config.models_dir / "clip_vision"
    write_tiny_clip_vision(root / FILES["openclip"], layout="openclip", seed=5)
    write_tiny_clip_vision(root / FILES["hf"], layout="hf", seed=5)
    write_tiny_clip_vision(root / FILES["pickle"], layout="openclip", seed=5)
    if not (config.models_dir / "checkpoints" / TINY_XL).exists():
        write_tiny_checkpoint(config.models_dir / "checkpoints" / TINY_XL, "sdxl", seed=4)
    return root


def _image(h=40, w=60, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, h, w, 3, generator=gen)


@pytest.mark.parametrize("layout", list(FILES))
def test_every_layout_loads_the_same_weights(vision_files, layout):
    ref = tiny_clip_vision(seed=5).state_dict()
    got = clip_vision_loader(FILES[layout]).model.state_dict()
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert torch.equal(got[key], value), key


def test_encode_matches_transformers_vision_tower(vision_files):
    handle = clip_vision_loader(FILES["openclip"])
    image = _image(batch=2)
    out = clip_vision_encode(handle, image, "center")
    ref = tiny_clip_vision(seed=5)
    pixels = cv.clip_preprocess(image, 28, crop=True)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(out.image_embeds, want.image_embeds)
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state)
    torch.testing.assert_close(out.penultimate_hidden_states, want.hidden_states[-2])
    assert out["image_embeds"] is out.image_embeds  # item access, as custom nodes use it


def test_preprocessing_is_comfyui_recipe():
    image = _image(40, 60)
    got = cv.clip_preprocess(image, 28, crop=True)
    # shortest side to 28 (bicubic, antialiased), center crop 28x28, 8-bit quantised, CLIP mean/std
    x = F.interpolate(image.movedim(-1, 1), size=(28, 42), mode="bicubic", antialias=True)[:, :, :, 7:35]
    x = torch.clip(255 * x, 0, 255).round() / 255
    mean = torch.tensor(cv.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cv.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (x - mean) / std)
    squashed = cv.clip_preprocess(image, 28, crop=False)
    assert squashed.shape == got.shape == (1, 3, 28, 28)
    assert not torch.allclose(squashed, got)
    # a picture already at the tower's size is only normalised
    small = _image(28, 28)
    torch.testing.assert_close(cv.clip_preprocess(small, 28), ((torch.clip(255 * small, 0, 255).round() / 255)
                                                              .movedim(-1, 1) - mean) / std)


@pytest.mark.parametrize("name,layout", [("vit_l", "hf"), ("vit_h", "openclip"), ("vit_g", "openclip"),
                                         ("vit_g", "hf")])
def test_full_size_towers_are_recognised_from_shapes(name, layout):
    cfg = cv.shipped_config(name)
    d, n, mlp, proj = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["projection_dim"]
    meta = {"device": "meta"}
    sd = {"vision_model.embeddings.patch_embedding.weight": torch.empty(d, 3, 14, 14, **meta),
          "vision_model.embeddings.position_embedding.weight": torch.empty(257, d, **meta),
          "visual_projection.weight": torch.empty(proj, d, **meta)}
    for i in range(n):
        sd[f"vision_model.encoder.layers.{i}.layer_norm1.weight"] = torch.empty(d, **meta)
        sd[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"] = torch.empty(mlp, d, **meta)
        for part in "qkv":
            sd[f"vision_model.encoder.layers.{i}.self_attn.{part}_proj.weight"] = torch.empty(d, d, **meta)
    if layout == "openclip":
        sd = cv.openclip_vision_to_hf(cv.hf_vision_to_openclip(sd, "visual."), "visual.")
    got = cv.infer_config(sd)
    assert got == cfg
    assert got["hidden_act"] == ("quick_gelu" if name == "vit_l" else "gelu")


def test_wrong_files_are_refused_naming_node_input_file_and_kind(sd_env, vision_files):
    registry, config = sd_env
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    save_file(lora, str(vision_files / "a-lora.safetensors"))
    data = (vision_files / FILES["openclip"]).read_bytes()
    (vision_files / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"weights": types.SimpleNamespace(a=1)}, vision_files / "unsafe.pt")
    cases = {"a-lora.safetensors": "a LoRA", "cut.safetensors": "truncated", "unsafe.pt": "unsafe unpickling"}
    for name, why in cases.items():
        prompt = {"1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": name}},
                  "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
                  "3": {"class_type": "CLIPVisionEncode",
                        "inputs": {"clip_vision": ["1", 0], "image": ["2", 0], "crop": "center"}},
                  "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_XL}},
                  "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["4", 1]}},
                  "6": {"class_type": "unCLIPConditioning", "inputs": {
                      "conditioning": ["5", 0], "clip_vision_output": ["3", 0], "strength": 1.0,
                      "noise_augmentation": 0.0}},
                  "7": {"class_type": "KSampler", "inputs": {
                      "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                      "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["5", 0],
                      "latent_image": ["8", 0]}},
                  "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                  "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["4", 2]}},
                  "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}}
        result = Executor(registry).execute(prompt, f"bad-vision-{name}")
        assert result.status == "error" and result.error["node_id"] == "1", (name, result.error)
        msg = result.error["exception_message"]
        assert "CLIPVisionLoader" in msg and "clip_name" in msg and name in msg and why in msg, msg
        if name == "a-lora.safetensors":
            assert "expected a CLIP vision" in msg


def test_unclip_noising_matches_diffusers_stable_unclip():
    """One image embedding, noised as diffusers' StableUnCLIPImg2ImgPipeline does with the same noise."""
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    dim, seed, aug = 16, 123, 0.3
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, dim, generator=gen)
    mean, std = torch.randn(1, dim, generator=gen), torch.rand(1, dim, generator=gen) + 0.5
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=dim)
    normalizer.mean.data.copy_(mean)
    normalizer.std.data.copy_(std)
    pipe = types.SimpleNamespace(image_normalizer=normalizer,
                                 image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    level = round(999 * aug)
    noise = torch.randn(1, dim, generator=torch.Generator().manual_seed(seed - 10))
    with torch.no_grad():
        want = StableUnCLIPImg2ImgPipeline.noise_image_embeddings(pipe, embeds, level, noise=noise)
    out = types.SimpleNamespace(image_embeds=embeds)
    entry = {"clip_vision_output": out, "strength": 1.0, "noise_augmentation": aug}
    got = unclip_adm([entry], NoiseAugmentor(mean, std), seed=seed)
    torch.testing.assert_close(got, want)
    # strength scales the whole vector; two embeddings are summed and re-noised at the merge level
    twice = unclip_adm([{**entry, "strength": 2.0}], NoiseAugmentor(mean, std), seed=seed)
    torch.testing.assert_close(twice, 2 * want)
    merged = unclip_adm([entry, entry], NoiseAugmentor(mean, std), merge=0.0, seed=seed)
    assert merged.shape == (1, 2 * dim) and not torch.allclose(merged, want)


def test_unclip_conditioning_appends_entries(vision_files):
    handle = clip_vision_loader(FILES["hf"])
    out = clip_vision_encode(handle, _image(), "none")
    cond = [[torch.zeros(1, 4, 8), {"pooled_output": torch.zeros(1, 8)}]]
    one = unclip_conditioning(cond, out, 0.7, 0.1)
    two = unclip_conditioning(one, out, 0.5, 0.0)
    assert "unclip_conditioning" not in cond[0][1]  # the input is left alone
    entries = two[0][1]["unclip_conditioning"]
    assert [(e["strength"], e["noise_augmentation"]) for e in entries] == [(0.7, 0.1), (0.5, 0.0)]
    assert all(e["clip_vision_output"] is out for e in entries)
    assert unclip_conditioning(cond, out, 0.0, 0.5) is cond  # strength 0 changes nothing (ComfyUI)


def test_sdxl_revision_replaces_the_pooled_embedding(vision_files):
    model, clip, _ = checkpoint_loader_simple(TINY_XL)
    vision = clip_vision_loader(FILES["openclip"])
    out = clip_vision_encode(vision, _image(64, 64), "center")
    text = clip_text_encode("a photo", clip)
    cond = unclip_conditioning(text, out, 0.8, 0.2)
    ctx, opts = cond[0]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    size = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    base = {"context": ctx, "size_cond": size, "seed": 42}
    got = model.apply(x, 500, {**base, "pooled": opts["pooled_output"], "unclip": [opts["unclip_conditioning"]]})
    pooled = revision_pooled(opts["unclip_conditioning"], opts["pooled_output"].shape[-1], seed=42)
    want = model.apply(x, 500, {**base, "pooled": pooled})
    torch.testing.assert_close(got, want)
    text_only = model.apply(x, 500, {**base, "pooled": opts["pooled_output"]})
    assert not torch.allclose(got, text_only)


def test_revision_refuses_a_tower_of_the_wrong_width(sd_env, vision_files):
    activate(sd_env)
    write_tiny_clip_vision(vision_files / "wide.safetensors", projection_dim=24, seed=6)
    model, clip, _ = checkpoint_loader_simple(TINY_XL)
    out = clip_vision_encode(clip_vision_loader("wide.safetensors"), _image(), "center")
    cond = unclip_conditioning(clip_text_encode("a", clip), out, 1.0, 0.0)
    ctx, opts = cond[0]
    with pytest.raises(ValueError, match="revision needs the ViT-bigG"):
        model.apply(torch.zeros(1, 4, 8, 8), 10, {"context": ctx, "pooled": opts["pooled_output"],
                                                   "size_cond": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
                                                   "unclip": [opts["unclip_conditioning"]]})


# ---- SD2.1 unCLIP checkpoints ------------------------------------------------------------------------

UNCLIP = "tiny-sd21-unclip-h.safetensors"


@pytest.fixture(scope="module")
def unclip_file(sd_env):
    activate(sd_env)
    _, config = sd_env
    path = config.models_dir / "checkpoints" / UNCLIP
    if not path.exists():
        write_tiny_checkpoint(path, "sd2", seed=8, unclip=True, prediction_type="v_prediction")
    return path


def test_unclip_checkpoint_loader_gives_the_image_embedder(unclip_file):
    from nodes.loaders import unclip_checkpoint_loader
    from nodes.models.tiny import tiny_checkpoint_models

    model, clip, vae, vision = unclip_checkpoint_loader(UNCLIP)
    ref = tiny_checkpoint_models("sd2", seed=8, unclip=True)
    assert model.arch == "sd2" and model.prediction_type == "v_prediction" and model.class_input_dim == 64
    for key, value in ref.extras["clip_vision"].items():
        assert torch.equal(vision.model.state_dict()[key], value), key
    mean, std = model.unclip_stats
    assert torch.equal(mean, ref.extras["noise_augmentor"][0]) and torch.equal(std, ref.extras["noise_augmentor"][1])
    assert clip is not None and vae is not None


def test_unclip_model_matches_diffusers_stable_unclip_components(unclip_file):
    """Image -> transformers tower -> diffusers' noise_image_embeddings -> UNet class labels, against the
    CLIPVisionEncode + unCLIPConditioning path through the model handle."""
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    from nodes.loaders import unclip_checkpoint_loader

    model, clip, _, vision = unclip_checkpoint_loader(UNCLIP)
    image = _image(48, 64, seed=3)
    out = clip_vision_encode(vision, image, "center")
    ctx, opts = unclip_conditioning(clip_text_encode("a cat", clip), out, 1.0, 0.25)[0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    seed = 77
    got = model.apply(x, 300, {"context": ctx, "unclip": [opts["unclip_conditioning"]], "seed": seed})

    mean, std = model.unclip_stats
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=mean.shape[-1])
    normalizer.mean.data.copy_(mean)
    normalizer.std.data.copy_(std)
    pipe = types.SimpleNamespace(image_normalizer=normalizer,
                                 image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    with torch.no_grad():
        embeds = vision.model(pixel_values=cv.clip_preprocess(image, vision.image_size)).image_embeds
        noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(seed - 10))
        labels = StableUnCLIPImg2ImgPipeline.noise_image_embeddings(pipe, embeds, round(999 * 0.25), noise=noise)
        want = model.unet(x, torch.tensor([300.0]), encoder_hidden_states=ctx, class_labels=labels).sample
    torch.testing.assert_close(got, want)
    # without unCLIP conditioning the class input is zero (ComfyUI), which changes the prediction
    plain = model.apply(x, 300, {"context": ctx})
    with torch.no_grad():
        zero = model.unet(x, torch.tensor([300.0]), encoder_hidden_states=ctx,
                          class_labels=torch.zeros(1, model.class_input_dim)).sample
    torch.testing.assert_close(plain, zero)
    assert not torch.allclose(plain, got)


def test_unclip_loader_refuses_a_plain_checkpoint(sd_env, unclip_file):
    registry, _ = sd_env
    prompt = {"1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "tiny-sd1.safetensors"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
              "3": {"class_type": "CLIPVisionEncode",
                    "inputs": {"clip_vision": ["1", 3], "image": ["2", 0], "crop": "none"}},
              "4": {"class_type": "unCLIPConditioning", "inputs": {
                  "conditioning": ["5", 0], "clip_vision_output": ["3", 0], "strength": 1.0,
                  "noise_augmentation": 0.1}},
              "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["1", 1]}},
              "6": {"class_type": "KSampler", "inputs": {
                  "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                  "denoise": 1.0, "model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                  "latent_image": ["7", 0]}},
              "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
              "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}
    result = Executor(registry).execute(prompt, "unclip-plain")
    assert result.status == "error" and result.error["node_id"] == "1", result.error
    msg = result.error["exception_message"]
    assert "unCLIPCheckpointLoader" in msg and "ckpt_name" in msg and "tiny-sd1.safetensors" in msg
    assert "expected an unCLIP checkpoint" in msg

"""Issue #14: text encoders leave the accelerator when sampling starts, under the cache's accounting, and
come back at the next encode. The accelerator is simulated (tests/nodes/sim_accelerator.py): the tiny real
encoders really move to a second device kind and compute there, so this runs, and can fail, on a CPU."""
from __future__ import annotations

import pytest
import torch

from engine.cache import OutputCache
from engine.config import RuntimeConfig, reset_current_config, set_current_config
from nodes.conditioning import clip_text_encode
from nodes.models.diffusion_model import DiffusionModelHandle
from nodes.models.memory import release_text_encoders
from nodes.models.sd3_handles import SD3ClipHandle, SD3ModelHandle
from nodes.models.text_encoder import ClipHandle
from nodes.models.tiny import tiny_checkpoint_models
from nodes.models.tiny_sd3 import tiny_sd3_models, tiny_t5_tokenizer
from nodes.models.tokenizer import load_tokenizer
from nodes.sampler_nodes import common_ksampler

from .sim_accelerator import KIND, SimFactories

BIG = 1 << 40


@pytest.fixture
def vram(tmp_path):
    tokens = []

    def use(mode: str) -> None:
        tokens.append(set_current_config(RuntimeConfig(data_dir=tmp_path, vram_mode=mode)))

    yield use
    for token in reversed(tokens):
        reset_current_config(token)


def _sd1():
    ck = tiny_checkpoint_models("sd1", seed=4)
    clip = ClipHandle.from_checkpoint(ck, device=f"{KIND}:0")
    return DiffusionModelHandle(ck.unet, "sd1", device="cpu"), clip, torch.zeros(1, 4, 8, 8)


def _sd3():
    m = tiny_sd3_models(seed=5)
    tokenizers = {"l": load_tokenizer("l"), "g": load_tokenizer("g"), "t5": tiny_t5_tokenizer()}
    clip = SD3ClipHandle({k: m[k] for k in ("l", "g", "t5")}, tokenizers, device=f"{KIND}:0")
    return SD3ModelHandle(m["transformer"], device="cpu"), clip, torch.zeros(1, 16, 8, 8)


def _observed(model, clip, cache):
    """A clone of `model` whose every call records where the text encoders are and what the cache counts."""
    seen: list[tuple[set[str], dict[str, int]]] = []
    twin = model.clone()
    apply = model.apply

    def observing_apply(*args, **kwargs):
        devices = {t.device.type for m in clip.text_encoders.values() for t in m.parameters()}
        seen.append((devices, cache.usage()))
        return apply(*args, **kwargs)

    twin.apply = observing_apply
    return twin, seen


def _bytes(clip) -> int:
    return sum(clip.footprint().values())


@pytest.mark.parametrize("build", [_sd1, _sd3], ids=["sd1-clip", "sd3-clip-t5"])
def test_encoders_leave_the_accelerator_while_the_model_samples(vram, build):
    vram("normal")
    model, clip, latent = build()
    if isinstance(clip, SD3ClipHandle):
        assert clip.has_t5
    cache = OutputCache({KIND: BIG, "cpu": BIG})
    cache.put("clip", [[clip]])
    with SimFactories():
        positive = clip_text_encode("a red cat", clip)
        negative = clip_text_encode("blurry", clip)
    size = _bytes(clip)
    assert clip.current_device.type == KIND
    assert cache.usage().get(KIND) == size

    observed, seen = _observed(model, clip, cache)
    with SimFactories():
        common_ksampler(observed, 1, 2, 3.0, "euler", "simple", positive, negative, {"samples": latent})
    assert seen, "the model was never called"
    for devices, usage in seen:
        assert devices == {"cpu"}
        assert usage == {"cpu": size}              # the cache saw the move

    with SimFactories():
        again = clip_text_encode("a blue dog", clip)     # a new prompt: no encode cache hit
    assert clip.current_device.type == KIND and cache.usage().get(KIND) == size
    assert {t.device.type for m in clip.text_encoders.values() for t in m.parameters()} == {KIND}
    # encoding where they now are gives what a CPU-only copy of the same weights gives
    assert again[0][0].device.type == "cpu"
    clip.to_device("cpu")
    reference = clip_text_encode("a blue dog", clip.clone())
    torch.testing.assert_close(again[0][0], reference[0][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["gpu-only", "highvram"])
def test_gpu_only_and_highvram_keep_the_encoders(vram, mode):
    vram(mode)
    model, clip, latent = _sd1()
    cache = OutputCache({KIND: BIG, "cpu": BIG})
    cache.put("clip", [[clip]])
    with SimFactories():
        positive = clip_text_encode("a red cat", clip)
        negative = clip_text_encode("blurry", clip)
    observed, seen = _observed(model, clip, cache)
    with SimFactories():
        common_ksampler(observed, 1, 2, 3.0, "euler", "simple", positive, negative, {"samples": latent})
    assert seen and all(devices == {KIND} and usage.get(KIND) == _bytes(clip) for devices, usage in seen)


def test_on_the_cpu_release_moves_nothing(vram):
    vram("normal")
    ck = tiny_checkpoint_models("sd1", seed=4)
    clip = ClipHandle.from_checkpoint(ck, device="cpu")
    clip_text_encode("a red cat", clip)
    assert clip._weights not in release_text_encoders()


def test_a_lora_patched_encoder_comes_back_patched(vram):
    from nodes.models.lora import LoraPatch, parse_lora, resolve, text_encoder_name_map

    vram("normal")
    _, clip, _ = _sd1()
    encoder = clip.text_encoders["l"]
    module = text_encoder_name_map(encoder)["text_model.encoder.layers.0.self_attn.q_proj"]
    weight = encoder.get_submodule(module).weight
    gen = torch.Generator().manual_seed(2)
    base = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    lora = parse_lora({f"{base}.lora_down.weight": 0.3 * torch.randn(2, weight.shape[1], generator=gen),
                       f"{base}.lora_up.weight": 0.3 * torch.randn(weight.shape[0], 2, generator=gen)})
    patches, unknown = resolve(lora, None, clip.base_text_encoders)
    assert patches and not unknown
    patched = clip.with_encoder_patch("l", LoraPatch(tuple(patches), 1.0))
    cache = OutputCache({KIND: BIG, "cpu": BIG})
    cache.put("clip", [[clip]])
    cache.put("patched", [[patched]])
    with SimFactories():
        first = patched.encode_text("a red cat")[0][0]
        plain = clip.encode_text("a red cat")[0][0]
        assert not torch.allclose(first, plain, atol=1e-4)
        assert clip._weights in release_text_encoders()     # as a sampling run starts
        assert KIND not in cache.usage() and clip.current_device.type == "cpu"
        patched.clear_cache()
        clip.clear_cache()
        again = patched.encode_text("a red cat")[0][0]
        assert clip.current_device.type == KIND
        torch.testing.assert_close(again, first, rtol=0, atol=1e-6)
        torch.testing.assert_close(clip.encode_text("a red cat")[0][0], plain, rtol=0, atol=1e-6)

"""Offline model-file layer: weight files, tokenizer, LDM single-file checkpoints, diffusers folders."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in this layer may reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nodes.models import detect, ldm_keys
from nodes.models.checkpoint import (
    LoadedCheckpoint,
    checkpoint_to_ldm_state_dict,
    clip_file_state_dict,
    load_checkpoint,
    load_diffusers_folder,
    load_vae_file,
)
from nodes.models.state_dict import ModelFileError, read_metadata, read_state_dict
from nodes.models.tiny import (
    DEMO_NAME,
    _clip_model,
    tiny_checkpoint_models,
    write_demo_checkpoint,
    write_tiny_checkpoint,
    write_tiny_diffusers_folder,
)
from nodes.models.tokenizer import load_tokenizer

CASES = [("sd1", "epsilon"), ("sd2", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")]


class NotAWeight:
    """A custom class: a pickle holding it needs unsafe unpickling."""

    def __init__(self) -> None:
        self.payload = "x"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        (arch, pred): write_tiny_checkpoint(root / f"{arch}-{pred}.safetensors", arch, prediction_type=pred)
        for arch, pred in CASES
    }


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: tensor {k} differs"


def _assert_same_models(orig: LoadedCheckpoint, loaded: LoadedCheckpoint) -> None:
    _assert_same_tensors(orig.unet.state_dict(), loaded.unet.state_dict(), "unet")
    _assert_same_tensors(orig.vae.state_dict(), loaded.vae.state_dict(), "vae")
    assert orig.text_encoders.keys() == loaded.text_encoders.keys()
    for kind in orig.text_encoders:
        assert type(orig.text_encoders[kind]) is type(loaded.text_encoders[kind])
        _assert_same_tensors(
            orig.text_encoders[kind].state_dict(), loaded.text_encoders[kind].state_dict(), f"text encoder {kind}"
        )


def _forward(ckpt: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """Run every model once on fixed inputs; returns the outputs."""
    g = torch.Generator().manual_seed(1)
    out: dict[str, torch.Tensor] = {}
    hidden = []
    pooled = None
    with torch.no_grad():
        for kind, te in ckpt.text_encoders.items():
            ids = ckpt.tokenizers[kind](
                "a photo of a cat", padding="max_length", max_length=77, return_tensors="pt"
            ).input_ids
            res = te(ids, output_hidden_states=True)
            out[f"te_{kind}"] = res.last_hidden_state
            hidden.append(res.hidden_states[-2])
            if hasattr(res, "text_embeds"):
                pooled = res.text_embeds
        context = torch.cat(hidden, dim=-1)
        extra = {}
        if ckpt.arch == "sdxl":
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        latent = torch.randn(1, 4, 8, 8, generator=g)
        out["unet"] = ckpt.unet(latent, torch.tensor([500]), encoder_hidden_states=context, **extra).sample
        out["decoded"] = ckpt.vae.decode(latent).sample
        out["encoded"] = ckpt.vae.encode(torch.rand(1, 3, 64, 64, generator=g) * 2 - 1).latent_dist.mean
    return out


# --------------------------------------------------------------------------------- tokenizer

def test_tokenizer_matches_clip_ids():
    tok = load_tokenizer("l")
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {49407}


@pytest.mark.parametrize("kind", ["g", "h"])
def test_openclip_tokenizers_pad_with_zero(kind):
    tok = load_tokenizer(kind)
    assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens(0) == "!"
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and set(ids[7:]) == {0}
    with pytest.raises(ValueError):
        load_tokenizer("x")


# --------------------------------------------------------------------- single-file checkpoints

@pytest.mark.parametrize(("arch", "pred"), CASES)
def test_tiny_checkpoint_round_trip(tiny_files, arch, pred):
    path = tiny_files[(arch, pred)]
    assert path.stat().st_size < 25_000_000
    meta = read_metadata(path)
    assert meta["sdflow.random_weights"] == "true" and meta["modelspec.prediction_type"] == pred

    loaded = load_checkpoint(path)
    assert (loaded.arch, loaded.prediction_type, loaded.source) == (arch, pred, path)
    assert loaded.scheduler_config["prediction_type"] == pred and loaded.random_weights
    expected_kinds = {"sd1": ["l"], "sd2": ["h"], "sdxl": ["l", "g"]}[arch]
    assert list(loaded.text_encoders) == expected_kinds == list(loaded.tokenizers)

    orig = tiny_checkpoint_models(arch, prediction_type=pred)
    _assert_same_models(orig, loaded)
    # Config inferred from the shapes equals the one the models were built with.
    assert dict(loaded.unet.config) == dict(orig.unet.config)
    for kind in orig.text_encoders:
        assert loaded.text_encoders[kind].config.to_dict() == orig.text_encoders[kind].config.to_dict()

    a, b = _forward(orig), _forward(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.isfinite(b[k]).all(), k
        assert torch.equal(a[k], b[k]), f"{k} output differs after the round trip"
    assert b["unet"].shape == (1, 4, 8, 8) and b["decoded"].shape == (1, 3, 64, 64)
    assert b["encoded"].shape == (1, 4, 8, 8)


def test_ldm_layout_keys(tiny_files):
    sd = read_state_dict(tiny_files[("sdxl", "epsilon")])
    assert "model.diffusion_model.label_emb.0.0.weight" in sd
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd
    g = "conditioner.embedders.1.model."
    assert sd[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert sd[g + "text_projection"].shape == (32, 32)
    assert not any(".q_proj." in k for k in sd if k.startswith(g))
    sd2 = read_state_dict(tiny_files[("sd2", "epsilon")])
    assert "cond_stage_model.model.positional_embedding" in sd2
    sd1 = read_state_dict(tiny_files[("sd1", "epsilon")])
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1


def test_load_parts_and_dtype(tiny_files):
    path = tiny_files[("sd1", "epsilon")]
    only_unet = load_checkpoint(path, load_vae=False, load_clip=False, dtype=torch.bfloat16)
    assert only_unet.vae is None and only_unet.text_encoders == {} and only_unet.tokenizers == {}
    assert only_unet.unet.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in only_unet.unet.parameters())
    no_unet = load_checkpoint(path, load_unet=False)
    assert no_unet.unet is None and no_unet.vae is not None and "l" in no_unet.text_encoders


def test_prediction_type_from_v_pred_key(tmp_path):
    sd = checkpoint_to_ldm_state_dict(tiny_checkpoint_models("sd1"))
    sd["v_pred"] = torch.tensor([])
    path = tmp_path / "vpred.safetensors"
    save_file(sd, str(path))  # no metadata
    assert load_checkpoint(path, load_vae=False, load_clip=False).prediction_type == "v_prediction"
    del sd["v_pred"]
    save_file(sd, str(path))
    assert load_checkpoint(path, load_vae=False, load_clip=False).prediction_type == "epsilon"


def test_tiny_models_are_deterministic():
    a, b, c = (tiny_checkpoint_models("sd1", seed=s) for s in (0, 0, 1))
    _assert_same_models(a, b)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_full_size_structure_infers_shipped_configs():
    """Real-size models (meta device, no memory): LDM key counts and config inference from shapes."""
    for arch, unet_keys in (("sd1", 686), ("sd2", 686), ("sdxl", 1680)):
        with torch.device("meta"):
            from diffusers import AutoencoderKL, UNet2DConditionModel

            unet = UNet2DConditionModel.from_config(detect.shipped_config(arch, "unet"))
            vae = AutoencoderKL.from_config(detect.shipped_config(arch, "vae"))
            tes = {k: _clip_model(detect.shipped_config(arch, c)) for k, c in detect.CLIP_COMPONENTS[arch].items()}
        sd = checkpoint_to_ldm_state_dict(LoadedCheckpoint(arch, "epsilon", unet, vae, tes, {}, Path("meta")))
        assert detect.detect_arch(sd) == arch
        unet_sd = {k[len(ldm_keys.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(ldm_keys.UNET_PREFIX)}
        assert len(unet_sd) == unet_keys
        assert sum(k.startswith("first_stage_model.") for k in sd) == 248
        pooled = sd["conditioner.embedders.1.model.text_projection"].shape[1] if arch == "sdxl" else None
        inferred = detect.infer_unet_config(unet_sd, arch, pooled_dim=pooled)
        shipped = detect.shipped_config(arch, "unet")
        shipped.setdefault("transformer_layers_per_block", [1] * len(shipped["block_out_channels"]))
        assert inferred == shipped
        for kind, comp in detect.CLIP_COMPONENTS[arch].items():
            hf = clip_file_state_dict(tes[kind])
            cfg = detect.infer_clip_config(hf, arch, kind)
            ship = detect.shipped_config(arch, comp)
            keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
            assert {k: cfg[k] for k in keys} == {k: ship[k] for k in keys}


# ----------------------------------------------------------------------- other file layouts

@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_diffusers_folder_loads(tmp_path, arch):
    pred = "v_prediction" if arch == "sd2" else "epsilon"
    folder = write_tiny_diffusers_folder(tmp_path / arch, arch, prediction_type=pred)
    loaded = load_diffusers_folder(folder)
    assert (loaded.arch, loaded.prediction_type) == (arch, pred)
    orig = tiny_checkpoint_models(arch, prediction_type=pred)
    _assert_same_models(orig, loaded)
    out = _forward(loaded)
    assert torch.equal(out["unet"], _forward(orig)["unet"])


def test_diffusers_folder_errors(tmp_path):
    with pytest.raises(ModelFileError, match="no model_index.json"):
        load_diffusers_folder(tmp_path)
    folder = write_tiny_diffusers_folder(tmp_path / "p", "sd1")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="no weights file") as e:
        load_diffusers_folder(folder)
    assert str(folder / "vae") in str(e.value)


def test_vae_file_layouts(tmp_path):
    orig = tiny_checkpoint_models("sd1").vae
    ldm = ldm_keys.vae_diffusers_to_ldm(orig.state_dict(), orig.config)
    files = {
        "prefixed.safetensors": {"first_stage_model." + k: v.contiguous() for k, v in ldm.items()},
        "bare.safetensors": {k: v.contiguous() for k, v in ldm.items()},
        "diffusers.safetensors": {k: v.contiguous() for k, v in orig.state_dict().items()},
    }
    for name, sd in files.items():
        save_file(sd, str(tmp_path / name))
        vae = load_vae_file(tmp_path / name)
        _assert_same_tensors(orig.state_dict(), vae.state_dict(), name)
    sdxl_vae = load_vae_file(tmp_path / "bare.safetensors", arch="sdxl")
    assert sdxl_vae.config.scaling_factor == pytest.approx(0.13025)
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match="not a VAE"):
        load_vae_file(tmp_path / "other.safetensors")


def test_safe_ckpt_loads(tmp_path):
    sd = checkpoint_to_ldm_state_dict(tiny_checkpoint_models("sd1"))
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, path)
    assert read_state_dict(path).keys() == sd.keys()
    assert read_metadata(path) == {}
    loaded = load_checkpoint(path)
    assert loaded.arch == "sd1"
    _assert_same_models(tiny_checkpoint_models("sd1"), loaded)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.arange(3)}, plain)
    assert torch.equal(read_state_dict(plain)["w"], torch.arange(3))


# ---------------------------------------------------------------------------------- failures

def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotAWeight()}, path)
    with pytest.raises(ModelFileError, match="refused: needs unsafe unpickling") as e:
        read_state_dict(path)
    assert str(path) in str(e.value)
    with pytest.raises(ModelFileError, match="unsafe unpickling"):
        load_checkpoint(path)


def test_corrupt_files(tmp_path):
    junk = bytes(range(256)) * 40
    for name in ("corrupt.safetensors", "corrupt.ckpt", "corrupt.pt"):
        path = tmp_path / name
        path.write_bytes(junk)
        with pytest.raises(ModelFileError, match="corrupt") as e:
            read_state_dict(path)
        assert str(path) in str(e.value)
    bad_json = tmp_path / "badheader.safetensors"
    bad_json.write_bytes((10).to_bytes(8, "little") + b"{not json}")
    with pytest.raises(ModelFileError, match="corrupt safetensors"):
        read_state_dict(bad_json)


def test_truncated_safetensors(tmp_path, tiny_files):
    data = tiny_files[("sd1", "epsilon")].read_bytes()
    for cut, what in ((len(data) // 2, "truncated"), (200, "truncated"), (5, "corrupt")):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=what) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value)


def test_missing_unknown_and_non_sd_files(tmp_path):
    with pytest.raises(ModelFileError, match="file not found") as e:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value)
    odd = tmp_path / "weights.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unknown model file extension"):
        read_state_dict(odd)
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ModelFileError, match="not a Stable Diffusion checkpoint: no UNet keys") as e:
        load_checkpoint(other)
    assert "lora.safetensors" in str(e.value)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(ModelFileError, match="no tensors"):
        read_state_dict(empty)


def test_checkpoint_missing_parts(tmp_path):
    sd = checkpoint_to_ldm_state_dict(tiny_checkpoint_models("sd1"))
    no_vae = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    path = tmp_path / "novae.safetensors"
    save_file(no_vae, str(path))
    with pytest.raises(ModelFileError, match="no VAE"):
        load_checkpoint(path)
    assert load_checkpoint(path, load_vae=False).vae is None
    holed = dict(sd)
    del holed["model.diffusion_model.out.2.weight"]
    path = tmp_path / "holed.safetensors"
    save_file(holed, str(path))
    with pytest.raises(ModelFileError) as e:
        load_checkpoint(path)
    assert "holed.safetensors" in str(e.value)


def test_demo_checkpoint(tmp_path):
    path = write_demo_checkpoint(tmp_path / "models")
    assert path == tmp_path / "models" / "checkpoints" / DEMO_NAME and "RANDOM-WEIGHTS" in path.name
    assert read_metadata(path)["sdflow.random_weights"] == "true"
    stamp = path.stat().st_mtime_ns
    assert write_demo_checkpoint(tmp_path / "models") == path and path.stat().st_mtime_ns == stamp
    assert load_checkpoint(path).arch == "sd1"


def test_shipped_configs_are_valid_json():
    for f in detect.CONFIG_DIR.rglob("*.json"):
        assert isinstance(json.loads(f.read_text()), dict), f


# ------------------------------------------------------------------------------ precision and start-up

def test_compute_dtype_rule():
    from nodes.models.memory import compute_dtype

    # torch.device("cuda") can be named without a GPU: the rule only looks at the device type.
    assert compute_dtype("cuda") == compute_dtype(torch.device("cuda:1")) == torch.float16
    assert compute_dtype("cpu") == compute_dtype(torch.device("cpu")) == torch.float32
    assert compute_dtype("cuda", vae=True) == compute_dtype("cpu", vae=True) == torch.float32


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_half_precision_checkpoint_runs_and_returns_float32(tiny_files, tmp_path, arch):
    from nodes.models.diffusion_model import DiffusionModelHandle
    from nodes.models.text_encoder import ClipHandle
    from nodes.models.vae import VaeHandle

    path = tiny_files[(arch, "epsilon")]
    full = load_checkpoint(path)
    half = load_checkpoint(path, dtype=torch.float16, vae_dtype=torch.float32)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    assert all(m.dtype == torch.float16 for m in half.text_encoders.values())

    clip16, clip32 = (ClipHandle.from_checkpoint(c, device="cpu") for c in (half, full))
    cond16, pooled16 = clip16.encode(clip16.tokenize("a (red:1.3) cat"))
    cond32, pooled32 = clip32.encode(clip32.tokenize("a (red:1.3) cat"))
    assert cond16.dtype == pooled16.dtype == torch.float32
    torch.testing.assert_close(cond16, cond32, atol=2e-2, rtol=2e-2)

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    extra = {"pooled": pooled32, "size_cond": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    cond = {"context": cond32, **(extra if arch == "sdxl" else {})}
    out16 = DiffusionModelHandle.from_checkpoint(half, device="cpu").apply(x, 500, cond)
    out32 = DiffusionModelHandle.from_checkpoint(full, device="cpu").apply(x, 500, cond)
    assert out16.dtype == torch.float32 and torch.isfinite(out16).all()
    assert not torch.equal(out16, out32)  # it really ran in half precision...
    torch.testing.assert_close(out16, out32, atol=2e-2, rtol=2e-2)  # ...and agrees closely

    image = VaeHandle(half.vae, device="cpu").decode(x)
    assert image.dtype == torch.float32 and image.shape == (1, 64, 64, 3)


def test_importing_the_node_set_does_not_import_diffusers_or_transformers():
    # Both take seconds to import; they load when a model is first built, not at start-up.
    import subprocess
    import sys

    code = ("import sys, nodes.builtin; "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

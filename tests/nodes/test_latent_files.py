"""SaveLatent / LoadLatent: ComfyUI's .latent format, raw VAE latents in the file as in sdflow's LATENT."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.executor import Executor
from nodes.latent_files import SCALE_KEY, SD_SCALE, load_latent

from .conftest import TINY_SD1


def _run_save(registry, prefix="latents/test"):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
              "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
              "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": prefix}}}
    result = Executor(registry).execute(prompt, "save-latent", extra_data={"extra_pnginfo": {"workflow": {"n": 1}}})
    return prompt, result


def test_save_latent_writes_comfyui_format_and_loads_back_exactly(sd_env):
    from nodes.image import load_image
    from nodes.latent import vae_encode
    from nodes.loaders import checkpoint_loader_simple

    registry, config = sd_env
    prompt, result = _run_save(registry)
    assert result.status == "success", result.error
    ui = result.outputs["4"]["latents"][0]
    assert ui["subfolder"] == "latents" and ui["type"] == "output" and ui["filename"].endswith("_00001_.latent")
    path = config.output_dir / "latents" / ui["filename"]
    vae = checkpoint_loader_simple(TINY_SD1)[2]
    raw = vae_encode(load_image("example.png")[0], vae)["samples"]
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        meta = f.metadata()
        stored = f.get_tensor("latent_tensor")
    assert json.loads(meta["prompt"]) == prompt and json.loads(meta["workflow"]) == {"n": 1}
    assert SCALE_KEY not in meta
    torch.testing.assert_close(stored, raw)   # raw VAE latents, as ComfyUI stores them
    (config.input_dir / "roundtrip.latent").write_bytes(path.read_bytes())
    torch.testing.assert_close(load_latent("roundtrip.latent")["samples"], raw)


def test_comfyui_files_new_and_old_format(sd_env):
    _, config = sd_env
    vae_space = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"latent_tensor": vae_space, "latent_format_version_0": torch.tensor([])},
              str(config.input_dir / "comfy.latent"), metadata={"prompt": "{}"})
    torch.testing.assert_close(load_latent("comfy.latent")["samples"], vae_space)   # unchanged, as ComfyUI
    save_file({"latent_tensor": vae_space}, str(config.input_dir / "old.latent"))
    # ComfyUI's pre-marker files held SD1-scaled latents; ComfyUI divides them by 0.18215 on load
    torch.testing.assert_close(load_latent("old.latent")["samples"], vae_space / SD_SCALE)


def test_older_sdflow_files_are_converted(sd_env):
    _, config = sd_env
    raw = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # what sdflow's SaveLatent wrote before the switch: its scaled LATENT divided by the recorded factor
    save_file({"latent_tensor": (raw * SD_SCALE) / SD_SCALE, "latent_format_version_0": torch.tensor([])},
              str(config.input_dir / "sdflow_old.latent"), metadata={SCALE_KEY: repr(SD_SCALE)})
    torch.testing.assert_close(load_latent("sdflow_old.latent")["samples"], raw)
    save_file({"latent_tensor": raw, "latent_format_version_0": torch.tensor([])},
              str(config.input_dir / "sdflow_old2.latent"), metadata={SCALE_KEY: "0.5"})
    torch.testing.assert_close(load_latent("sdflow_old2.latent")["samples"], raw * (0.5 / SD_SCALE))


def test_bad_latent_files_are_refused_naming_node_and_input(sd_env):
    registry, config = sd_env
    (config.input_dir / "broken.latent").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"something": torch.zeros(2)}, str(config.input_dir / "other.latent"))
    for name, why in (("broken.latent", "not a .latent"), ("other.latent", "no latent_tensor")):
        prompt = {"1": {"class_type": "LoadLatent", "inputs": {"latent": name}},
                  "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "x"}}}
        result = Executor(registry).execute(prompt, f"bad-{name}")
        assert result.status == "error" and result.error["node_id"] == "1", result.error
        msg = result.error["exception_message"]
        assert "LoadLatent" in msg and name in msg and why in msg, msg
    missing = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "nope.latent"}},
               "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "x"}}}
    from engine.validation import validate_prompt

    errors = validate_prompt(missing, registry).node_errors
    assert "1" in errors

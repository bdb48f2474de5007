"""The ESRGAN hires fix as people share it (tests/compat/data/upscale, UI and API format): txt2img, then
RealESRGAN x4 through UpscaleModelLoader (the released `RealESRGAN_x4plus.pth`, a pickle holding
`params_ema` in BasicSR's key layout, loaded weights-only), scaled back down by 0.5 and refined by a second
KSampler at denoise 0.5. The models are tiny random-weight ones in the real file layouts; the real spandrel
path runs (see tests/torchvision_ops.py for why the test may define two torchvision operator schemas)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.compat.test_compat_model_nodes import _active_runtime, _shrink  # noqa: F401  (autouse fixture)
from tests.nodes.test_upscale_spandrel import _rrdb_new_layout
from tests.torchvision_ops import require_spandrel

DATA = Path(__file__).parent / "data" / "upscale"


@pytest.fixture(scope="module")
def compat_env(tmp_path_factory):
    import nodes
    from engine.config import RuntimeConfig
    from nodes.models.tiny import write_tiny_checkpoint

    config = RuntimeConfig(data_dir=tmp_path_factory.mktemp("compat-upscale"))
    config.ensure_dirs()
    for sub in ("checkpoints", "upscale_models"):
        (config.models_dir / sub).mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(config.models_dir / "checkpoints" / "v1-5-pruned-emaonly.safetensors", "sd1", seed=31)
    released = config.models_dir / "upscale_models" / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": _rrdb_new_layout(seed=32)}, released)
    registry, _ = nodes.build_registry(config, plugins=False)
    return registry, config


@pytest.mark.parametrize("fmt", ["api", "ui"])
def test_esrgan_hires_fix_runs_unchanged(compat_env, fmt):
    from engine.executor import Executor
    from engine.png_metadata import workflow_from_png
    from engine.ui_workflow import ui_to_api

    require_spandrel()
    registry, config = compat_env
    api = json.loads((DATA / "hires_fix_esrgan_api.json").read_text())
    ui = json.loads((DATA / "hires_fix_esrgan.json").read_text())
    prompt = _shrink(copy.deepcopy(api if fmt == "api" else ui_to_api(ui, registry.object_info())))
    result = Executor(registry).execute(prompt, f"esrgan-hires-{fmt}", extra_data={"extra_pnginfo": {"workflow": ui}})
    assert result.status == "success", (result.error or {}).get("exception_message")
    (img,) = [i for out in result.outputs.values() for i in out.get("images", [])]
    path = config.output_dir / img["subfolder"] / img["filename"]
    with Image.open(path) as im:
        # 64 px, x4 by the ESRGAN, x0.5 by ImageScaleBy: the second pass runs at 128 px
        assert im.size == (128, 128)
        assert np.asarray(im.convert("RGB"), dtype=np.float32).std() > 0
    workflow, saved = workflow_from_png(path)
    assert workflow == ui and saved == prompt

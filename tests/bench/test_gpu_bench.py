"""bench/gpu.py's code path, on the CPU with the tiny models (its figures are for a CUDA machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_runs_on_the_cpu_with_tiny_models():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny",
                           "--steps", "2"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "checkpoint loaded again: no (cache hit)" in out
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("sdflow ", "diffusers ")) and line.split()[1] in ("sd1.5", "sdxl")]
    assert {(r[0], r[1]) for r in rows} == {("sdflow", "sd1.5"), ("sdflow", "sdxl"),
                                            ("diffusers", "sd1.5"), ("diffusers", "sdxl")}
    assert all(float(r[3]) > 0 for r in rows)       # it/s measured on every side


def test_full_size_configs_build_the_real_shapes():
    """The full-size models bench/gpu.py builds: SD1.5's and SDXL's parameter counts (on the meta device,
    so nothing is allocated)."""
    from diffusers import UNet2DConditionModel

    from nodes.models import detect
    from nodes.models.tiny import _clip_model
    with torch.device("meta"):
        sd1 = UNet2DConditionModel.from_config(detect.shipped_config("sd1", "unet"))
        xl = UNet2DConditionModel.from_config(detect.shipped_config("sdxl", "unet"))
        g = _clip_model(detect.shipped_config("sdxl", "text_encoder_2"))
    assert 850e6 < sum(p.numel() for p in sd1.parameters()) < 870e6
    assert 2.5e9 < sum(p.numel() for p in xl.parameters()) < 2.6e9
    assert 690e6 < sum(p.numel() for p in g.parameters()) < 700e6


def test_gpu_bench_dry_run_reports_the_speed_choices():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--dry-run",
                           "--attention", "sliced", "--unet-dtype", "bf16"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("speed ")]
    assert len(lines) == 2 and all("attention sliced" in line and "UNet bfloat16, VAE float32" in line
                                   for line in lines), proc.stdout

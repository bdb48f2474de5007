"""Peak RSS of loading a full-size single-file SD1.5 checkpoint (random weights, fp16 file, fp32 models).

Writes the checkpoint once (default /tmp/sdflow-bench-sd15-fp16.safetensors, about 2 GB), then loads it
in a fresh child process with nodes.models.checkpoint.load_checkpoint and prints the child's RSS after
its imports, its peak during the load, and the models' own bytes. `--tree DIR` loads with another
checkout's code (to compare before/after a change).

Run: .venv/bin/python bench/load_peak.py [--tree /path/to/other/checkout] [--dtype float32|float16]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = Path("/tmp/sdflow-bench-sd15-fp16.safetensors")


def write_checkpoint(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    from nodes.models import detect
    from nodes.models.checkpoint import (
        CLIP_LAYER_DEFAULTS,
        LoadedCheckpoint,
        checkpoint_to_ldm_state_dict,
        scheduler_config,
    )
    from nodes.models.tiny import _clip_model
    from nodes.models.tokenizer import load_tokenizer

    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(detect.shipped_config("sd1", "unet"))
        vae = AutoencoderKL.from_config(detect.shipped_config("sd1", "vae"))
        clip = _clip_model(detect.shipped_config("sd1", "text_encoder"))
    models = []
    for model in (unet, vae, clip):
        model = model.to_empty(device="cpu").half()   # random init of 1 B parameters in fp32 is slow here
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=gen)
        models.append(model)
    ckpt = LoadedCheckpoint(arch="sd1", prediction_type="epsilon", unet=models[0], vae=models[1],
                            text_encoders={"l": models[2]}, tokenizers={"l": load_tokenizer("l")}, source=path,
                            scheduler_config=scheduler_config("sd1", "epsilon"), metadata={},
                            clip_layers=dict(CLIP_LAYER_DEFAULTS["sd1"]))
    state = {k: v.contiguous() for k, v in checkpoint_to_ldm_state_dict(ckpt).items()}
    save_file(state, str(path) + ".part", metadata={"sdflow.random_weights": "true"})
    os.replace(str(path) + ".part", path)


def _status_mib(field: str) -> float:
    """VmHWM/VmRSS of this process from /proc (ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: Path, dtype_name: str) -> None:
    import time

    import torch

    from nodes.models.checkpoint import load_checkpoint
    from nodes.models.memory import module_footprint
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    ckpt = load_checkpoint(path, dtype=getattr(torch, dtype_name))
    load_s = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    models = [ckpt.unet, ckpt.vae, *ckpt.text_encoders.values()]
    model_mib = sum(module_footprint(models).values()) / 2**20
    print(json.dumps({"base_mib": base, "peak_mib": peak, "model_mib": model_mib, "load_s": load_s}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE)
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose loader to measure")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.file, args.dtype)
        return 0
    sys.path.insert(0, str(ROOT))
    if not args.file.exists():
        write_checkpoint(args.file)
    env = {**os.environ, "PYTHONPATH": str(args.tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", "--file", str(args.file), "--dtype", args.dtype],
                         capture_output=True, text=True, env=env, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    file_mib = args.file.stat().st_size / 2**20
    print(f"{args.tree}: file {file_mib:.0f} MiB (fp16), models {r['model_mib']:.0f} MiB ({args.dtype}); "
          f"RSS after imports {r['base_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB, "
          f"load overhead over the models {r['peak_mib'] - r['base_mib'] - r['model_mib']:.0f} MiB; "
          f"load {r['load_s']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

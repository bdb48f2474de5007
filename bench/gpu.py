"""GPU figures in one short run: sdflow vs diffusers' pipeline on the same random-weight checkpoints.

Builds a full-size SD1.5 and an SDXL-shaped checkpoint itself (random weights, no downloads), then prints
for each side: it/s at 512x512 (SD1.5) and 1024x1024 (SDXL), the accelerator's peak memory (on the CPU: peak
RSS), and for sdflow the cache hits when switching SD1.5 -> SDXL -> SD1.5 (the return should load nothing).
Meant for a CUDA machine, under 5 minutes; CI never runs it at full size. `--device cpu --tiny` runs the
same code path with the tiny test models (a test exercises it).

Also prints the speed choices each model ran with (nodes/models/speed.py): attention backend (and whether
SDPA's flash kernel is available), UNet and VAE dtype; --attention / --unet-dtype / --vae-dtype set them as
the server's flags would, and --dry-run prints only those choices (works without CUDA).

Run: .venv/bin/python bench/gpu.py [--device cuda] [--steps 20] [--tiny] [--attention sliced] [--unet-dtype bf16]
     .venv/bin/python bench/gpu.py --device cpu --dry-run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after the offline switches)

NEGATIVE = "text, watermark"


def build_checkpoint(path: Path, arch: str, *, tiny: bool, device: str) -> Path:
    """A random-weight single-file checkpoint of `arch` at full size (or the tiny test size)."""
    from nodes.models.tiny import write_tiny_checkpoint
    if tiny:
        return write_tiny_checkpoint(path, arch)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    from nodes.models import detect
    from nodes.models.checkpoint import (
        CLIP_LAYER_DEFAULTS,
        LoadedCheckpoint,
        checkpoint_to_ldm_state_dict,
        scheduler_config,
    )
    from nodes.models.tiny import MODELSPEC_ARCH, _clip_model
    from nodes.models.tokenizer import load_tokenizer

    # Initialise on the accelerator (the CPU's random init of 2.6 B parameters is slow), store in fp16.
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(detect.shipped_config(arch, "unet"))
        vae = AutoencoderKL.from_config(detect.shipped_config(arch, "vae"))
        encoders = {kind: _clip_model(detect.shipped_config(arch, component))
                    for kind, component in detect.CLIP_COMPONENTS[arch].items()}
    ckpt = LoadedCheckpoint(arch=arch, prediction_type="epsilon", unet=unet, vae=vae, text_encoders=encoders,
                            tokenizers={kind: load_tokenizer(kind) for kind in encoders}, source=path,
                            scheduler_config=scheduler_config(arch, "epsilon"), metadata={},
                            clip_layers=dict(CLIP_LAYER_DEFAULTS[arch]))
    state = {k: v.detach().to("cpu", torch.float16).contiguous()
             for k, v in checkpoint_to_ldm_state_dict(ckpt).items()}
    del ckpt, unet, vae, encoders
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"sdflow.random_weights": "true",
                                          "modelspec.architecture": MODELSPEC_ARCH[arch]})
    return path


def peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def its(stamps: list[float]) -> float:
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return 1.0 / statistics.median(steps) if steps else float("nan")


def speed_plan(device: str, arch: str, size: int, speed: dict[str, Any]) -> str:
    """The attention backend and dtypes sdflow's rule picks for `arch` at `size` (cond+uncond batch 2)."""
    from nodes.models import detect
    from nodes.models.speed import SpeedSettings, attention_shape, choose_attention, free_memory, unet_dtype, vae_dtype

    settings = SpeedSettings(**speed)
    dtype = unet_dtype(device, settings)
    heads, tokens = attention_shape(argparse.Namespace(**detect.shipped_config(arch, "unet")), size // 8, size // 8)
    backend, slices = choose_attention(device, batch=2, heads=heads, tokens=tokens,
                                       element_size=torch.finfo(dtype).bits // 8,
                                       free_bytes=free_memory(torch.device(device)), requested=settings.attention)
    flash = ""
    if device == "cuda" and backend == "sdpa":
        flash = f", SDPA flash kernel {'on' if torch.backends.cuda.flash_sdp_enabled() else 'off'}"
    slice_text = f" (slice {slices})" if slices else ""
    return (f"attention {backend}{slice_text}{flash}, UNet {str(dtype).removeprefix('torch.')}, "
            f"VAE {str(vae_dtype(settings)).removeprefix('torch.')}")


class Sdflow:
    def __init__(self, data_dir: Path, device: str, speed: dict[str, Any] | None = None) -> None:
        import nodes
        from engine.config import RuntimeConfig
        from engine.executor import Executor

        self.cfg = RuntimeConfig(data_dir=data_dir, vram_mode="cpu" if device == "cpu" else "normal",
                                 speed=dict(speed or {}))
        registry, _ = nodes.build_registry(self.cfg, plugins=False)
        self.executor = Executor(registry, config=self.cfg)
        self.workflow = json.loads((ROOT / "workflows" / "txt2img_api.json").read_text())
        self.runs = 0

    def run(self, ckpt: str, size: int, steps: int) -> dict[str, Any]:
        wf = json.loads(json.dumps(self.workflow))
        wf["4"]["inputs"]["ckpt_name"] = ckpt
        wf["5"]["inputs"].update(width=size, height=size)
        wf["3"]["inputs"].update(seed=1000 + self.runs, steps=steps, cfg=7.0, sampler_name="euler",
                                 scheduler="normal")
        wf["6"]["inputs"]["text"] = f"a lighthouse at dusk, run {self.runs}"   # a new prompt: no output hit
        wf["7"]["inputs"]["text"] = NEGATIVE
        wf["9"]["inputs"]["filename_prefix"] = f"gpu_bench_{self.runs}"
        self.runs += 1
        stamps: list[float] = []

        def on_event(event: Any) -> None:
            if event.type == "progress" and event.data.get("node") == "3":
                stamps.append(time.perf_counter())

        before = dict(self.executor.cache.stats())
        t0 = time.perf_counter()
        result = self.executor.execute(wf, f"gpu-bench-{self.runs}", emit=on_event)
        if result.status != "success":
            raise RuntimeError(f"sdflow run failed: {result.error}")
        after = self.executor.cache.stats()
        return {"it_s": its(stamps), "total_s": time.perf_counter() - t0,
                "loaded": "4" in result.executed, "hits": after["hits"] - before["hits"]}


def diffusers_run(path: Path, size: int, steps: int, device: str) -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from nodes.models.checkpoint import load_checkpoint

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    ckpt = load_checkpoint(path, dtype=dtype, vae_dtype=torch.float32)
    scheduler = EulerDiscreteScheduler.from_config(ckpt.scheduler_config, timestep_spacing="linspace")
    common: dict[str, Any] = dict(vae=ckpt.vae, unet=ckpt.unet, scheduler=scheduler)
    pipe: Any
    if ckpt.arch == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder=ckpt.text_encoders["l"], tokenizer=ckpt.tokenizers["l"],
                                         text_encoder_2=ckpt.text_encoders["g"], tokenizer_2=ckpt.tokenizers["g"],
                                         force_zeros_for_empty_prompt=False, **common)
    else:
        pipe = StableDiffusionPipeline(text_encoder=ckpt.text_encoders["l"], tokenizer=ckpt.tokenizers["l"],
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    stamps: list[float] = []

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict) -> dict:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return kwargs

    reset_peak(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe("a lighthouse at dusk", negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
             height=size, width=size, generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step)
    out = {"it_s": its(stamps), "total_s": time.perf_counter() - t0, "peak_mib": peak_memory_mib(device)}
    del pipe, ckpt
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="the tiny test models (for CPU runs and tests)")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--attention", choices=["auto", "sdpa", "sliced", "basic"], default="auto")
    ap.add_argument("--unet-dtype", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--vae-dtype", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--dry-run", action="store_true", help="print the speed choices only, run nothing")
    args = ap.parse_args(argv)
    speed: dict[str, Any] = {"attention": args.attention}
    speed.update({k: v for k, v in (("unet_dtype", args.unet_dtype), ("vae_dtype", args.vae_dtype)) if v})
    sizes = {"sd1": 64, "sdxl": 128} if args.tiny else {"sd1": 512, "sdxl": 1024}
    if args.dry_run:
        for arch in ("sd1", "sdxl"):
            print(f"speed {arch} {sizes[arch]}²: {speed_plan(args.device, arch, sizes[arch], speed)}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --tiny for the code path only")
        return 2
    names = {"sd1": "bench-sd15.safetensors", "sdxl": "bench-sdxl.safetensors"}
    with tempfile.TemporaryDirectory(prefix="sdflow-gpu-bench-") as tmp:
        data_dir = Path(tmp)
        t0 = time.perf_counter()
        paths = {arch: build_checkpoint(data_dir / "models" / "checkpoints" / name, arch, tiny=args.tiny,
                                        device=args.device) for arch, name in names.items()}
        print(f"built {'tiny' if args.tiny else 'full-size'} random-weight SD1.5 and SDXL checkpoints "
              f"in {time.perf_counter() - t0:.1f}s; device {args.device}, {args.steps} steps euler, cfg 7")
        for arch in ("sd1", "sdxl"):
            print(f"speed {arch} {sizes[arch]}²: {speed_plan(args.device, arch, sizes[arch], speed)}")
        side = Sdflow(data_dir, args.device, speed)
        rows = []
        reset_peak(args.device)
        first = side.run(names["sd1"], sizes["sd1"], args.steps)
        sd1_peak = peak_memory_mib(args.device)
        reset_peak(args.device)
        xl = side.run(names["sdxl"], sizes["sdxl"], args.steps)
        xl_peak = peak_memory_mib(args.device)
        back = side.run(names["sd1"], sizes["sd1"], args.steps)
        rows.append(("sdflow", "sd1.5", sizes["sd1"], back["it_s"], sd1_peak))
        rows.append(("sdflow", "sdxl", sizes["sdxl"], xl["it_s"], xl_peak))
        print(f"sdflow first SD1.5 run incl. load: {first['total_s']:.2f}s")
        print(f"switch SD1.5 -> SDXL -> SD1.5: cache hits on the return {back['hits']}, "
              f"checkpoint loaded again: {'yes' if back['loaded'] else 'no (cache hit)'}")
        del side
        if not args.skip_diffusers:
            for arch in ("sd1", "sdxl"):
                result = diffusers_run(paths[arch], sizes[arch], args.steps, args.device)
                rows.append(("diffusers", "sd1.5" if arch == "sd1" else "sdxl", sizes[arch], result["it_s"],
                             result["peak_mib"]))
        peak_name = "VRAM peak" if args.device == "cuda" else "peak RSS"
        print(f"{'side':<10} {'model':<6} {'size':>6} {'it/s':>8} {peak_name:>12}")
        for name, model, size, rate, peak in rows:
            print(f"{name:<10} {model:<6} {size:>5}² {rate:8.2f} {peak:9.0f}MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

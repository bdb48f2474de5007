"""txt2img through sdflow vs the same steps written directly against diffusers, on the same weights.

sdflow side: the API-format workflows/txt2img_api.json (CheckpointLoaderSimple, two CLIPTextEncode,
EmptyLatentImage, KSampler, VAEDecode, SaveImage) run by engine.Executor. diffusers side:
StableDiffusionPipeline (StableDiffusionXLPipeline for --arch sdxl) built from the same checkpoint file,
EulerDiscreteScheduler with timestep_spacing="linspace" (the same math as KSampler euler/normal, see
tests/nodes/test_parity.py), the same seed, noise, prompts, CFG, steps and size, and the image saved
as a PNG (compress level 4, as SaveImage).

Each side runs in its own child process (so each one's peak RSS is its own); the parent alternates
single runs between them (A B A B ...), so load from other processes on the machine hits both alike.
Model loading is excluded on both sides: each child loads, does one untimed warm-up run, then times
runs as a user's second and later prompts would. Every timed run uses a new seed and a new prompt
suffix, so sdflow's output cache cannot skip the text encoding, the sampling or the decode.
sdflow's per-step latent previews are on (as for a user with a browser open).

Prints the median wall time per run for each side, the ratio sdflow/diffusers (target <= 1.05), the
median time per sampler step, each child's peak RSS, and how far the two sides' PNGs differ.

SD3 family (--arch sd3, --arch sd35 for MMDiT-X): a tiny SD3 single file with its three text encoders;
sdflow runs the same graph with EmptySD3LatentImage and KSampler euler/simple on the flow schedule (shift
3), diffusers runs StableDiffusion3Pipeline with FlowMatchEulerDiscreteScheduler given the same
(unshifted) sigmas, T5 at 77 tokens as sdflow encodes it.

Run: .venv/bin/python bench/pipeline.py [--arch sd1|sd2|sdxl|sd3|sd35] [--size 256] [--batch 1] [--steps 20]
                                         [--repeats 7]
     .venv/bin/python bench/pipeline.py --sweep --quick   # the issue's matrix, with ratios against 0.8x
     .venv/bin/python bench/pipeline.py --switches [--with-compile] --size 256 --steps 4 --repeats 3

--switches: per-step time of each speed switch (nodes/models/speed.py) against the diffusers loop, all
children alternating in one run. Measured on the 2-core dev box (tiny SD1, 256², batch 1, 4 steps, 3 runs,
OMP_NUM_THREADS=1), per step vs diffusers over two runs: default 1.01-1.04x, sdpa 1.00-1.02x, sliced 3.2-3.3x,
basic 3.2-3.3x, bf16 UNet 0.86-0.89x, channels_last 1.03x, TorchCompileModel inductor 0.95x (its compile,
tens of seconds, falls in the untimed warm-up). So: SDPA stays the default (sliced/basic only to save
memory); channels_last loses on this CPU and stays off; bf16 and compile win a little here but bf16 changes
results and compile costs a compile per image size, so both only when asked.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CKPT_NAME = "bench-tiny.safetensors"
NEGATIVE = "text, watermark"
BASE_SEED = 156680208700286


SD3_ARCHES = ("sd3", "sd35")


def load_workflow(arch: str = "sd1") -> dict:
    """The txt2img example in API format (workflows/txt2img_api.json; txt2img.json is the UI format);
    for SD3 the same graph with the 16-channel EmptySD3LatentImage."""
    wf = json.loads((ROOT / "workflows" / "txt2img_api.json").read_text())
    if arch in SD3_ARCHES:
        wf["5"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}}
    return wf


def sd3_unshifted_sigmas(steps: int) -> list[float]:
    """KSampler's "simple" schedule on the flow table, before the time shift (what the diffusers
    scheduler takes: it applies the shift itself)."""
    stride = 1000 / steps
    return [(1000 - int(i * stride)) / 1000 for i in range(steps)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def prompt_for(base: str, run: int) -> str:
    return f"{base} run {run}"


# ----------------------------------------------------------------------------------------- children

class SdflowSide:
    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        import nodes
        from engine.config import RuntimeConfig
        from engine.executor import Executor

        speed = json.loads(getattr(args, "speed", None) or "{}")
        compile_backend = speed.pop("compile", None)
        self.cfg = RuntimeConfig(data_dir=data_dir, speed=speed)
        registry, _ = nodes.build_registry(self.cfg, plugins=False)
        self.executor = Executor(registry)
        self.workflow = load_workflow(args.arch)
        if compile_backend:  # KSampler's model through TorchCompileModel
            self.workflow["40"] = {"class_type": "TorchCompileModel",
                                   "inputs": {"model": ["4", 0], "backend": compile_backend}}
            self.workflow["3"]["inputs"]["model"] = ["40", 0]
        self.args = args

    def prompt(self, run: int) -> dict:
        wf = json.loads(json.dumps(self.workflow))
        wf["4"]["inputs"]["ckpt_name"] = CKPT_NAME
        wf["5"]["inputs"].update(width=self.args.size, height=self.args.size, batch_size=self.args.batch)
        ks = wf["3"]["inputs"]
        ks.update(seed=BASE_SEED + run, steps=self.args.steps, cfg=self.args.cfg, sampler_name="euler",
                  scheduler="simple" if self.args.arch in SD3_ARCHES else "normal")
        wf["6"]["inputs"]["text"] = prompt_for(self.workflow["6"]["inputs"]["text"], run)
        wf["7"]["inputs"]["text"] = NEGATIVE
        wf["9"]["inputs"]["filename_prefix"] = f"bench_{run}"
        return wf

    def run(self, run: int) -> dict:
        stamps: list[float] = []

        def on_event(event) -> None:
            if event.type == "progress" and event.data.get("node") == "3":
                stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        result = self.executor.execute(self.prompt(run), f"bench-{run}", emit=on_event)
        total = time.perf_counter() - t0
        if result.status != "success":
            raise RuntimeError(f"sdflow run failed: {result.error}")
        if "3" not in result.executed:
            raise RuntimeError("KSampler came from the cache: the benchmark would not measure sampling")
        image = result.outputs["9"]["images"][0]
        png = self.cfg.output_dir / image["subfolder"] / image["filename"]
        return {"total_s": total, "step_s": [b - a for a, b in zip(stamps, stamps[1:])], "png": str(png)}


class DiffusersSide:
    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        from nodes.models.checkpoint import load_checkpoint

        self.torch = torch
        self.args = args
        self.base_prompt = load_workflow()["6"]["inputs"]["text"]
        self.out_dir = data_dir / "diffusers_out"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if args.arch in SD3_ARCHES:
            self._sd3_pipeline(data_dir)
            return
        ckpt = load_checkpoint(data_dir / "models" / "checkpoints" / CKPT_NAME)
        scheduler = EulerDiscreteScheduler.from_config(ckpt.scheduler_config, timestep_spacing="linspace")
        common = dict(vae=ckpt.vae, unet=ckpt.unet, scheduler=scheduler)
        if ckpt.arch == "sdxl":
            self.pipe = StableDiffusionXLPipeline(
                text_encoder=ckpt.text_encoders["l"], tokenizer=ckpt.tokenizers["l"],
                text_encoder_2=ckpt.text_encoders["g"], tokenizer_2=ckpt.tokenizers["g"],
                force_zeros_for_empty_prompt=False, **common)
        else:
            text_encoder = ckpt.text_encoders["l" if ckpt.arch == "sd1" else "h"]
            tokenizer = ckpt.tokenizers["l" if ckpt.arch == "sd1" else "h"]
            self.pipe = StableDiffusionPipeline(text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None,
                                                feature_extractor=None, requires_safety_checker=False, **common)
        self.pipe.set_progress_bar_config(disable=True)

    def _sd3_pipeline(self, data_dir: Path) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        from nodes.models.sd3 import load_sd3_checkpoint
        from nodes.models.sd3_handles import t5_tokenizer_for
        from nodes.models.tokenizer import load_tokenizer

        ckpt = load_sd3_checkpoint(data_dir / "models" / "checkpoints" / CKPT_NAME)
        enc = ckpt.text_encoders
        self.pipe = StableDiffusion3Pipeline(
            transformer=ckpt.transformer, vae=ckpt.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=enc["l"], tokenizer=load_tokenizer("l"), text_encoder_2=enc["g"],
            tokenizer_2=load_tokenizer("g"), text_encoder_3=enc["t5"], tokenizer_3=t5_tokenizer_for(enc["t5"]))
        self.pipe.set_progress_bar_config(disable=True)

    def run(self, run: int) -> dict:
        if self.args.arch in SD3_ARCHES:
            return self._run_sd3(run)
        torch = self.torch
        seed = BASE_SEED + run
        stamps: list[float] = []

        def on_step(pipe, i, t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        t0 = time.perf_counter()
        # ComfyUI's noise (CPU generator, seed) and start point sqrt(1 + sigma_max^2); the pipeline
        # multiplies `latents` by init_noise_sigma (= sigma_max for "linspace"), so divide that out.
        gen = torch.Generator().manual_seed(seed)
        latent_hw = self.args.size // 8
        noise = torch.randn((self.args.batch, 4, latent_hw, latent_hw), generator=gen)
        sched = self.pipe.scheduler
        sched.set_timesteps(self.args.steps)
        sigma_max = float(sched.sigmas.max())
        latents = noise * (math.sqrt(1 + sigma_max**2) / float(sched.init_noise_sigma))
        with torch.inference_mode():
            image = self.pipe(prompt_for(self.base_prompt, run), negative_prompt=NEGATIVE,
                              num_inference_steps=self.args.steps, guidance_scale=self.args.cfg,
                              height=self.args.size, width=self.args.size, latents=latents,
                              num_images_per_prompt=self.args.batch,
                              generator=torch.Generator().manual_seed(seed), output_type="pil",
                              callback_on_step_end=on_step).images[0]
        png = self.out_dir / f"bench_{run}.png"
        image.save(png, compress_level=4)
        total = time.perf_counter() - t0
        return {"total_s": total, "step_s": [b - a for a, b in zip(stamps, stamps[1:])], "png": str(png)}


    def _run_sd3(self, run: int) -> dict:
        torch = self.torch
        seed = BASE_SEED + run
        stamps: list[float] = []

        def on_step(pipe, i, t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        t0 = time.perf_counter()
        # KSampler's noise (CPU generator, seed); at sigma 1 the flow start point is the noise itself.
        latent_hw = self.args.size // 8
        noise = torch.randn((1, 16, latent_hw, latent_hw), generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            image = self.pipe(prompt_for(self.base_prompt, run), negative_prompt=NEGATIVE,
                              sigmas=sd3_unshifted_sigmas(self.args.steps), guidance_scale=self.args.cfg,
                              height=self.args.size, width=self.args.size, latents=noise, max_sequence_length=77,
                              output_type="pil", callback_on_step_end=on_step).images[0]
        png = self.out_dir / f"bench_{run}.png"
        image.save(png, compress_level=4)
        total = time.perf_counter() - t0
        return {"total_s": total, "step_s": [b - a for a, b in zip(stamps, stamps[1:])], "png": str(png)}


def child_main(side: str, args: argparse.Namespace) -> None:
    """Load, warm up, then answer {"run": i} lines on stdin with one JSON result line each."""
    data_dir = Path(args.data_dir)
    t0 = time.perf_counter()
    runner = SdflowSide(args, data_dir) if side == "sdflow" else DiffusersSide(args, data_dir)
    runner.run(-1)  # sdflow loads the checkpoint here; both sides warm up their kernels
    print(json.dumps({"ready": True, "setup_s": time.perf_counter() - t0, "rss_mib": peak_rss_mib()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if "run" not in cmd:
            break
        print(json.dumps(runner.run(int(cmd["run"]))), flush=True)
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}), flush=True)


# ------------------------------------------------------------------------------------------- parent

class Child:
    def __init__(self, side: str, argv: list[str]) -> None:
        self.side = side
        side = side.split(":")[0]   # "sdflow:<switch>" children are sdflow children given --speed
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", side, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.ready = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.side} child exited (rc {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, i: int) -> dict:
        self.proc.stdin.write(json.dumps({"run": i}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def finish(self) -> dict:
        self.proc.stdin.write("{}\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait()
        return out


def png_diff(a: str, b: str) -> int:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    return int(np.abs(x - y).max())


def parent_main(args: argparse.Namespace) -> dict:
    from nodes.models.tiny import write_tiny_checkpoint
    from nodes.models.tiny_sd3 import write_tiny_sd3_checkpoint

    with tempfile.TemporaryDirectory(prefix="sdflow-bench-") as tmp:
        data_dir = Path(tmp)
        if args.arch in SD3_ARCHES:
            write_tiny_sd3_checkpoint(data_dir / "models" / "checkpoints" / CKPT_NAME, sd35=args.arch == "sd35")
        else:
            write_tiny_checkpoint(data_dir / "models" / "checkpoints" / CKPT_NAME, args.arch)
        argv = ["--arch", args.arch, "--size", str(args.size), "--steps", str(args.steps), "--cfg", str(args.cfg),
                "--batch", str(args.batch), "--data-dir", str(data_dir)]
        print(f"tiny {args.arch} checkpoint (random weights), {args.size}x{args.size} batch {args.batch}, "
              f"{args.steps} steps euler/{'simple (flow)' if args.arch in SD3_ARCHES else 'normal'}, "
              f"cfg {args.cfg}, {args.repeats} timed runs per side (alternating), model load excluded")
        sides = {name: Child(name, argv) for name in ("sdflow", "diffusers")}
        results: dict[str, list[dict]] = {name: [] for name in sides}
        for i in range(args.repeats):
            order = ("sdflow", "diffusers") if i % 2 == 0 else ("diffusers", "sdflow")
            for name in order:
                results[name].append(sides[name].run(i))
        finals = {name: child.finish() for name, child in sides.items()}

        med = {name: statistics.median(r["total_s"] for r in rs) for name, rs in results.items()}
        step = {name: statistics.median(s for r in rs for s in r["step_s"]) for name, rs in results.items()}
        print(f"{'side':<10} {'median run':>11} {'min run':>9} {'per step':>10} {'setup':>8} {'peak RSS':>10}")
        for name in sides:
            runs = [r["total_s"] for r in results[name]]
            print(f"{name:<10} {med[name] * 1e3:9.1f}ms {min(runs) * 1e3:7.1f}ms {step[name] * 1e3:8.2f}ms "
                  f"{sides[name].ready['setup_s']:7.2f}s {finals[name]['peak_rss_mib']:7.0f}MiB")
        ratio = med["sdflow"] / med["diffusers"]
        verdict = "OK" if ratio <= 1.05 else "MISSED"
        print(f"ratio sdflow/diffusers (median run): {ratio:.3f}  (target <= 1.05: {verdict})")
        print(f"ratio sdflow/diffusers (per step):   {step['sdflow'] / step['diffusers']:.3f}")
        fastest = {name: min(r["total_s"] for r in rs) for name, rs in results.items()}
        print(f"ratio sdflow/diffusers (fastest run): {fastest['sdflow'] / fastest['diffusers']:.3f}  "
              "(less sensitive to load from other processes)")
        diffs = [png_diff(a["png"], b["png"]) for a, b in zip(results["sdflow"], results["diffusers"])]
        print(f"max 8-bit pixel difference between the two sides' PNGs: {max(diffs)} "
              "(ComfyUI truncates to 8 bits, diffusers rounds: up to 1 is expected)")
        first = {name: sides[name].ready["setup_s"] for name in sides}
        peak = {name: finals[name]["peak_rss_mib"] for name in sides}
        return {"arch": args.arch, "size": args.size, "batch": args.batch,
                "step": step["sdflow"] / step["diffusers"], "first": first["sdflow"] / first["diffusers"],
                "rss": peak["sdflow"] / peak["diffusers"]}


# The matrix: SD1 at 256² and 512², batch 1 and 4, and an SDXL-shaped model.
SWEEP = [("sd1", 256, 1), ("sd1", 256, 4), ("sd1", 512, 1), ("sd1", 512, 4), ("sdxl", 256, 1)]
TARGET = 0.8


def sweep_main(args: argparse.Namespace) -> None:
    rows = []
    for arch, size, batch in SWEEP:
        run_args = argparse.Namespace(**{**vars(args), "arch": arch, "size": size, "batch": batch})
        rows.append(parent_main(run_args))
        print()
    print(f"sdflow/diffusers ratios (target <= {TARGET} for step time and peak RSS)")
    print(f"{'model':<6} {'size':>5} {'batch':>5} {'step':>7} {'first run':>10} {'peak RSS':>9}  held")
    for r in rows:
        held = [name for name in ("step", "rss") if r[name] <= TARGET]
        print(f"{r['arch']:<6} {r['size']:>4}² {r['batch']:>5} {r['step']:7.3f} {r['first']:10.3f} {r['rss']:9.3f}  "
              f"{', '.join(held) or 'neither'}")


# The speed switches of nodes/models/speed.py (RuntimeConfig.speed; "compile": a TorchCompileModel node).
SWITCHES: dict[str, dict] = {
    "default": {},
    "sdpa": {"attention": "sdpa"},
    "sliced": {"attention": "sliced"},
    "basic": {"attention": "basic"},
    "bf16-unet": {"unet_dtype": "bf16"},
    "channels-last": {"channels_last": True},
}


def switches_main(args: argparse.Namespace) -> None:
    """Per-step time of each speed switch against the hand-written diffusers loop, in one run (children
    alternate, so machine load hits all alike)."""
    from nodes.models.tiny import write_tiny_checkpoint

    switches = dict(SWITCHES)
    if args.with_compile:
        switches["compile-inductor"] = {"compile": "inductor"}
    with tempfile.TemporaryDirectory(prefix="sdflow-bench-") as tmp:
        data_dir = Path(tmp)
        write_tiny_checkpoint(data_dir / "models" / "checkpoints" / CKPT_NAME, args.arch)
        argv = ["--arch", args.arch, "--size", str(args.size), "--steps", str(args.steps), "--cfg", str(args.cfg),
                "--batch", str(args.batch), "--data-dir", str(data_dir)]
        print(f"speed switches: tiny {args.arch}, {args.size}x{args.size} batch {args.batch}, {args.steps} steps, "
              f"{args.repeats} timed runs per side (alternating), model load and warm-up excluded")
        sides = {"diffusers": Child("diffusers", argv)}
        for name, speed in switches.items():
            sides[f"sdflow:{name}"] = Child(f"sdflow:{name}", [*argv, "--speed", json.dumps(speed)])
        steps: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        for i in range(args.repeats):
            for name in (names if i % 2 == 0 else names[::-1]):
                steps[name].extend(sides[name].run(i)["step_s"])
        for child in sides.values():
            child.finish()
        ref = statistics.median(steps["diffusers"])
        print(f"{'side':<24} {'per step':>10} {'vs diffusers':>13}")
        for name in names:
            med = statistics.median(steps[name])
            print(f"{name:<24} {med * 1e3:8.2f}ms {med / ref:12.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["sd1", "sd2", "sdxl", *SD3_ARCHES], default="sd1")
    ap.add_argument("--size", type=int, default=256, help="image width and height in pixels (multiple of 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="4 steps, 2 timed runs per side (this 2-core machine)")
    ap.add_argument("--sweep", action="store_true", help="the whole matrix: SD1 256²/512² x batch 1/4, SDXL")
    ap.add_argument("--switches", action="store_true",
                    help="per-step time of each speed switch (attention, bf16, channels_last) vs diffusers")
    ap.add_argument("--with-compile", action="store_true", help="with --switches: also TorchCompileModel inductor")
    ap.add_argument("--speed", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["sdflow", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = min(args.steps, 4), min(args.repeats, 2)
    if args.child:
        child_main(args.child, args)
    elif args.sweep:
        sweep_main(args)
    elif args.switches:
        switches_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

"""`sdflow` command line: serve, run, validate, nodes, make-demo-model.

This is the composition root: it builds the RuntimeConfig, imports the SD node set (`nodes`) lazily,
adds `--nodes-module` modules, and hands everything to the server or the executor.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from engine.config import RuntimeConfig
from engine.registry import Registry

log = logging.getLogger("sdflow")
MB = 1024 * 1024


# ---- shared options --------------------------------------------------------------------------------

def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("directories and nodes")
    g.add_argument("--data-dir", default="data", help="queue/history database, and default parent of the "
                                                     "other directories (default ./data)")
    g.add_argument("--models-dir", help="model folders (default <data-dir>/models)")
    g.add_argument("--input-dir", help="uploaded/input images (default <data-dir>/input)")
    g.add_argument("--output-dir", help="generated images (default <data-dir>/output)")
    g.add_argument("--temp-dir", help="previews and temporary images (default <data-dir>/temp)")
    g.add_argument("--user-dir", help="saved workflows and settings (default <data-dir>/user)")
    g.add_argument("--extra-model-paths-config", action="append", default=[], metavar="YAML",
                   help="a ComfyUI extra_model_paths.yaml (repeatable)")
    g.add_argument("--cache-budget", type=float, metavar="MB",
                   help="byte budget of the output/model cache per device, in MB (default: automatic)")
    g.add_argument("--max-image-pixels", type=float, default=64, metavar="MEGAPIXELS",
                   help="largest image file that uploads and LoadImage accept, checked from its header "
                        "before decoding (default 64 = 8192x8192; 0 = no limit)")
    g.add_argument("--memory-budget", type=float, metavar="MB",
                   help="refuse prompts whose estimated memory for one node exceeds this (default: 80%% of "
                        "the GPU's memory, or of system RAM without one)")
    vram = g.add_mutually_exclusive_group()   # ComfyUI's switches, with its meanings
    for flag, mode, text in (
            ("--gpu-only", "gpu-only", "load and keep every model whole on the GPU"),
            ("--highvram", "highvram", "load models whole on the GPU, never split them"),
            ("--normalvram", "normal", "the default: whole models where they fit, split the others"),
            ("--lowvram", "lowvram", "split models that do not fit the GPU's free memory; stream the rest"),
            ("--novram", "novram", "keep no weights resident on the GPU; stream every block per step"),
            ("--cpu", "cpu", "compute on the CPU even where a GPU exists")):
        vram.add_argument(flag, dest="vram_mode", action="store_const", const=mode, help=text)
    _add_speed_args(p)
    g.add_argument("--legacy-cpu-noise-seed", action="store_true",
                   help="seed per-step noise of ancestral/stochastic samplers on the CPU with the plain seed, as "
                        "ComfyUI did before PR #11528, to reproduce older CPU-made images (default: seed + 1 "
                        "on the CPU, as ComfyUI does now); env SDFLOW_LEGACY_CPU_NOISE_SEED=1 does the same")
    g.add_argument("--nodes-module", action="append", default=[], metavar="MODULE",
                   help="import MODULE and register every node declared in it (repeatable)")
    g.add_argument("--no-builtin-nodes", action="store_true",
                   help="do not load the built-in Stable Diffusion nodes or installed plugins")
    g.add_argument("--custom-nodes", action="append", default=[], metavar="DIR",
                   help="load ComfyUI custom-node packs from DIR (repeatable; default <data-dir>/custom_nodes, "
                        "plus custom_nodes entries of extra_model_paths.yaml). Packs are arbitrary code")
    g.add_argument("--disable-all-custom-nodes", action="store_true", help="load no custom-node packs")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    """ComfyUI's attention and precision switches (see nodes/models/speed.py); none given = automatic."""
    g = p.add_argument_group("speed")
    attn = g.add_mutually_exclusive_group()
    attn.add_argument("--use-pytorch-cross-attention", dest="attention", action="store_const", const="sdpa",
                      help="PyTorch scaled_dot_product_attention everywhere (flash/memory-efficient kernels on CUDA)")
    attn.add_argument("--use-split-cross-attention", dest="attention", action="store_const", const="sliced",
                      help="sliced attention: a few heads at a time, for large images where memory is short")
    attn.add_argument("--use-quad-cross-attention", dest="attention", action="store_const", const="sliced",
                      help="same as --use-split-cross-attention here (the memory-saving attention we have)")
    fp = g.add_mutually_exclusive_group()
    fp.add_argument("--force-fp32", dest="force_dtype", action="store_const", const="fp32",
                    help="every model in float32")
    fp.add_argument("--force-fp16", dest="force_dtype", action="store_const", const="fp16",
                    help="the UNet and text encoders in float16")
    unet = g.add_mutually_exclusive_group()
    for name in ("fp32", "fp16", "bf16"):
        unet.add_argument(f"--{name}-unet", dest="unet_dtype", action="store_const", const=name,
                          help=f"the UNet in {name} (bf16 needs CUDA capability 8+, or the CPU)")
    vae = g.add_mutually_exclusive_group()
    for name in ("fp32", "fp16", "bf16"):
        vae.add_argument(f"--{name}-vae", dest="vae_dtype", action="store_const", const=name,
                         help=f"the VAE in {name}" + ("" if name == "fp32" else
                                                       " (a decode that overflows is redone in fp32)"))
    g.add_argument("--channels-last", action="store_true", help="UNet in channels_last memory format")


def speed_options(args: argparse.Namespace) -> dict[str, Any]:
    speed: dict[str, Any] = {}
    if getattr(args, "attention", None):
        speed["attention"] = args.attention
    forced = getattr(args, "force_dtype", None)
    unet = getattr(args, "unet_dtype", None) or forced
    if unet:
        speed["unet_dtype"] = unet
    vae = getattr(args, "vae_dtype", None) or ("fp32" if forced == "fp32" else None)
    if vae:
        speed["vae_dtype"] = vae
    if getattr(args, "channels_last", False):
        speed["channels_last"] = True
    return speed


def make_config(args: argparse.Namespace) -> RuntimeConfig:
    budget = None
    if args.cache_budget is not None:
        if args.cache_budget <= 0:
            raise SystemExit("--cache-budget must be positive")
        nbytes = int(args.cache_budget * MB)
        budget = {"cpu": nbytes, "cuda": nbytes, "mps": nbytes}
    config = RuntimeConfig(data_dir=Path(args.data_dir), models_dir=_opt_path(args.models_dir),
                           input_dir=_opt_path(args.input_dir), output_dir=_opt_path(args.output_dir),
                           temp_dir=_opt_path(args.temp_dir), user_dir=_opt_path(args.user_dir),
                           extra_model_paths=[Path(p) for p in args.extra_model_paths_config],
                           cache_budget_bytes=budget)
    config.vram_mode = getattr(args, "vram_mode", None) or "normal"
    config.speed = speed_options(args)
    config.legacy_cpu_noise_seed = bool(getattr(args, "legacy_cpu_noise_seed", False))
    if getattr(args, "memory_budget", None) is not None:
        if args.memory_budget <= 0:
            raise SystemExit("--memory-budget must be positive")
        config.work_budget_bytes = int(args.memory_budget * MB)
    if getattr(args, "max_image_pixels", None) is not None:
        if args.max_image_pixels < 0:
            raise SystemExit("--max-image-pixels must not be negative")
        config.max_image_pixels = int(args.max_image_pixels * 1024 * 1024) or None
    config.ensure_dirs()
    return config


def _opt_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def build_registry(args: argparse.Namespace, config: RuntimeConfig) -> tuple[Registry, Any]:
    if args.no_builtin_nodes:
        registry, catalog = Registry(), None
    else:
        from nodes import build_registry as build_sd_registry  # the SD domain, loaded only here
        registry, catalog = build_sd_registry(config)
        assert config.input_dir is not None  # RuntimeConfig.__post_init__ fills every directory
        install_example_inputs(config.input_dir)
        if not getattr(args, "disable_all_custom_nodes", False):
            load_custom_node_packs(registry, catalog, getattr(args, "custom_nodes", []))
    for name in args.nodes_module:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise SystemExit(f"--nodes-module {name}: cannot import: {e}") from None
        added = registry.add(module)
        if not added:
            log.warning("--nodes-module %s declares no nodes", name)
    return registry, catalog


def load_custom_node_packs(registry: Registry, catalog: Any, given: Sequence[str]) -> None:
    """ComfyUI custom-node packs into `registry`, with the import report on stderr (and kept for the server)."""
    from nodes.comfy_compat import custom_node_folders, load_custom_nodes

    folders = custom_node_folders(catalog.folders, given)
    packs = load_custom_nodes(registry, folders)
    registry.custom_packs = packs  # type: ignore[attr-defined]
    if packs:   # Ray workers load the same packs from the same folders
        registry.custom_node_dirs = [str(p.resolve()) for p in folders]  # type: ignore[attr-defined]
    if packs:
        print("custom nodes:", file=sys.stderr)
    for pack in packs:
        if pack.ok:
            print(f"  {pack.seconds:6.2f}s  {pack.name}: {len(pack.nodes)} node(s)", file=sys.stderr)
        else:
            print(f"  {pack.seconds:6.2f}s  {pack.name}: IMPORT FAILED: {pack.error}", file=sys.stderr)
        for skipped in pack.skipped:
            print(f"           {pack.name}: skipped {skipped}", file=sys.stderr)
    sys.stderr.flush()


EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "workflows" / "inputs"
EXAMPLES_MARKER = ".sdflow-example-inputs"


def install_example_inputs(input_dir: Path, source: Path = EXAMPLE_INPUTS) -> list[str]:
    """Copy the example workflows' input images into the input folder, once: the marker file remembers
    it, so an image the user deleted is not brought back and one they replaced is never overwritten."""
    import shutil

    marker = Path(input_dir) / EXAMPLES_MARKER
    if marker.exists() or not source.is_dir():
        return []
    copied = []
    for image in sorted(source.glob("*.png")):
        target = Path(input_dir) / image.name
        if not target.exists():
            shutil.copyfile(image, target)
            copied.append(image.name)
    try:
        marker.write_text("example input images were copied here once; delete this file to copy them again\n")
    except OSError:
        log.warning("cannot write %s", marker)
    return copied


# ---- serve -----------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .app import create_app
    from .security import is_loopback_bind
    from .state import ServerOptions

    config = make_config(args)
    registry, catalog = build_registry(args, config)
    token = args.auth_token or os.environ.get("SDFLOW_AUTH_TOKEN") or None
    if args.max_upload_size <= 0:
        raise SystemExit("--max-upload-size must be positive")
    options = ServerOptions(host=args.host, port=args.port, auth_token=token, allowed_origins=args.allow_origin,
                            max_upload_bytes=int(args.max_upload_size * MB),
                            web_root=_web_root(args), preview_method=args.preview_method)
    if not is_loopback_bind(args.host) and not token:
        log.warning("listening on %s without --auth-token: anyone who can reach this port can run workflows",
                    args.host)
    from engine.store import StoreUnusable
    try:
        app = create_app(config, registry, catalog, options=options,
                         worker_factory=_ray_backend(args, config, registry))
    except StoreUnusable as e:
        raise SystemExit(f"sdflow: {e}") from None
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"sdflow {len(registry)} node types; data in {config.data_dir.resolve()}", flush=True)
    for line in startup_lines(args.host, args.port, catalog):
        print(line, flush=True)
    from .state import STATE
    if app[STATE].store.problem:
        print(f"WARNING: {app[STATE].store.problem}", file=sys.stderr, flush=True)
    print(f"sdflow serving on http://{shown}:{args.port}" + ("  (auth token required)" if token else ""), flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None,
                access_log=logging.getLogger("aiohttp.access") if args.verbose else None)
    return 0


DEMO_NOTE = ("note: the only checkpoint is the demo model {name}: it has random weights, so every image it "
             "makes is noise. Put a real checkpoint (.safetensors) in {folder} to make pictures.")


def startup_lines(host: str, port: int, catalog: Any) -> list[str]:
    """What `serve` tells a person at start: the demo model's limits, where to point the browser, how
    to stop."""
    lines = []
    demo = _demo_only(catalog)
    if demo:
        lines.append(DEMO_NOTE.format(name=demo, folder="models/checkpoints"))
    browse = "127.0.0.1" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
    lines.append(f"open http://{browse}:{port} in your browser; press Ctrl+C to stop")
    return lines


def _demo_only(catalog: Any) -> str | None:
    if catalog is None:
        return None
    try:
        from nodes.models.tiny import DEMO_NAME
        files = list(catalog.list_files("checkpoints") or []) + list(catalog.list_files("diffusers") or [])
    except Exception:   # an odd catalog must not stop the server from starting
        return None
    return DEMO_NAME if files and all(f.rsplit("/", 1)[-1] == DEMO_NAME for f in files) else None


def _ray_backend(args: argparse.Namespace, config: RuntimeConfig, registry: Registry) -> Any:
    """`--backend ray`: start or join the cluster and its workers now, so one that cannot come up is
    reported before the server listens. None for the embedded executor."""
    if args.backend != "ray":
        return None
    from .ray_backend import RayBackend, RayBackendError, RayCluster, WorkerSpec

    if args.workers is not None and args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    spec = WorkerSpec.from_config(config, builtin_nodes=not args.no_builtin_nodes, node_modules=args.nodes_module,
                                  custom_nodes=getattr(registry, "custom_node_dirs", None))
    try:
        cluster = RayCluster(spec, address=args.ray_address, workers=args.workers, data_dir=config.data_dir)
    except RayBackendError as exc:
        raise SystemExit(f"--backend ray: {exc}") from None
    for problem in cluster.problems:
        print(f"sdflow: Ray worker not started: {problem}", file=sys.stderr, flush=True)
    up = ", ".join(f"{s.name} (pid {s.info.get('pid')} on {s.info.get('host')})" for s in cluster.slots)
    print(f"sdflow Ray backend: {len(cluster.slots)} worker(s): {up}", flush=True)
    token = os.environ.get("RAY_AUTH_TOKEN_PATH")
    print(f"sdflow Ray cluster at {cluster.address}; more machines join with: "
          + (f"RAY_AUTH_TOKEN_PATH=<a copy of {token}> " if token else "")
          + f"sdflow worker --ray-address {cluster.address}", flush=True)
    return RayBackend.factory(cluster, config, registry)


def cmd_worker(args: argparse.Namespace) -> int:
    from .ray_backend import RayBackendError, run_worker_node

    try:
        return run_worker_node(args.ray_address, args.workers)
    except RayBackendError as exc:
        raise SystemExit(str(exc)) from None


def _web_root(args: argparse.Namespace) -> Path | None:
    if args.frontend == "comfyui":
        if args.web_root:
            raise SystemExit("--frontend comfyui and --web-root exclude each other")
        from .comfy_frontend import FrontendMissing, comfyui_web_root
        try:
            return comfyui_web_root()
        except FrontendMissing as e:
            raise SystemExit(str(e)) from None
    return Path(args.web_root) if args.web_root else None


# ---- workflows from files ----------------------------------------------------------------------------

def load_prompt(path: str, registry: Registry) -> tuple[dict, dict]:
    """(API prompt, extra_pnginfo) from a .json (API or UI format) or a PNG carrying either."""
    from engine.png_metadata import load_workflow_file
    from engine.ui_workflow import ui_to_api

    try:
        kind, doc = load_workflow_file(path)
    except OSError as e:
        raise SystemExit(f"cannot read {path}: {e}") from None
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None
    if kind == "ui":
        try:
            return ui_to_api(doc, registry.object_info()), {"workflow": doc}
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise SystemExit(f"{path}: cannot convert the UI workflow: {e}") from None
    return doc, {}


def apply_sets(prompt: dict, sets: Sequence[str], registry: Registry | None = None) -> None:
    """`--set NODE.INPUT=VALUE`: NODE is a node id or a node title; VALUE is JSON, or else a plain string."""
    from engine.prompt import apply_overrides

    overrides = {}
    for item in sets:
        target, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected NODE.INPUT=VALUE")
        try:
            overrides[target] = json.loads(raw)
        except ValueError:
            overrides[target] = raw
    try:
        updated = apply_overrides(prompt, overrides, registry)
    except ValueError as exc:
        raise SystemExit(f"--set: {exc}") from None
    prompt.clear()
    prompt.update(updated)


def format_errors(result: Any) -> str:
    lines = []
    if result.error:
        err = result.error
        lines.append(f"error: {err.get('message', '')}" + (f" ({err['details']})" if err.get("details") else ""))
    for nid, entry in (result.node_errors or {}).items():
        for e in entry.get("errors", []):
            lines.append(f"  node {nid} ({entry.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


def prepare(args: argparse.Namespace):
    """What `run` and `validate` share: the workflow loaded, `--set` applied, validated, problems printed.
    Returns (config, registry, prompt, pnginfo, validation result)."""
    from engine.validation import validate_prompt

    config = make_config(args)
    registry, _ = build_registry(args, config)
    prompt, pnginfo = load_prompt(args.workflow, registry)
    apply_sets(prompt, args.set, registry)
    result = validate_prompt(prompt, registry)
    if not result.ok or result.node_errors:
        print(format_errors(result), file=sys.stderr)
    return config, registry, prompt, pnginfo, result


def cmd_validate(args: argparse.Namespace) -> int:
    _, _, prompt, _, result = prepare(args)
    if not result.ok:
        return 1
    print(f"ok: {len(prompt)} nodes, outputs {', '.join(result.outputs)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Lists the node classes and model files a workflow needs that are missing here; runs nothing."""
    from engine.check import check_prompt

    config = make_config(args)
    registry, catalog = build_registry(args, config)
    prompt, _ = load_prompt(args.workflow, registry)
    report = check_prompt(prompt, registry, catalog.model_locator(registry) if catalog is not None else None)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


class ProgressPrinter:
    """Prints run events: one line per node, and for each node that reports steps (samplers, chunked VAE
    decodes, tiled upscales) a tqdm bar with rate and ETA. Bars are drawn only on a terminal; piped
    output gets one summary line when a node's steps are done (no redraws in a log file)."""

    def __init__(self, prompt: dict, stream=sys.stderr) -> None:
        self.prompt = prompt
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.bar: Any = None
        self.bar_node: Any = None
        self.started: dict[Any, float] = {}

    def _name(self, nid: Any) -> str:
        node = self.prompt.get(str(nid), {})
        title = (node.get("_meta") or {}).get("title")
        return f"{nid} {title or node.get('class_type', '?')}"

    def _end_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.bar_node = None, None

    def _progress(self, node: Any, value: float, total: float) -> None:
        value, total = _whole(value), _whole(total)
        if not self.tty:
            start = self.started.setdefault(node, time.monotonic())
            if value >= total:
                took = time.monotonic() - start
                rate = f", {value / took:.2f} it/s" if took > 0 else ""
                self.stream.write(f"  {self._name(node)}: {value}/{total} in {took:.2f}s{rate}\n")
                self.started.pop(node, None)
            return
        from tqdm import tqdm

        if self.bar is None or self.bar_node != node or self.bar.total != total:
            self._end_bar()
            self.bar = tqdm(total=total, desc=f"  {self._name(node)}", unit="it", file=self.stream,
                            dynamic_ncols=True, leave=True)
            self.bar_node = node
        self.bar.update(max(value - self.bar.n, 0))

    def __call__(self, event: Any) -> None:
        t, d = event.type, event.data
        if t == "execution_cached" and d.get("nodes"):
            self.stream.write(f"cached: {len(d['nodes'])} node(s) ({', '.join(map(str, d['nodes']))})\n")
        elif t == "executing" and d.get("node") is not None:
            self._end_bar()
            self.stream.write(f"> {self._name(d['node'])}\n")
        elif t == "progress":
            self._progress(d.get("node"), float(d.get("value", 0)), float(d.get("max", 1) or 1))
        elif t == "execution_error":
            self._end_bar()
            self.stream.write(f"error in node {d.get('node_id')} ({d.get('node_type')}): "
                              f"{d.get('exception_type')}: {d.get('exception_message')}\n")
        elif t == "execution_interrupted":
            self._end_bar()
            self.stream.write("interrupted\n")
        elif t in ("execution_success", "executing"):
            self._end_bar()
        self.stream.flush()


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def output_paths(config: RuntimeConfig, outputs: dict) -> list[str]:
    from engine.paths import UnsafePathError, contained_path

    paths = []
    for ui in outputs.values():
        for key in ("images", "gifs", "audio", "files"):
            for item in ui.get(key, []) if isinstance(ui, dict) else []:
                if not isinstance(item, dict) or "filename" not in item:
                    continue
                base = cast(Path, getattr(config, f"{item.get('type', 'output')}_dir", config.output_dir))
                try:
                    paths.append(str(contained_path(base, item.get("subfolder", "") or "", item["filename"])))
                except UnsafePathError:
                    continue
    return paths


def cmd_run(args: argparse.Namespace) -> int:
    from engine.executor import Executor

    config, registry, prompt, pnginfo, result = prepare(args)
    if not result.ok:
        return 1
    executor = Executor(registry, config=config)
    printer = ProgressPrinter(prompt)
    started = time.monotonic()
    try:
        run = executor.execute(prompt, str(uuid.uuid4()), outputs=result.outputs,
                               extra_data={"extra_pnginfo": pnginfo} if pnginfo else {}, emit=printer)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    took = time.monotonic() - started
    for path in output_paths(config, run.outputs):
        print(path)
    if not args.quiet:
        for nid, ui in run.outputs.items():
            for key, value in ui.items():
                if key != "images":
                    print(f"node {nid} {key}: {json.dumps(value, default=str)[:400]}", file=sys.stderr)
    print(f"{run.status} in {took:.2f}s ({len(run.executed)} executed, {len(run.cached)} cached)", file=sys.stderr)
    return 0 if run.status == "success" else 2


def cmd_nodes(args: argparse.Namespace) -> int:
    config = make_config(args)
    registry, _ = build_registry(args, config)
    if args.json:
        print(json.dumps(registry.object_info(), indent=1, default=str))
        return 0
    rows = sorted((nd.category, nd.name, nd.display_name or nd.name, nd.output_node) for nd in registry)
    for category, name, display, is_output in rows:
        print(f"{category:<28} {name:<36} {display}{'  [output]' if is_output else ''}")
    print(f"{len(rows)} node types", file=sys.stderr)
    return 0


def cmd_make_demo_model(args: argparse.Namespace) -> int:
    from nodes.models.folders import ModelFolders
    from nodes.models.tiny import write_demo_checkpoint

    models_dir = Path(args.models_dir) if args.models_dir else Path(args.data_dir) / "models"
    if args.if_missing:
        # `make run` on a machine that already has real models must not add a random-weight one.
        folders = ModelFolders(args.data_dir, models_dir=models_dir)
        existing = folders.list_files("checkpoints") + folders.list_files("diffusers")
        if existing:
            print(f"{len(existing)} model(s) already in {models_dir}; no demo checkpoint written")
            return 0
    path = write_demo_checkpoint(models_dir)
    print(path)
    print(f"the demo checkpoint has random weights: workflows run end to end but images are noise; put a "
          f"real checkpoint in {models_dir / 'checkpoints'} for pictures", file=sys.stderr)
    return 0


# ---- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdflow", description="sdflow: a node-graph workflow engine for "
                                     "Stable Diffusion, compatible with ComfyUI workflows and clients")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and the HTTP access log")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP/websocket server and the editor")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--auth-token", help="require this bearer token on every API route and the websocket "
                                        "(default: env SDFLOW_AUTH_TOKEN)")
    p.add_argument("--max-upload-size", type=float, default=100, metavar="MB", help="request size limit (100)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept browser requests from this origin, e.g. a reverse proxy (repeatable)")
    p.add_argument("--web-root", help="the built editor (default web/dist)")
    g = p.add_argument_group("execution backend")
    g.add_argument("--backend", choices=("embedded", "ray"), default="embedded",
                   help="run prompts in this process (default) or on Ray worker actors (pip install 'sdflow[ray]')")
    g.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    g.add_argument("--workers", type=int, metavar="N",
                   help="N CPU workers on this machine (default: one per GPU, else one)")


    p.add_argument("--frontend", choices=("sdflow", "comfyui"), default="sdflow",
                   help="the web page served at /: sdflow's editor (default) or ComfyUI's official front end "
                        "from the installed comfyui-frontend-package (extra sdflow[comfyui-frontend])")
    p.add_argument("--preview-method", choices=("none", "auto", "latent2rgb"), default="none",
                   help="step previews for every client, as ComfyUI's option (default none); sdflow's editor and "
                        "clients that announce preview support in their feature_flags get them anyway")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="join this machine to a running sdflow Ray cluster as a worker node")
    p.add_argument("--ray-address", required=True, metavar="ADDR", help="the head's Ray address (host:port)")
    p.add_argument("--workers", type=int, metavar="N", help="workers on this machine (default: one per GPU, else one)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("run", help="run a workflow file (API or UI JSON, or a PNG carrying one) in-process")
    p.add_argument("workflow")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input (NODE is an id, title or type; VALUE is JSON or a string)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the output paths")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="validate a workflow file without running it")
    p.add_argument("workflow")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("check", help="list the node classes and model files a workflow needs that are missing")
    p.add_argument("workflow")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("nodes", help="list the node types")
    p.add_argument("--json", action="store_true", help="print the full /object_info document")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("make-demo-model", help="write the tiny random-weight demo checkpoint into the models dir")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--models-dir")
    p.add_argument("--if-missing", action="store_true",
                   help="only write it when the models folder has no checkpoint yet")
    p.set_defaults(func=cmd_make_demo_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
from pathlib import Path
from typing import Any, Sequence

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
    g.add_argument("--nodes-module", action="append", default=[], metavar="MODULE",
                   help="import MODULE and register every node declared in it (repeatable)")
    g.add_argument("--no-builtin-nodes", action="store_true",
                   help="do not load the built-in Stable Diffusion nodes or installed plugins")


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
    for name in args.nodes_module:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise SystemExit(f"--nodes-module {name}: cannot import: {e}") from None
        added = registry.add(module)
        if not added:
            log.warning("--nodes-module %s declares no nodes", name)
    return registry, catalog


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
    app = create_app(config, registry, catalog, options=options)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"sdflow {len(registry)} node types; data in {config.data_dir.resolve()}", flush=True)
    print(f"sdflow serving on http://{shown}:{args.port}" + ("  (auth token required)" if token else ""), flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None,
                access_log=logging.getLogger("aiohttp.access") if args.verbose else None)
    return 0


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


def apply_sets(prompt: dict, sets: Sequence[str]) -> None:
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
        updated = apply_overrides(prompt, overrides)
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
    apply_sets(prompt, args.set)
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


class ProgressPrinter:
    """Prints run events: a progress bar (redrawn in place on a terminal) and one line per node."""

    def __init__(self, prompt: dict, stream=sys.stderr) -> None:
        self.prompt = prompt
        self.stream = stream
        self.tty = stream.isatty()
        self.bar_open = False
        self.last_line = 0.0

    def _name(self, nid: Any) -> str:
        node = self.prompt.get(str(nid), {})
        title = (node.get("_meta") or {}).get("title")
        return f"{nid} {title or node.get('class_type', '?')}"

    def _end_bar(self) -> None:
        if self.bar_open:
            self.stream.write("\n")
            self.bar_open = False

    def __call__(self, event: Any) -> None:
        t, d = event.type, event.data
        if t == "execution_cached" and d.get("nodes"):
            self.stream.write(f"cached: {len(d['nodes'])} node(s) ({', '.join(map(str, d['nodes']))})\n")
        elif t == "executing" and d.get("node") is not None:
            self._end_bar()
            self.stream.write(f"> {self._name(d['node'])}\n")
        elif t == "progress":
            value, total = float(d.get("value", 0)), float(d.get("max", 1) or 1)
            width = 30
            filled = int(width * min(value / total, 1.0))
            bar = f"  [{'#' * filled}{'.' * (width - filled)}] {int(value)}/{int(total)}"
            if self.tty:
                self.stream.write("\r" + bar)
                self.bar_open = True
            elif value >= total or time.monotonic() - self.last_line > 2:
                self.stream.write(bar + "\n")
                self.last_line = time.monotonic()
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


def output_paths(config: RuntimeConfig, outputs: dict) -> list[str]:
    from engine.paths import UnsafePathError, contained_path

    paths = []
    for ui in outputs.values():
        for key in ("images", "gifs", "audio", "files"):
            for item in ui.get(key, []) if isinstance(ui, dict) else []:
                if not isinstance(item, dict) or "filename" not in item:
                    continue
                base = getattr(config, f"{item.get('type', 'output')}_dir", config.output_dir)
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
    from nodes.models.tiny import write_demo_checkpoint

    from nodes.models.folders import ModelFolders

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
    p.add_argument("--frontend", choices=("sdflow", "comfyui"), default="sdflow",
                   help="the web page served at /: sdflow's editor (default) or ComfyUI's official front end "
                        "from the installed comfyui-frontend-package (extra sdflow[comfyui-frontend])")
    p.add_argument("--preview-method", choices=("none", "auto", "latent2rgb"), default="none",
                   help="step previews for every client, as ComfyUI's option (default none); sdflow's editor and "
                        "clients that announce preview support in their feature_flags get them anyway")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_serve)

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

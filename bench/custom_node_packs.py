"""Which ComfyUI custom-node packs load in sdflow, and which of their nodes run: a re-measurable table.

    python bench/custom_node_packs.py FOLDER [--timeout 300] [--json out.json]

FOLDER holds packs as ComfyUI's custom_nodes does (one folder or .py file each). Every pack is loaded by
sdflow's real loader (`server.cli.build_registry` with `--custom-nodes`) in its own process, alone, so one
pack's import side effects cannot help or break another's. Then each node the pack registered is run once
by the real Executor: widget inputs take their defaults (first choice of a combo), socket inputs are fed
by built-in nodes on the tiny random-weight SD1 checkpoint (MODEL/CLIP/VAE from CheckpointLoaderSimple,
CONDITIONING, a 64x64 LATENT, IMAGE and MASK); a node needing any other socket type is counted as
"needs input" and not run. "runs" means the node executed without error on those inputs, not that its
output is right. Packs' requirements are not installed by this script: install them first for a fair count.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Built-in feeders for socket inputs: (node id, class_type, inputs, output index per socket type).
FEEDERS = {
    "ckpt": ("CheckpointLoaderSimple", {"ckpt_name": None}),
    "pos": ("CLIPTextEncode", {"text": "a cat", "clip": ["ckpt", 1]}),
    "lat": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
    "img": ("EmptyImage", {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}),
    "mask": ("SolidMask", {"value": 1.0, "width": 64, "height": 64}),
}
SOCKETS = {"MODEL": ["ckpt", 0], "CLIP": ["ckpt", 1], "VAE": ["ckpt", 2], "CONDITIONING": ["pos", 0],
           "LATENT": ["lat", 0], "IMAGE": ["img", 0], "MASK": ["mask", 0]}
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_value(kind, opts: dict):
    if isinstance(kind, list):
        return kind[0] if kind else None
    if kind == "COMBO":
        choices = opts.get("options") or []
        return choices[0] if choices else None
    if "default" in opts:
        return opts["default"]
    return {"INT": opts.get("min", 0), "FLOAT": opts.get("min", 0.0), "STRING": "", "BOOLEAN": False}.get(kind)


def prompt_for(name: str, info: dict, ckpt: str) -> tuple[dict | None, str | None]:
    """A prompt running `name` once on default/fed inputs, or (None, why not)."""
    inputs: dict = {}
    used: set[str] = set()
    for name_in, spec in (info.get("input", {}).get("required") or {}).items():
        kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
        opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(kind, str) and kind in SOCKETS:
            inputs[name_in] = list(SOCKETS[kind])
            used.add(SOCKETS[kind][0])
        elif isinstance(kind, list) or (kind in WIDGETS and not opts.get("forceInput")):
            value = widget_value(kind, opts)
            if value is None and isinstance(kind, list):
                return None, f"empty combo {name_in}"
            inputs[name_in] = value
        else:
            return None, f"needs {kind}"
    prompt: dict = {"t": {"class_type": name, "inputs": inputs}}
    if "pos" in used:
        used.add("ckpt")
    for fid in used:
        cls, fin = FEEDERS[fid]
        fin = dict(fin)
        if "ckpt_name" in fin:
            fin["ckpt_name"] = ckpt
        prompt[fid] = {"class_type": cls, "inputs": fin}
    return prompt, None


class NodeTimeout(Exception):
    """A node ran past the per-node limit (some loop forever on their default inputs)."""


def _alarm(signum, frame):
    raise NodeTimeout("ran past the per-node limit")


def measure_one(pack: Path, data_dir: Path, node_timeout: float = 60) -> dict:
    """Load one pack alone and run its nodes: the row of the table (in this process)."""
    from engine.executor import Executor
    from nodes.models.tiny import write_demo_checkpoint
    from server.cli import build_parser, build_registry, make_config

    ckpt = write_demo_checkpoint(data_dir / "models").name
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "custom_nodes"
        folder.mkdir()
        (folder / pack.name).symlink_to(pack.resolve(), target_is_directory=pack.is_dir())
        args = build_parser().parse_args(["nodes", "--data-dir", str(data_dir), "--custom-nodes", str(folder)])
        config = make_config(args)
        registry, _ = build_registry(args, config)
        packs = getattr(registry, "custom_packs", [])
        row = {"pack": pack.name, "loaded": False, "registered": 0, "ran": [], "failed": {}, "not_run": {},
               "error": None, "skipped": []}
        if not packs:
            row["error"] = "not a pack (no __init__.py)"
            return row
        p = packs[0]
        row.update(loaded=p.ok, registered=len(p.nodes), error=p.error, skipped=p.skipped)
        info = registry.object_info()
        executor = Executor(registry, config=config)
        for name in p.nodes:
            # Only output nodes can be a prompt's target: the measure makes each pack node one, so that
            # it runs alone (its results are not used).
            nd = registry.get(name)
            if nd is not None and not nd.output_node:
                registry.add(dataclasses.replace(nd, output_node=True), override=True)
        for name in p.nodes:
            prompt, why = prompt_for(name, info.get(name, {}), ckpt)
            if prompt is None:
                row["not_run"][name] = why
                continue
            signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, node_timeout)
            try:
                run = executor.execute(prompt, str(uuid.uuid4()), outputs=["t"])
            except BaseException as exc:   # a pack's node may raise anything; the measure goes on
                if isinstance(exc, KeyboardInterrupt):
                    raise
                row["failed"][name] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if run.status == "success":
                row["ran"].append(name)
            else:
                err = run.error or {}
                msg = err.get("exception_message") or err.get("message") or json.dumps(err, default=str)
                row["failed"][name] = f"{err.get('exception_type', run.status)}: {msg}".strip()[:300]
        return row


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:160] if (text or "").strip() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pack (load and runs)")
    parser.add_argument("--node-timeout", type=float, default=60, help="seconds per node run")
    parser.add_argument("--json", type=Path, help="write the full result (every node's outcome) here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        row = measure_one(args.folder, args.data_dir, args.node_timeout)
        print("ROW " + json.dumps(row, default=str))
        return 0
    entries = sorted((e for e in args.folder.iterdir() if not e.name.startswith((".", "__"))
                      and ((e.is_dir() and (e / "__init__.py").is_file()) or e.suffix == ".py")),
                     key=lambda e: e.name.lower())
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as data:
        for entry in entries:
            try:
                proc = subprocess.run([sys.executable, __file__, str(entry), "--one", "--data-dir", data,
                                       "--node-timeout", str(args.node_timeout)],
                                      cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
                row = json.loads(line[4:]) if line else {
                    "pack": entry.name, "loaded": False, "registered": 0, "ran": [], "failed": {}, "not_run": {},
                    "error": f"measuring process exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            except subprocess.TimeoutExpired:
                row = {"pack": entry.name, "loaded": None, "registered": 0, "ran": [], "failed": {}, "not_run": {},
                       "error": f"timed out after {args.timeout:.0f}s"}
            rows.append(row)
            print_row(row, header=len(rows) == 1)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'pack':<34} {'loaded':<6} {'nodes':>5} {'run OK':>6} {'failed':>6} {'not run':>7}  first error")
    err = row.get("error")
    if not err and row["failed"]:
        name, msg = next(iter(row["failed"].items()))
        err = f"{name}: {msg}"
    if not err and row["not_run"]:
        common = Counter(row["not_run"].values()).most_common(1)[0][0]
        err = f"(not run: {common})"
    print(f"{row['pack']:<34} {'yes' if row['loaded'] else 'no':<6} {row['registered']:>5} {len(row['ran']):>6} "
          f"{len(row['failed']):>6} {len(row['not_run']):>7}  {first_line(err)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

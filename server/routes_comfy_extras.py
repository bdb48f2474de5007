"""The other routes ComfyUI's front end calls: translations, the model library, workflow templates,
server logs, safetensors metadata, subgraph blueprints and the jobs view of queue and history.

Shapes follow ComfyUI's server (`server.py`, `app/model_manager.py`, `app/logger.py`,
`comfy_execution/jobs.py`); the data comes from sdflow's own store, model folders and `workflows/`.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import importlib.util
import io
import json
import logging
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.paths import UnsafePathError, contained_path

from .routing import Routes, json_response, query_int
from .security import ApiError
from .state import STATE

routes = Routes("comfyui")

EXAMPLE_WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
TEMPLATES_MODULE = "sdflow"
MAX_METADATA_HEADER = 8 * 1024 * 1024     # safetensors header bytes read for /view_metadata
LOG_LINES = 300


# ---- recent log lines (/internal/logs) --------------------------------------------------------------

class LogBuffer(logging.Handler):
    """The last LOG_LINES formatted records, for the front end's error reports and its log panel."""

    def __init__(self, capacity: int = LOG_LINES) -> None:
        super().__init__(logging.INFO)
        self.entries: collections.deque = collections.deque(maxlen=capacity)
        self.lock_entries = threading.Lock()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a record that cannot be formatted must not break logging
            return
        with self.lock_entries:
            self.entries.append({"t": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)),
                                 "m": line + "\n"})

    def snapshot(self) -> list[dict]:
        with self.lock_entries:
            return list(self.entries)


_LOG_BUFFER: LogBuffer | None = None
_LOG_LOCK = threading.Lock()


def log_buffer() -> LogBuffer:
    """The process-wide buffer, attached to the root logger on first use."""
    global _LOG_BUFFER
    with _LOG_LOCK:
        if _LOG_BUFFER is None:
            _LOG_BUFFER = LogBuffer()
            logging.getLogger().addHandler(_LOG_BUFFER)
        return _LOG_BUFFER


log_buffer()   # attach at import, so lines from start-up are kept too


@routes.get("/internal/logs", "Recent server log lines as one text")
async def internal_logs(request: web.Request) -> web.Response:
    return json_response("".join(e["m"] for e in log_buffer().snapshot()))


@routes.get("/internal/logs/raw", "Recent server log lines with timestamps")
async def internal_logs_raw(request: web.Request) -> web.Response:
    return json_response({"entries": log_buffer().snapshot(), "size": {"cols": 120, "rows": 40}})


@routes.route("PATCH", "/internal/logs/subscribe", "Log streaming for the terminal panel (not offered: answers OK)")
async def internal_logs_subscribe(request: web.Request) -> web.Response:
    return web.Response(status=200)


# ---- /i18n, /global_subgraphs ------------------------------------------------------------------------

@routes.get("/i18n", "Translations contributed by node packs (none)")
async def i18n(request: web.Request) -> web.Response:
    return json_response({})


@routes.get("/global_subgraphs", "Subgraph blueprints contributed by node packs (none)")
async def global_subgraphs(request: web.Request) -> web.Response:
    return json_response({})


# ---- model library (/experiment/models) ---------------------------------------------------------

def _folders(request: web.Request) -> Any:
    catalog = request.app[STATE].catalog
    return getattr(catalog, "folders", None)


@routes.get("/experiment/models", "Model folder types with their directories")
async def experiment_models(request: web.Request) -> web.Response:
    catalog = request.app[STATE].catalog
    if catalog is None:
        return json_response([])
    folders = _folders(request)
    out = []
    for name in catalog.folder_names():
        if name in ("configs", "custom_nodes"):
            continue
        paths = [str(p) for p in folders.paths(name)] if folders is not None else []
        out.append({"name": name, "folders": paths})
    return json_response(out)


def _model_entries(catalog: Any, folders: Any, folder: str) -> list[dict] | None:
    names = catalog.list_files(folder)
    if names is None:
        return None
    roots = [Path(p) for p in folders.paths(folder)] if folders is not None else []
    out = []
    for name in names:
        entry: dict = {"name": name, "pathIndex": 0}
        for index, root in enumerate(roots):
            path = root / name
            if path.exists():
                st = path.stat()
                entry.update(pathIndex=index, modified=st.st_mtime, created=st.st_ctime, size=st.st_size)
                break
        out.append(entry)
    return out


@routes.get("/experiment/models/{folder}", "Files of one model folder with path index, times and size")
async def experiment_models_folder(request: web.Request) -> web.Response:
    catalog = request.app[STATE].catalog
    folder = request.match_info["folder"]
    files = None if catalog is None else await asyncio.to_thread(_model_entries, catalog, _folders(request), folder)
    if files is None:
        raise ApiError(404, f"unknown model folder {folder[:80]!r}", type_="not_found")
    return json_response(files)


PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".preview.png", ".preview.jpg", ".preview.jpeg",
                    ".preview.webp")


def _preview_webp(root: Path, filename: str) -> bytes | None:
    """The image beside a model file (`name.png`, `name.preview.jpg`, ...) as WebP, or None."""
    from PIL import Image

    try:
        model = contained_path(root, filename)
    except UnsafePathError:
        return None
    base = os.path.splitext(model.name)[0]
    for suffix in PREVIEW_SUFFIXES:
        candidate = model.with_name(base + suffix)
        if candidate.is_file() and contained_path(root, os.path.relpath(candidate, root)) == candidate:
            try:
                with Image.open(candidate) as img:
                    buf = io.BytesIO()
                    img.convert("RGB").save(buf, format="WEBP")
                    return buf.getvalue()
            except OSError:
                return None
    return None


@routes.get("/experiment/models/preview/{folder}/{path_index}/{filename:.*}", "A model's preview image (WebP)")
async def experiment_model_preview(request: web.Request) -> web.Response:
    folders = _folders(request)
    folder = request.match_info["folder"]
    index = request.match_info["path_index"]
    roots = [Path(p) for p in folders.paths(folder)] if folders is not None and folder in folders.keys() else []
    if not index.isdigit() or int(index) >= len(roots):
        raise ApiError(404, "unknown model folder", type_="not_found")
    data = await asyncio.to_thread(_preview_webp, roots[int(index)], request.match_info["filename"])
    if data is None:
        raise ApiError(404, "this model has no preview image", type_="not_found")
    return web.Response(body=data, content_type="image/webp")


# ---- /view_metadata/{folder}?filename= --------------------------------------------------------------

def read_safetensors_metadata(path: Path) -> dict | None:
    """The `__metadata__` of a safetensors header, or None when the file is not safetensors."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_METADATA_HEADER:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


@routes.get("/view_metadata/{folder}", "Safetensors header metadata of a model file (?filename=)")
async def view_metadata(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    filename = request.query.get("filename", "")
    if not filename.endswith(".safetensors"):
        raise ApiError(404, "only .safetensors files carry metadata", type_="not_found")
    folders = _folders(request)
    try:
        path = folders.full_path(folder, filename) if folders is not None and folder in folders.keys() else None
    except ValueError:
        raise ApiError(403, "path refused", type_="forbidden") from None
    if path is None:
        raise ApiError(404, f"no model {filename[:120]!r} in {folder[:80]!r}", type_="not_found")
    meta = await asyncio.to_thread(read_safetensors_metadata, Path(path))
    if meta is None:
        raise ApiError(404, "not a readable safetensors file", type_="not_found")
    return json_response(meta)


# ---- workflow templates ------------------------------------------------------------------------------

_TEMPLATE_NAME = re.compile(r"^[\w.\-]{1,120}$")


def _example_workflows() -> list[str]:
    """sdflow's example workflows in UI format (the *_api.json twins are prompts, not templates)."""
    if not EXAMPLE_WORKFLOWS.is_dir():
        return []
    return sorted(p.stem for p in EXAMPLE_WORKFLOWS.glob("*.json") if not p.stem.endswith("_api"))


def _templates_package_dir() -> Path | None:
    """The `templates` folder of an installed comfyui-workflow-templates package, if any."""
    for module in ("comfyui_workflow_templates_core", "comfyui_workflow_templates"):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            folder = Path(location) / "templates"
            if (folder / "index.json").is_file():
                return folder
    return None


def _title(name: str) -> str:
    return name.replace("_", " ").replace("-", " ").strip().capitalize()


@routes.get("/workflow_templates", "Example workflows by module ({module: [names]})")
async def workflow_templates(request: web.Request) -> web.Response:
    names = await asyncio.to_thread(_example_workflows)
    return json_response({TEMPLATES_MODULE: names} if names else {})


@routes.get("/workflow_templates/{module}/{name}", "One example workflow file")
async def workflow_template_file(request: web.Request) -> web.StreamResponse:
    if request.match_info["module"] != TEMPLATES_MODULE:
        raise ApiError(404, "unknown template module", type_="not_found")
    return _example_file(request.match_info["name"])


def _example_file(name: str) -> web.StreamResponse:
    stem, ext = os.path.splitext(name)
    if not _TEMPLATE_NAME.match(stem) or stem not in _example_workflows() or ext not in (".json", ".jpg"):
        raise ApiError(404, f"no template {name[:120]!r}", type_="not_found")
    if ext == ".jpg":   # the template browser's thumbnail
        return web.Response(body=_thumbnail(stem), content_type="image/jpeg",
                            headers={"Cache-Control": "public, max-age=3600"})
    return web.FileResponse(EXAMPLE_WORKFLOWS / f"{stem}.json",
                            headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})


@functools.lru_cache(maxsize=64)
def _thumbnail(stem: str) -> bytes:
    """A plain card with the workflow's title: the examples ship no pictures."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (256, 256), (38, 50, 72))
    draw = ImageDraw.Draw(img)
    draw.rectangle((12, 12, 243, 243), outline=(120, 150, 200), width=3)
    draw.text((24, 118), _title(stem)[:28], fill=(235, 240, 250))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@routes.get("/templates/index.json",
            "The template browser's index (from an installed comfyui-workflow-templates, else empty)")
async def templates_index(request: web.Request) -> web.StreamResponse:
    package = await asyncio.to_thread(_templates_package_dir)
    if package is not None:
        return web.FileResponse(package / "index.json", headers={"Content-Type": "application/json"})
    return json_response([])   # sdflow's own examples are offered through /workflow_templates


@routes.get("/templates/{name}", "A template workflow or asset")
async def templates_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    package = await asyncio.to_thread(_templates_package_dir)
    if package is not None:
        try:
            path = contained_path(package, name)
        except UnsafePathError:
            raise ApiError(403, "path refused", type_="forbidden") from None
        if path.is_file():
            return web.FileResponse(path)
    if name == "index_logo.json":   # the index of template logos: there are none without the package
        return json_response({})
    raise ApiError(404, f"no template {name[:120]!r} (install comfyui-workflow-templates for ComfyUI's)",
                   type_="not_found")


# ---- /jobs: queue and history as ComfyUI's unified job list ----------------------------------------

JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
PREVIEWABLE = frozenset({"images", "video", "audio"})


def _create_time(extra: dict, messages: list | None = None) -> int:
    value = extra.get("create_time")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    for kind, data in messages or []:
        if kind == "execution_start" and isinstance(data, dict) and isinstance(data.get("timestamp"), (int, float)):
            return int(data["timestamp"])
    return 0


def _workflow_id(extra: dict) -> str | None:
    pnginfo = extra.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    wid = workflow.get("id") if isinstance(workflow, dict) else None
    return wid if isinstance(wid, str) else None


def _queue_job(wire: list, status: str) -> dict:
    number, prompt_id, _, extra, _ = wire
    job = {"id": prompt_id, "status": status, "priority": number, "create_time": _create_time(extra),
           "outputs_count": 0, "previewable_outputs_count": 0}
    wid = _workflow_id(extra)
    if wid:
        job["workflow_id"] = wid
    return job


def _outputs_summary(outputs: dict) -> tuple[int, int, dict | None]:
    count = previewable = 0
    preview = fallback = None
    for node_id, node_out in outputs.items():
        if not isinstance(node_out, dict):
            continue
        for media, items in node_out.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if media in PREVIEWABLE:
                    previewable += 1
                    enriched = {**item, "nodeId": node_id, "mediaType": media}
                    if item.get("type") == "output" and preview is None:
                        preview = enriched
                    elif fallback is None:
                        fallback = enriched
    return count, previewable, preview or fallback


def _history_job(prompt_id: str, entry: dict, full: bool = False) -> dict:
    wire = entry.get("prompt") or [0, prompt_id, {}, {}, []]
    number, _, prompt, extra, _ = wire
    status_info = entry.get("status") or {}
    messages = status_info.get("messages") or []
    failed = status_info.get("status_str") == "error"
    interrupted = any(m[0] == "execution_interrupted" for m in messages if isinstance(m, (list, tuple)) and m)
    outputs = entry.get("outputs") or {}
    count, previewable, preview = _outputs_summary(outputs)
    job: dict = {"id": prompt_id, "status": "cancelled" if interrupted else ("failed" if failed else "completed"),
                 "priority": number, "create_time": _create_time(extra, messages), "outputs_count": count,
                 "previewable_outputs_count": previewable}
    for kind, data in messages:
        if not isinstance(data, dict):
            continue
        if kind == "execution_start":
            job["execution_start_time"] = data.get("timestamp")
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            job["execution_end_time"] = data.get("timestamp")
            if kind == "execution_error":
                job["execution_error"] = data
    if preview is not None:
        job["preview_output"] = preview
    wid = _workflow_id(extra)
    if wid:
        job["workflow_id"] = wid
    if full:
        job.update(outputs=outputs, execution_status=status_info, workflow={"prompt": prompt, "extra_data": extra},
                   execution_meta=entry.get("meta") or {})
    return job


def _all_jobs(store: Any, statuses: set[str]) -> list[dict]:
    jobs: list[dict] = []
    if "in_progress" in statuses:
        jobs += [_queue_job(i.wire(), "in_progress") for i in store.running()]
    if "pending" in statuses:
        jobs += [_queue_job(i.wire(), "pending") for i in store.pending()]
    if statuses & {"completed", "failed", "cancelled"}:
        for pid, entry in store.history().items():
            job = _history_job(pid, entry)
            if job["status"] in statuses:
                jobs.append(job)
    return jobs


@routes.get("/jobs", "Queue and history as one job list (?status=a,b&limit&offset&sort_by&sort_order&workflow_id)")
async def list_jobs(request: web.Request) -> web.Response:
    raw = request.query.get("status", "")
    statuses = {s.strip() for s in raw.split(",") if s.strip()} or set(JOB_STATUSES)
    unknown = statuses - set(JOB_STATUSES)
    if unknown:
        raise ApiError(400, f"unknown job status {sorted(unknown)[0]!r}; use {', '.join(JOB_STATUSES)}")
    sort_by = request.query.get("sort_by", "created_at")
    order = request.query.get("sort_order", "desc")
    if sort_by not in ("created_at", "execution_duration") or order not in ("asc", "desc"):
        raise ApiError(400, "sort_by must be created_at or execution_duration; sort_order asc or desc")
    limit = query_int(request, "limit", None, minimum=1)
    offset = query_int(request, "offset", 0, minimum=0) or 0
    jobs = await asyncio.to_thread(_all_jobs, request.app[STATE].store, statuses)
    workflow_id = request.query.get("workflow_id")
    if workflow_id:
        jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]
    if sort_by == "execution_duration":
        def key(j: dict) -> float:
            start, end = j.get("execution_start_time"), j.get("execution_end_time")
            return (end - start) if start and end else 0
    else:
        def key(j: dict) -> float:
            return j.get("create_time", 0)
    jobs.sort(key=key, reverse=order == "desc")
    total = len(jobs)
    page = jobs[offset:] if limit is None else jobs[offset:offset + limit]
    return json_response({"jobs": page, "pagination": {"offset": offset, "limit": limit if limit is not None else total,
                                                       "total": total, "has_more": offset + len(page) < total}})


@routes.get("/jobs/{job_id}", "One job with its outputs and workflow")
async def get_job(request: web.Request) -> web.Response:
    store = request.app[STATE].store
    pid = request.match_info["job_id"]
    entry = await asyncio.to_thread(store.history_item, pid)
    if entry is not None:
        return json_response(_history_job(pid, entry, full=True))
    for status, items in (("in_progress", store.running()), ("pending", store.pending())):
        for item in items:
            if item.prompt_id == pid:
                return json_response(_queue_job(item.wire(), status))
    raise ApiError(404, f"no job {pid[:80]!r}", type_="not_found")


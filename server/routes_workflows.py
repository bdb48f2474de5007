"""`/workflows`: a small library of workflow files in `<user_dir>/default/workflows`, the folder where
ComfyUI's front end keeps its saved workflows (`/userdata/workflows%2F...`), so both editors see the same ones.

Names are flat and conservative (letters, digits, space, `_ - . ( )`, at most 120 characters, ".json"
added when missing) and the resolved path still goes through `contained_path`, so no name can reach
outside the folder or create hidden files.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from pathlib import Path

from aiohttp import web

from engine.paths import UnsafePathError, contained_path

from .routes_prompt import MAX_PROMPT_ID, enqueue, is_text
from .routes_userdata import user_root
from .routing import Routes, json_response, read_json
from .security import ApiError
from .state import STATE

routes = Routes("workflows")

_NAME = re.compile(r"^[\w][\w .()\-]{0,119}$")


def workflows_dir(request: web.Request) -> Path:
    return user_root(request.app[STATE].config) / "workflows"


def workflow_path(folder: Path, name: str) -> Path:
    if name.endswith(".json"):
        name = name[:-5]
    if not _NAME.match(name) or name.endswith(".") or ".." in name:
        raise ApiError(400, "invalid workflow name: use letters, digits, spaces and _ - . ( ), at most 120 "
                            "characters", type_="invalid_name")
    try:
        return contained_path(folder, name + ".json")
    except UnsafePathError as e:
        raise ApiError(403, f"path refused: {e}", type_="forbidden") from None


def _listing(folder: Path) -> list[dict]:
    if not folder.is_dir():
        return []
    out = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        if entry.suffix == ".json" and entry.is_file() and not entry.is_symlink():
            st = entry.stat()
            out.append({"name": entry.stem, "file": entry.name, "size": st.st_size, "modified": st.st_mtime})
    return out


@routes.get("/workflows", "List saved workflows")
async def list_workflows(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(_listing, workflows_dir(request)))


@routes.get("/workflows/{name}", "Load a saved workflow (the JSON document as saved)")
async def load_workflow(request: web.Request) -> web.Response:
    path = workflow_path(workflows_dir(request), request.match_info["name"])
    if not path.is_file():
        raise ApiError(404, "no such workflow", type_="not_found")
    data = await asyncio.to_thread(path.read_bytes)
    return web.Response(body=data, content_type="application/json", headers={"X-Content-Type-Options": "nosniff"})


async def _save(request: web.Request) -> web.Response:
    folder = workflows_dir(request)
    path = workflow_path(folder, request.match_info["name"])
    doc = await read_json(request)
    if not isinstance(doc, dict):
        raise ApiError(400, "a workflow must be a JSON object (UI or API format)")
    overwrite = request.query.get("overwrite", "true").lower() not in ("false", "0", "no")
    if path.exists() and not overwrite:
        raise ApiError(409, "a workflow with that name exists (pass ?overwrite=true)", type_="exists")

    def write() -> int:
        folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps(doc, indent=1).encode()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".wf-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return len(data)

    size = await asyncio.to_thread(write)
    return json_response({"name": path.stem, "file": path.name, "size": size})


@routes.post("/workflows/{name}", "Save a workflow (?overwrite=false refuses to replace one)",
             body={"type": "object"}, responses={"200": "{name, file, size}", "409": "exists"})
async def save_workflow(request: web.Request) -> web.Response:
    return await _save(request)


@routes.put("/workflows/{name}", "Save a workflow (same as POST)", body={"type": "object"})
async def put_workflow(request: web.Request) -> web.Response:
    return await _save(request)


@routes.delete("/workflows/{name}", "Delete a saved workflow")
async def delete_workflow(request: web.Request) -> web.Response:
    path = workflow_path(workflows_dir(request), request.match_info["name"])
    if not path.is_file():
        raise ApiError(404, "no such workflow", type_="not_found")
    await asyncio.to_thread(path.unlink)
    return json_response({"deleted": path.stem})


@routes.post("/workflows/{name}/run", "Queue a saved workflow with only its inputs given",
             body={"type": "object", "properties": {
                 "inputs": {"type": "object", "description": '{"NODE.INPUT": value}; NODE is a node id, title or type'},
                 "client_id": {"type": "string"}, "front": {"type": "boolean"}, "prompt_id": {"type": "string"}}},
             responses={"200": "{prompt_id, number, node_errors}", "400": "{error, node_errors}",
                        "404": "no such workflow"})
async def run_workflow(request: web.Request) -> web.Response:
    """Headless use of a workflow saved from the editor: no graph in the request, just the inputs."""
    path = workflow_path(workflows_dir(request), request.match_info["name"])
    if not path.is_file():
        raise ApiError(404, "no such workflow", type_="not_found")
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    inputs = body.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise ApiError(400, "'inputs' must be an object of {\"NODE.INPUT\": value}")
    client_id = body.get("client_id")
    if client_id is not None and not is_text(client_id, allow_empty=True):
        raise ApiError(400, f"'client_id' must be a UTF-8 string of at most {MAX_PROMPT_ID} characters")
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not is_text(prompt_id):
        raise ApiError(400, f"'prompt_id' must be a non-empty UTF-8 string of at most {MAX_PROMPT_ID} characters")
    front = body.get("front", False)
    if not isinstance(front, bool):
        raise ApiError(400, "'front' must be true or false")
    try:
        doc = json.loads(await asyncio.to_thread(path.read_bytes))
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the saved workflow is not valid JSON: {str(e)[:200]}") from None
    extra_data = {"client_id": client_id} if client_id else {}
    return await enqueue(request.app[STATE], doc, extra_data, prompt_id=prompt_id, front=front, overrides=inputs)

"""ComfyUI's user-data API in single-user mode: `/users`, `/settings`, `/userdata` (reference: ComfyUI's
`app/user_manager.py` and `app/app_settings.py`, whose routes, query flags and status codes these follow).

Everything lives under `<user_dir>/default` (ComfyUI's layout: `comfy.settings.json`, `workflows/*.json`),
so ComfyUI's front end and sdflow's editor share settings and saved workflows. Every user-supplied path
goes through `contained_path`; bodies are size-limited; writes are atomic (temp file + rename), so a
crash never leaves half a workflow.
"""
from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from engine.config import RuntimeConfig
from engine.paths import UnsafePathError, contained_path

from .routing import Routes, json_response
from .security import ApiError
from .state import STATE

routes = Routes("userdata")

DEFAULT_USER = "default"
SETTINGS_FILE = "comfy.settings.json"
MAX_USERDATA_BYTES = 50 * 1024 * 1024     # one stored file (a big workflow with embedded images fits)
MAX_SETTINGS_BYTES = 2 * 1024 * 1024      # the whole settings document
STANDARD_DIRS = ("workflows", "subgraphs")   # folders ComfyUI's front end keeps its files in
MAX_LISTING = 20000                       # entries one listing returns
_SETTINGS_LOCK = threading.Lock()         # read-modify-write of the settings file from the thread pool


def user_root(config: RuntimeConfig) -> Path:
    """The single user's folder; sdflow's own editor stores its workflows in `<this>/workflows` too."""
    assert config.user_dir is not None  # RuntimeConfig.__post_init__ fills every directory
    return Path(config.user_dir) / DEFAULT_USER


def _root(request: web.Request) -> Path:
    return user_root(request.app[STATE].config)


def _resolve(request: web.Request, rel: str) -> Path:
    """A user path under the user root, or 403 as ComfyUI answers. Accepts ComfyUI's URL-encoded names
    (`workflows%2Fa.json`), which arrive still encoded when the client double-encodes them."""
    if "%" in rel:
        rel = unquote(rel)
    if not rel or rel.strip() in (".", ""):
        raise ApiError(400, "no file given", type_="invalid_path")
    if "\\" in rel or any(ord(c) < 32 for c in rel):
        # a backslash is a separator on Windows; refusing it everywhere keeps stored names portable
        raise ApiError(400, "file names may not contain backslashes or control characters", type_="invalid_path")
    try:
        path = contained_path(_root(request), rel)
    except UnsafePathError as e:
        raise ApiError(403, f"path refused: {e}", type_="forbidden") from None
    if path == contained_path(_root(request)):
        raise ApiError(400, "a file path is required, not the user folder", type_="invalid_path")
    return path


def _flag(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    return raw.lower() != "false" if default else raw.lower() == "true"


def _file_info(path: Path, relative_to: Path) -> dict:
    st = path.stat()
    return {"path": path.relative_to(relative_to).as_posix(), "size": st.st_size,
            "modified": int(st.st_mtime * 1000), "created": int(st.st_ctime * 1000)}


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


async def _read_limited(request: web.Request, limit: int, what: str) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"{what} is {request.content_length} bytes; the limit is {limit}", type_="too_large")
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"{what} is larger than the limit of {limit} bytes", type_="too_large")
    return bytes(body)


# ---- /users -------------------------------------------------------------------------------------

@routes.get("/users", "User storage mode (single user: server-side storage)")
async def get_users(request: web.Request) -> web.Response:
    return json_response({"storage": "server", "migrated": _root(request).is_dir()})


@routes.post("/users", "Add a user: refused, sdflow runs in single-user mode")
async def post_users(request: web.Request) -> web.Response:
    raise ApiError(400, "sdflow runs in single-user mode; users cannot be added", type_="single_user")


# ---- /settings ----------------------------------------------------------------------------------

def load_settings(config: RuntimeConfig) -> dict:
    path = user_root(config) / SETTINGS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged file reads as no settings, as a fresh install; the next save replaces it
    return data if isinstance(data, dict) else {}


def _save_settings(config: RuntimeConfig, settings: dict) -> None:
    data = json.dumps(settings, indent=4, allow_nan=False).encode()
    if len(data) > MAX_SETTINGS_BYTES:
        raise ApiError(413, f"settings would be {len(data)} bytes; the limit is {MAX_SETTINGS_BYTES}",
                       type_="too_large")
    _atomic_write(user_root(config) / SETTINGS_FILE, data)


def _update_settings(config: RuntimeConfig, changes: dict) -> None:
    with _SETTINGS_LOCK:
        settings = load_settings(config)
        settings.update(changes)
        _save_settings(config, settings)


async def _json_body(request: web.Request, limit: int) -> object:
    raw = await _read_limited(request, limit, "request body")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON: {e}", type_="invalid_json") from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


@routes.get("/settings", "All settings of the user")
async def get_settings(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(load_settings, request.app[STATE].config))


@routes.get("/settings/{id}", "One setting's value, or null")
async def get_setting(request: web.Request) -> web.Response:
    settings = await asyncio.to_thread(load_settings, request.app[STATE].config)
    return json_response(settings.get(request.match_info["id"]))


@routes.post("/settings", "Merge the posted object into the settings")
async def post_settings(request: web.Request) -> web.Response:
    body = await _json_body(request, MAX_SETTINGS_BYTES)
    if not isinstance(body, dict):
        raise ApiError(400, "settings must be a JSON object", type_="invalid_json")
    await asyncio.to_thread(_update_settings, request.app[STATE].config, body)
    return web.Response(status=200)


@routes.post("/settings/{id}", "Set one setting to the posted JSON value")
async def post_setting(request: web.Request) -> web.Response:
    body = await _json_body(request, MAX_SETTINGS_BYTES)
    await asyncio.to_thread(_update_settings, request.app[STATE].config, {request.match_info["id"]: body})
    return web.Response(status=200)


# ---- /userdata ----------------------------------------------------------------------------------

def _listing(base: Path, recurse: bool, full_info: bool, split: bool) -> list:
    out: list = []
    walker = base.rglob("*") if recurse else base.glob("*")
    for path in sorted(walker):
        if len(out) >= MAX_LISTING:
            break
        if path.name.startswith(".tmp-") or not path.is_file():
            continue
        try:  # a symlink inside the folder that points outside is not listed
            contained_path(base, path.relative_to(base).as_posix())
        except UnsafePathError:
            continue
        rel = path.relative_to(base).as_posix()
        if full_info:
            out.append(_file_info(path, base))
        elif split:
            out.append([rel, *rel.split("/")])
        else:
            out.append(rel)
    return out


@routes.get("/userdata", "List files in a user folder (?dir=, recurse, full_info, split)")
async def list_userdata(request: web.Request) -> web.Response:
    directory = request.query.get("dir", "")
    if not directory:
        raise ApiError(400, "query parameter 'dir' is required", type_="invalid_path")
    try:
        path = contained_path(_root(request), unquote(directory))
    except UnsafePathError as e:
        raise ApiError(403, f"path refused: {e}", type_="forbidden") from None
    if not path.is_dir() and directory.strip("/") in STANDARD_DIRS:
        path.mkdir(parents=True, exist_ok=True)   # the front end lists these on every start
    if not path.is_dir():
        raise ApiError(404, f"directory {directory[:120]!r} not found", type_="not_found")
    result = await asyncio.to_thread(_listing, path, _flag(request, "recurse", False),
                                     _flag(request, "full_info", False), _flag(request, "split", False))
    return json_response(result)


@routes.get("/userdata/{file}", "A stored user file (served as a download, except user.css)")
async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = _resolve(request, request.match_info["file"])
    if not path.is_file():
        raise ApiError(404, "no such user file", type_="not_found")
    is_user_css = path == contained_path(_root(request), "user.css")
    mime = "text/css" if is_user_css else (mimetypes.guess_type(path.name)[0] or "application/octet-stream")
    if not is_user_css and mime not in ("application/json", "text/plain", "text/csv"):
        # user files are arbitrary content: never render markup or scripts in the app's origin
        mime = "application/octet-stream"
    return web.FileResponse(path, headers={
        "Content-Type": mime, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
        "Content-Disposition": "inline" if is_user_css else "attachment"})


@routes.post("/userdata/{file}", "Store a user file (?overwrite=false refuses an existing file; ?full_info)")
async def post_userdata(request: web.Request) -> web.Response:
    path = _resolve(request, request.match_info["file"])
    overwrite = _flag(request, "overwrite", True)
    if not overwrite and path.exists():
        raise ApiError(409, "file already exists", type_="exists")
    if path.is_dir():
        raise ApiError(400, "a folder of that name exists", type_="invalid_path")
    body = await _read_limited(request, MAX_USERDATA_BYTES, "file")
    try:
        await asyncio.to_thread(_atomic_write, path, body)
    except OSError as e:
        raise ApiError(400, f"cannot store that file name: {e.strerror or e}", type_="invalid_path") from None
    return json_response(_reply(request, path))


def _reply(request: web.Request, path: Path) -> object:
    base = contained_path(_root(request))
    if _flag(request, "full_info", False):
        return _file_info(path, base)
    return path.relative_to(base).as_posix()


@routes.delete("/userdata/{file}", "Delete a user file")
async def delete_userdata(request: web.Request) -> web.Response:
    path = _resolve(request, request.match_info["file"])
    if not path.is_file():
        raise ApiError(404, "no such user file", type_="not_found")
    await asyncio.to_thread(path.unlink)
    return web.Response(status=204)


@routes.post("/userdata/{file}/move/{dest}", "Move or rename a user file (?overwrite=false, ?full_info)")
async def move_userdata(request: web.Request) -> web.Response:
    source = _resolve(request, request.match_info["file"])
    if not source.is_file():
        raise ApiError(404, "no such user file", type_="not_found")
    dest = _resolve(request, request.match_info["dest"])
    if not _flag(request, "overwrite", True) and dest.exists():
        raise ApiError(409, "destination already exists", type_="exists")
    if dest.is_dir():
        raise ApiError(400, "a folder of that name exists", type_="invalid_path")

    def move() -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(dest))

    await asyncio.to_thread(move)
    return json_response(_reply(request, dest))

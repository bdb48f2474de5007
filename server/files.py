"""`/view`, `/upload/image` and `/upload/mask`: every user-supplied name goes through `contained_path`.

Served files: only an allow-list of image types is shown inline; anything else is sent as an attachment
of type application/octet-stream, and every reply carries `X-Content-Type-Options: nosniff`, so an
uploaded .html or .svg can never run as a page on the server's origin.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import mimetypes
import os
import tempfile
import warnings
from pathlib import Path
from urllib.parse import quote

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image, PngImagePlugin

from engine.image_limits import ImageTooLarge, check_image_file, pixel_budget
from engine.paths import UnsafePathError, contained_path

from .routing import Routes, json_response
from .security import ApiError, scrub_paths
from .state import STATE, AppState

routes = Routes("files")

INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/avif"})
DIR_TYPES = ("input", "output", "temp")
MAX_NAME = 255


def base_dir(state: AppState, kind: str) -> Path:
    if kind not in DIR_TYPES:
        raise ApiError(400, f"invalid type {kind[:40]!r}; expected one of {', '.join(DIR_TYPES)}")
    return Path(getattr(state.config, f"{kind}_dir"))


def split_annotation(name: str) -> tuple[str, str | None]:
    """`"x.png [output]"` -> ("x.png", "output") (ComfyUI's annotated file names)."""
    for kind in DIR_TYPES:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def check_name(name: str, what: str = "filename") -> str:
    """A single file name: no separators, no `..`, no NUL, not empty."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise ApiError(400, f"invalid {what}")
    if "\x00" in name:
        raise ApiError(400, f"{what} contains a NUL byte")
    if "/" in name or "\\" in name:
        raise ApiError(400, f"{what} must not contain a path separator")
    if len(_utf8(name, what)) > MAX_NAME:
        raise ApiError(400, f"{what} is too long (at most {MAX_NAME} bytes)")
    return name


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate, or bytes the URL decoder could not read as UTF-8
        raise ApiError(400, f"{what} is not valid UTF-8 text") from None


def check_subfolder(sub: str) -> str:
    if not isinstance(sub, str):
        raise ApiError(400, "subfolder must be a string")
    if "\x00" in sub:
        raise ApiError(400, "subfolder contains a NUL byte")
    if len(sub) > 1024:
        raise ApiError(400, "subfolder is too long")
    for part in sub.replace("\\", "/").split("/"):
        if len(_utf8(part, "subfolder")) > MAX_NAME:
            raise ApiError(400, f"a subfolder component is too long (at most {MAX_NAME} bytes)")
    return sub


def resolve(base: Path, subfolder: str, name: str) -> Path:
    try:
        return contained_path(base, check_subfolder(subfolder), check_name(name))
    except UnsafePathError as e:
        raise ApiError(403, f"path refused: {e}", type_="forbidden") from None


def content_disposition(kind: str, filename: str) -> str:
    # RFC 6266 / 5987: an ASCII fallback plus the exact UTF-8 name; quotes and control chars never pass through
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def file_headers(path: Path, mime: str | None = None) -> tuple[str, dict]:
    mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    if mime in INLINE_TYPES:
        headers["Content-Disposition"] = content_disposition("inline", path.name)
        return mime, headers
    headers["Content-Disposition"] = content_disposition("attachment", path.name)
    return "application/octet-stream", headers


# ---- /view --------------------------------------------------------------------------------------

@routes.get("/view", "Download an input, output or temp file (optionally re-encoded as a preview)",
            params=[{"name": n, "in": "query", "schema": {"type": "string"}}
                    for n in ("filename", "type", "subfolder", "preview", "channel")],
            responses={"200": "the file", "400": "bad name or type", "403": "path escapes its directory",
                       "404": "no such file"})
async def view(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    q = request.query
    filename = q.get("filename")
    if not filename:
        raise ApiError(400, "missing 'filename'")
    filename, annotated = split_annotation(filename)
    kind = annotated or q.get("type") or "output"
    base = base_dir(state, kind)
    path = resolve(base, q.get("subfolder", ""), filename)
    if not path.is_file():
        raise ApiError(404, "file not found", type_="not_found")
    preview, channel = q.get("preview"), q.get("channel", "rgba")
    if channel not in ("rgba", "rgb", "a"):
        raise ApiError(400, "channel must be one of rgba, rgb, a")
    if preview or channel != "rgba":
        data, mime = await asyncio.to_thread(_reencode, path, preview, channel, pixel_budget(state.config))
        ctype, headers = file_headers(path.with_suffix("." + mime.split("/")[1]), mime)
        return web.Response(body=data, content_type=ctype, headers=headers)
    ctype, headers = file_headers(path)
    headers["Content-Type"] = ctype
    return web.FileResponse(path, headers=headers)


def _reencode(path: Path, preview: str | None, channel: str, budget: int | None) -> tuple[bytes, str]:
    try:
        with warnings.catch_warnings():   # the budget decides, not PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(path)
        with img:
            if budget and img.width * img.height > budget:
                raise ApiError(413, "the image is over the pixel budget; download it without preview or channel",
                               type_="image_too_large")
            img.load()
            if channel == "rgb":
                img = img.convert("RGB")
            elif channel == "a":
                rgba = img.convert("RGBA")
                alpha = Image.new("RGBA", rgba.size)
                alpha.putalpha(rgba.getchannel("A"))
                img = alpha
            buf = io.BytesIO()
            if preview:
                fmt, _, quality = preview.partition(";")
                fmt = fmt.lower()
                if fmt not in ("webp", "jpeg"):
                    raise ApiError(400, "preview format must be webp or jpeg")
                try:
                    q = min(max(int(quality or 90), 1), 100)
                except ValueError:
                    raise ApiError(400, "preview quality must be an integer") from None
                if fmt == "jpeg":
                    img = img.convert("RGB")
                img.save(buf, format=fmt.upper(), quality=q)
                return buf.getvalue(), f"image/{fmt}"
            img.save(buf, format="PNG")
            return buf.getvalue(), "image/png"
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ApiError(400, f"cannot re-encode this file as an image: {scrub_paths(str(e))}") from None


# ---- uploads ------------------------------------------------------------------------------------

async def _read_upload(request: web.Request) -> tuple[dict[str, str], str, bytes]:
    """The multipart form: text fields, the uploaded file's name and bytes (size capped by client_max_size)."""
    ctype = request.content_type
    if ctype != "multipart/form-data":
        raise ApiError(400, "expected multipart/form-data with an 'image' file field")
    fields: dict[str, str] = {}
    filename, data = None, None
    try:
        post = await request.post()
    except (ValueError, HttpProcessingError) as e:   # bad boundary, control chars in part headers, ...
        raise ApiError(400, f"malformed multipart body: {str(e).strip()[:200]}") from None
    for key, value in post.items():
        if isinstance(value, web.FileField):
            if key == "image":
                filename = value.filename
                data = value.file.read()
        elif isinstance(value, str):
            fields[key] = value
    if data is None or filename is None:
        raise ApiError(400, "missing 'image' file field")
    return fields, filename, data


def _same_bytes(path: Path, data: bytes) -> bool:
    if path.stat().st_size != len(data):
        return False
    return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def _free_name(folder: Path, name: str, data: bytes, overwrite: bool) -> str:
    """ComfyUI's collision rule: reuse a byte-identical file, otherwise `name (1).ext`, `name (2).ext`..."""
    if overwrite:
        return name
    stem, ext = os.path.splitext(name)
    candidate, i = name, 1
    while (folder / candidate).exists():
        if (folder / candidate).is_file() and _same_bytes(folder / candidate, data):
            return candidate
        candidate = f"{stem} ({i}){ext}"
        i += 1
    return candidate


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_upload_pixels(state: AppState, source, what: str) -> None:
    """An image over the pixel budget is refused from its header, before anything decodes it."""
    try:
        check_image_file(io.BytesIO(source) if isinstance(source, bytes) else source,
                         pixel_budget(state.config), what)
    except ImageTooLarge as e:
        raise ApiError(413, str(e), type_="image_too_large") from None


def _make_folder(base: Path, folder: Path) -> None:
    """Create the upload folder; a subfolder that names an existing file is the client's mistake."""
    base = Path(os.path.realpath(base))
    probe = folder
    while probe != base and base in probe.parents:
        if probe.exists() and not probe.is_dir():
            raise ApiError(400, f"subfolder '{probe.relative_to(base)}' is a file, not a folder")
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ApiError(400, "subfolder names an existing file, not a folder") from None


def _store_upload(state: AppState, fields: dict[str, str], filename: str, data: bytes,
                  transform=None) -> dict:
    kind = fields.get("type") or "input"
    base = base_dir(state, kind)
    subfolder = fields.get("subfolder", "")
    name = check_name(os.path.basename(filename.replace("\\", "/")) if filename else "", "uploaded file name")
    if name != filename:
        raise ApiError(400, "uploaded file name must not contain a path")
    folder = resolve(base, subfolder, name).parent  # validates both before anything is created
    overwrite = fields.get("overwrite", "").lower() in ("true", "1")
    check_upload_pixels(state, data, "the uploaded image")
    if transform is not None:
        data = transform(data)
    _make_folder(base, folder)
    final = _free_name(folder, name, data, overwrite)
    target = resolve(base, subfolder, final)
    if target.exists() and not target.is_file():
        raise ApiError(400, "a folder of that name exists")
    if not (target.exists() and not overwrite and _same_bytes(target, data)):
        _atomic_write(target, data)
    return {"name": final, "subfolder": subfolder, "type": kind}


@routes.post("/upload/image", "Upload an image into the input (or temp/output) directory",
             body={"type": "object", "properties": {"image": {"type": "string", "format": "binary"},
                                                    "type": {"enum": list(DIR_TYPES)},
                                                    "subfolder": {"type": "string"},
                                                    "overwrite": {"type": "string"}}},
             body_type="multipart/form-data",
             responses={"200": "{name, subfolder, type}", "400": "bad field or name", "403": "path escapes",
                        "413": "larger than --max-upload-size"})
async def upload_image(request: web.Request) -> web.Response:
    state = request.app[STATE]
    fields, filename, data = await _read_upload(request)
    result = await asyncio.to_thread(_store_upload, state, fields, filename, data)
    return json_response(result)


@routes.post("/upload/mask", "Upload a mask: the image's alpha channel is merged into `original_ref`",
             body={"type": "object", "properties": {"image": {"type": "string", "format": "binary"},
                                                    "original_ref": {"type": "string"}}},
             body_type="multipart/form-data")
async def upload_mask(request: web.Request) -> web.Response:
    state = request.app[STATE]
    fields, filename, data = await _read_upload(request)
    try:
        ref = json.loads(fields.get("original_ref", ""))
    except ValueError:
        raise ApiError(400, "original_ref must be JSON {filename, subfolder?, type?}") from None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise ApiError(400, "original_ref must be JSON {filename, subfolder?, type?}")
    ref_name, annotated = split_annotation(ref["filename"])
    ref_kind = annotated or ref.get("type") or "output"
    if not isinstance(ref_kind, str):
        raise ApiError(400, "original_ref.type must be a string")
    original = resolve(base_dir(state, ref_kind), ref.get("subfolder", "") or "", ref_name)
    if not original.is_file():
        raise ApiError(404, "original image not found", type_="not_found")

    def merge(mask_bytes: bytes) -> bytes:
        check_upload_pixels(state, original, "the original image")
        try:
            with Image.open(original) as orig, Image.open(io.BytesIO(mask_bytes)) as mask:
                info = PngImagePlugin.PngInfo()
                for key, value in (orig.text if hasattr(orig, "text") else {}).items():
                    info.add_text(key, value)
                out = orig.convert("RGBA")
                alpha = mask.convert("RGBA").getchannel("A").resize(out.size)
                out.putalpha(alpha)
                buf = io.BytesIO()
                out.save(buf, format="PNG", pnginfo=info, compress_level=4)
                return buf.getvalue()
        except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
            raise ApiError(400, f"cannot read the image: {scrub_paths(str(e))}") from None

    result = await asyncio.to_thread(_store_upload, state, fields, filename, data, merge)
    return json_response(result)

"""ComfyUI workflow metadata in PNG files: reading the text chunks, building and embedding them.

ComfyUI's SaveImage writes two Latin-1 `tEXt` chunks, `prompt` (the API prompt) and `workflow` (the UI
graph); other tools write `iTXt` (optionally zlib-compressed) or `zTXt`, and some ComfyUI extensions use a
private `comf` chunk. This reader walks the chunk list itself (no image decoding, no PIL), so a large image
costs only a scan of its chunk headers.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.ui_workflow import WorkflowFormatError, is_api_prompt, is_ui_workflow

__all__ = [
    "PNG_SIGNATURE",
    "read_png_text",
    "workflow_from_png",
    "png_text_chunks",
    "embed_png_text",
    "load_workflow_file",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_TYPES = (b"tEXt", b"iTXt", b"zTXt", b"comf")
# Metadata is JSON of a workflow; anything inflating past this is a decompression bomb, not a workflow.
MAX_TEXT_BYTES = 64 * 1024 * 1024


def _as_bytes(data: bytes | bytearray | memoryview | str | os.PathLike) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return Path(data).read_bytes()


def _inflate(blob: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(blob, MAX_TEXT_BYTES)
    if d.unconsumed_tail:
        raise ValueError("compressed text chunk inflates beyond the metadata size limit")
    return out


def _decode_text(raw: bytes) -> str:
    # The PNG spec says Latin-1 for tEXt/zTXt, but ComfyUI's frontend decodes every chunk as UTF-8 and
    # some writers put UTF-8 there; UTF-8 first, Latin-1 (which never fails) as the fallback.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _parse_text_chunk(ctype: bytes, body: bytes) -> tuple[str, str] | None:
    key_raw, sep, rest = body.partition(b"\x00")
    if not sep:
        return None
    key = key_raw.decode("latin-1")
    if ctype in (b"tEXt", b"comf"):
        return key, _decode_text(rest)
    if ctype == b"zTXt":
        if not rest or rest[0] != 0:
            return None  # 0 (zlib) is the only compression method PNG defines
        return key, _decode_text(_inflate(rest[1:]))
    # iTXt: compression flag, compression method, language tag NUL, translated keyword NUL, text
    if len(rest) < 2:
        return None
    flag, method = rest[0], rest[1]
    parts = rest[2:].split(b"\x00", 2)
    if len(parts) < 3:
        return None
    text = parts[2]
    if flag:
        if method != 0:
            return None
        text = _inflate(text)
    return key, text.decode("utf-8", errors="replace")


def read_png_text(data: bytes | str | Path) -> dict[str, str]:
    """All text chunks of a PNG (`tEXt`, `iTXt`, `zTXt`, `comf`) as {keyword: text}; a later chunk
    with the same keyword wins. `data` is the file's bytes or a path.

    Raises ValueError("not a PNG") without the PNG signature and ValueError("truncated PNG") when the
    chunk list ends before IEND. A text chunk that cannot be decoded is skipped, not fatal: the image's
    other metadata is still worth having.
    """
    buf = _as_bytes(data)
    if not buf.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (missing the PNG signature)")
    texts: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(buf):
            raise ValueError(f"truncated PNG: chunk header cut off at byte {pos}")
        length, ctype = struct.unpack(">I4s", buf[pos:pos + 8])
        end = pos + 8 + length + 4  # data, then the CRC
        if end > len(buf):
            raise ValueError(f"truncated PNG: {ctype.decode('latin-1')!r} chunk at byte {pos} "
                             f"needs {length} bytes of data")
        if ctype in _TEXT_TYPES:
            try:
                parsed = _parse_text_chunk(ctype, buf[pos + 8:pos + 8 + length])
            except (ValueError, zlib.error):
                parsed = None
            if parsed is not None:
                texts[parsed[0]] = parsed[1]
        elif ctype == b"IEND":
            return texts
        pos = end


def _json_object(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def workflow_from_png(data: bytes | str | Path) -> tuple[dict | None, dict | None]:
    """(UI workflow from the `workflow` chunk, API prompt from the `prompt` chunk); either is None when
    missing, not valid JSON, or not of the expected shape."""
    texts = read_png_text(data)
    workflow = _json_object(texts.get("workflow"))
    prompt = _json_object(texts.get("prompt"))
    return (workflow if is_ui_workflow(workflow) else None, prompt if is_api_prompt(prompt) else None)


def png_text_chunks(prompt: dict | None, extra_pnginfo: dict | None) -> list[tuple[str, str]]:
    """The text chunks SaveImage writes, in its order: `prompt`, then one per `extra_pnginfo` key.
    `json.dumps` defaults (ASCII-escaped, ", " / ": " separators) keep the bytes identical to ComfyUI's."""
    chunks: list[tuple[str, str]] = []
    if prompt is not None:
        chunks.append(("prompt", json.dumps(prompt)))
    if extra_pnginfo is not None:
        for key, value in extra_pnginfo.items():
            chunks.append((str(key), json.dumps(value)))
    return chunks


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def embed_png_text(png: bytes, chunks: Iterable[tuple[str, str]]) -> bytes:
    """Return `png` with the given text chunks inserted before the first IDAT (where PIL writes them).

    A text that is Latin-1 encodable goes in a `tEXt` chunk (what ComfyUI writes), otherwise in an
    uncompressed UTF-8 `iTXt`. Keywords must be 1-79 Latin-1 characters without NUL, as PNG requires.
    """
    encoded = []
    for key, text in chunks:
        try:
            kw = key.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"PNG text keyword must be Latin-1: {key!r}") from None
        if not 1 <= len(kw) <= 79 or b"\x00" in kw:
            raise ValueError(f"PNG text keyword must be 1-79 characters without NUL: {key!r}")
        try:
            encoded.append(_chunk(b"tEXt", kw + b"\x00" + text.encode("latin-1")))
        except UnicodeEncodeError:
            encoded.append(_chunk(b"iTXt", kw + b"\x00\x00\x00\x00\x00" + text.encode("utf-8")))
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (missing the PNG signature)")
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(png):
        length, ctype = struct.unpack(">I4s", png[pos:pos + 8])
        if ctype in (b"IDAT", b"IEND"):
            return png[:pos] + b"".join(encoded) + png[pos:]
        pos += 12 + length
    raise ValueError("truncated PNG: no IDAT or IEND chunk")


def load_workflow_file(path: str | Path) -> tuple[str, dict]:
    """Read a workflow from a `.json` file or a ComfyUI PNG: ("ui" | "api", document).

    For a PNG the UI workflow is preferred over the API prompt, as in ComfyUI's drag-and-drop. The
    kind is decided by content, not by the file name. Raises WorkflowFormatError (a ValueError) when
    the file holds no workflow; OSError propagates for a missing or unreadable file.
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(PNG_SIGNATURE):
        try:
            workflow, prompt = workflow_from_png(data)
        except ValueError as exc:
            raise WorkflowFormatError(f"{path.name}: {exc}") from None
        if workflow is not None:
            return "ui", workflow
        if prompt is not None:
            return "api", prompt
        raise WorkflowFormatError(f"{path.name}: PNG carries no ComfyUI 'workflow' or 'prompt' metadata")
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WorkflowFormatError(f"{path.name}: neither a PNG nor valid JSON ({exc})") from None
    if is_ui_workflow(doc):
        return "ui", doc
    if is_api_prompt(doc):
        return "api", doc
    raise WorkflowFormatError(
        f"{path.name}: JSON is neither a UI workflow (with 'nodes' and 'links') nor an API prompt "
        "(an object of nodes with 'class_type')")

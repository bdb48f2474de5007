"""PNG metadata chunks: written by PIL exactly as ComfyUI's SaveImage does, read back by engine.png_metadata."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine import png_metadata
from engine.png_metadata import embed_png_text, load_workflow_file, png_text_chunks, read_png_text, workflow_from_png
from engine.ui_workflow import WorkflowFormatError, ui_to_api

DATA = Path(__file__).parent / "data"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def make_png(info: PngInfo | None = None, size: int = 16) -> bytes:
    img = Image.new("RGB", (size, size), (200, 30, 90))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def chunk_types(png: bytes) -> list[bytes]:
    types, pos = [], 8
    while pos < len(png):
        length, ctype = struct.unpack(">I4s", png[pos:pos + 8])
        types.append(ctype)
        pos += 12 + length
    return types


def raw_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def test_saveimage_style_chunks_round_trip():
    prompt, workflow = load("inpaint_api.json"), load("inpaint_ui.json")
    chunks = png_text_chunks(prompt, {"workflow": workflow})
    assert chunks == [("prompt", json.dumps(prompt)), ("workflow", json.dumps(workflow))]
    assert all(text.isascii() for _, text in chunks)  # the café prompt is escaped, as ComfyUI writes it
    assert "\\u00e9" in chunks[0][1]
    info = PngInfo()
    for key, text in chunks:
        info.add_text(key, text)
    png = make_png(info)
    assert chunk_types(png).count(b"tEXt") == 2  # plain Latin-1 chunks, like ComfyUI's files
    assert read_png_text(png) == dict(chunks)
    ui, api = workflow_from_png(png)
    assert ui == workflow and api == prompt


def test_png_text_chunks_edge_cases():
    assert png_text_chunks(None, None) == []
    assert png_text_chunks({"1": {"class_type": "X", "inputs": {}}}, None)[0][0] == "prompt"
    assert [k for k, _ in png_text_chunks(None, {"workflow": {}, "extra": [1]})] == ["workflow", "extra"]


def test_itxt_compressed_and_uncompressed_and_ztxt():
    workflow = load("default_ui.json")
    text = json.dumps(workflow, ensure_ascii=False) + " naïve ✓"
    info = PngInfo()
    info.add_itxt("workflow", text, zip=True)
    info.add_itxt("comment", "grüße ✓", lang="de", tkey="Kommentar")
    info.add_text("prompt", json.dumps(load("default_api.json")), zip=True)  # Latin-1 + zip -> zTXt
    png = make_png(info)
    types = chunk_types(png)
    assert b"iTXt" in types and b"zTXt" in types
    texts = read_png_text(png)
    assert texts["workflow"] == text
    assert texts["comment"] == "grüße ✓"
    assert json.loads(texts["prompt"]) == load("default_api.json")


def test_custom_comf_chunk_and_later_chunk_wins():
    png = make_png()
    iend = png.rindex(b"IEND") - 4
    extra = raw_chunk(b"comf", b"workflow\x00" + json.dumps(load("default_ui.json")).encode())
    extra += raw_chunk(b"tEXt", b"prompt\x00old") + raw_chunk(b"tEXt", b"prompt\x00new")
    texts = read_png_text(png[:iend] + extra + png[iend:])
    assert json.loads(texts["workflow"]) == load("default_ui.json") and texts["prompt"] == "new"


def test_paths_are_accepted(tmp_path):
    info = PngInfo()
    info.add_text("workflow", json.dumps(load("default_ui.json")))
    f = tmp_path / "a.png"
    f.write_bytes(make_png(info))
    assert read_png_text(f) == read_png_text(str(f)) == read_png_text(f.read_bytes())


def test_not_a_png_and_truncated():
    with pytest.raises(ValueError, match="not a PNG"):
        read_png_text(b"GIF89a" + b"\x00" * 40)
    with pytest.raises(ValueError, match="not a PNG"):
        read_png_text(b"")
    info = PngInfo()
    info.add_text("workflow", json.dumps(load("default_ui.json")))
    png = make_png(info)
    for cut in (8 + 4, len(png) // 2, len(png) - 12):
        with pytest.raises(ValueError, match="truncated PNG"):
            read_png_text(png[:cut])
    read_png_text(png)  # the whole file is fine


def test_corrupt_text_chunk_is_skipped_not_fatal(monkeypatch):
    png = make_png()
    iend = png.rindex(b"IEND") - 4
    bad = raw_chunk(b"zTXt", b"workflow\x00\x00not-zlib-data")
    bomb = raw_chunk(b"iTXt", b"big\x00\x01\x00\x00\x00" + zlib.compress(b"x" * 5000))
    good = raw_chunk(b"tEXt", b"prompt\x00{}")
    monkeypatch.setattr(png_metadata, "MAX_TEXT_BYTES", 1000)
    assert read_png_text(png[:iend] + bad + bomb + good + png[iend:]) == {"prompt": "{}"}


def test_invalid_json_gives_none_for_that_document():
    info = PngInfo()
    info.add_text("workflow", "{not json")
    info.add_text("prompt", json.dumps(load("default_api.json")))
    assert workflow_from_png(make_png(info)) == (None, load("default_api.json"))
    info = PngInfo()
    info.add_text("workflow", json.dumps(load("default_ui.json")))
    info.add_text("prompt", json.dumps([1, 2]))  # valid JSON, not a prompt
    assert workflow_from_png(make_png(info)) == (load("default_ui.json"), None)
    assert workflow_from_png(make_png()) == (None, None)


def test_embed_png_text_keeps_the_image_readable():
    png = make_png()
    chunks = png_text_chunks(load("default_api.json"), {"workflow": load("default_ui.json")})
    out = embed_png_text(png, chunks + [("note", "ünïcode ✓ text")])
    types = chunk_types(out)
    assert types.index(b"tEXt") < types.index(b"IDAT") and b"iTXt" in types
    with Image.open(io.BytesIO(out)) as img:
        img.load()
        assert img.text["workflow"] == chunks[1][1]
        assert img.text["note"] == "ünïcode ✓ text"
        assert img.getpixel((3, 3)) == (200, 30, 90)
    assert read_png_text(out) == dict(chunks) | {"note": "ünïcode ✓ text"}
    with pytest.raises(ValueError):
        embed_png_text(png, [("", "x")])
    with pytest.raises(ValueError, match="not a PNG"):
        embed_png_text(b"nope", [])


def test_load_workflow_file(tmp_path):
    ui, api = load("default_ui.json"), load("default_api.json")
    (tmp_path / "ui.json").write_text(json.dumps(ui))
    (tmp_path / "api.json").write_text(json.dumps(api))
    assert load_workflow_file(tmp_path / "ui.json") == ("ui", ui)
    assert load_workflow_file(str(tmp_path / "api.json")) == ("api", api)

    both, only_prompt = PngInfo(), PngInfo()
    for key, text in png_text_chunks(api, {"workflow": ui}):
        both.add_text(key, text)
    only_prompt.add_text("prompt", json.dumps(api))
    (tmp_path / "both.png").write_bytes(make_png(both))
    (tmp_path / "prompt.png").write_bytes(make_png(only_prompt))
    (tmp_path / "bare.png").write_bytes(make_png())
    assert load_workflow_file(tmp_path / "both.png") == ("ui", ui)  # the UI graph is preferred
    assert load_workflow_file(tmp_path / "prompt.png") == ("api", api)
    with pytest.raises(WorkflowFormatError, match="bare.png.*no ComfyUI"):
        load_workflow_file(tmp_path / "bare.png")

    (tmp_path / "garbage.json").write_text("{]")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "cut.png").write_bytes(make_png(both)[:40])
    with pytest.raises(WorkflowFormatError, match="garbage.json"):
        load_workflow_file(tmp_path / "garbage.json")
    with pytest.raises(WorkflowFormatError, match="neither a UI workflow"):
        load_workflow_file(tmp_path / "list.json")
    with pytest.raises(WorkflowFormatError, match="truncated"):
        load_workflow_file(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError):
        load_workflow_file(tmp_path / "missing.json")


def test_png_to_prompt_end_to_end():
    """A PNG saved by ComfyUI's default graph, loaded and converted on the server, gives the API prompt."""
    oi = load("object_info_core.json")
    info = PngInfo()
    for key, text in png_text_chunks(load("default_api.json"), {"workflow": load("default_ui.json")}):
        info.add_text(key, text)
    kind, doc = load_workflow_file_bytes(make_png(info))
    assert kind == "ui" and ui_to_api(doc, oi) == load("default_api.json")


def load_workflow_file_bytes(png: bytes) -> tuple[str, dict]:
    ui, api = workflow_from_png(png)
    return ("ui", ui) if ui is not None else ("api", api)

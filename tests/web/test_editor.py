"""The editor in a real Chromium against a real `sdflow serve` with a tiny checkpoint.

Nodes are added through the UI (node library, double-click search, link-release search), links are
drawn with real mouse drags, and runs go through the real server. `window.sdflow` (the editor's test
hook) is used to read state and to place nodes where the drags expect them.
"""
from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from .conftest import ARTIFACTS, EditorPage, Server

pytestmark = pytest.mark.browser


# ---- helpers ---------------------------------------------------------------------------------------------

def reset_view(ed: EditorPage, scale: float = 1.0) -> None:
    ed.js("""(s) => { sdflow.graph.clear(); const c = sdflow.canvas; c.ds.scale = s; c.ds.offset = [0, 0];
                     c.setDirty(true, true); }""", scale)


def node_ids(ed: EditorPage) -> list[int]:
    return ed.js("sdflow.graph.nodes.map(n => n.id)")


def new_node_id(ed: EditorPage, before: list[int]) -> int:
    added = [i for i in node_ids(ed) if i not in before]
    assert len(added) == 1, f"expected one new node, got {added}"
    return added[0]


def place(ed: EditorPage, node_id: int, x: float, y: float) -> None:
    ed.js(f"() => {{ const n = sdflow.graph.getNodeById({node_id}); n.pos = [{x}, {y}]; sdflow.canvas.setDirty(true, true); }}")


def client(ed: EditorPage, gx: float, gy: float) -> tuple[float, float]:
    return tuple(ed.js(f"sdflow.app.graphToClient({gx}, {gy})"))  # type: ignore[return-value]


def drag(ed: EditorPage, a: tuple[float, float], b: tuple[float, float]) -> None:
    m = ed.page.mouse
    m.move(*a)
    m.down()
    m.move(a[0] + (b[0] - a[0]) * 0.3, a[1] + (b[1] - a[1]) * 0.3, steps=6)
    m.move(*b, steps=10)
    m.up()
    ed.page.wait_for_function("!sdflow.canvas.pointer.isDown")


def slot_index(ed: EditorPage, node_id: int, kind: str, name: str) -> int:
    key = "inputs" if kind == "input" else "outputs"
    idx = ed.js(f"sdflow.graph.getNodeById({node_id}).{key}.findIndex(s => s.name === {json.dumps(name)})")
    assert idx >= 0, f"node {node_id} has no {kind} {name}"
    return idx


def slot(ed: EditorPage, node_id: int, kind: str, name: str) -> tuple[float, float]:
    return tuple(ed.js(f"sdflow.slotPos({node_id}, '{kind}', {slot_index(ed, node_id, kind, name)})"))  # type: ignore


def connect(ed: EditorPage, src: int, out: str, dst: int, inp: str) -> None:
    drag(ed, slot(ed, src, "output", out), slot(ed, dst, "input", inp))


def links(ed: EditorPage) -> set[tuple[int, int, int, str]]:
    """(origin id, origin slot, target id, target input name) for every link."""
    rows = ed.js("""[...sdflow.graph.links.values()].map(l => [l.origin_id, l.origin_slot, l.target_id,
                     sdflow.graph.getNodeById(l.target_id).inputs[l.target_slot].name])""")
    return {tuple(r) for r in rows}  # type: ignore[misc]


def add_from_library(ed: EditorPage, query: str, node_type: str) -> int:
    before = node_ids(ed)
    ed.page.click(".tab[data-tab=nodes]")
    ed.page.fill(".library-filter", query)
    ed.page.click(f".library-item[data-type={node_type}]")
    return new_node_id(ed, before)


def add_from_search(ed: EditorPage, at: tuple[float, float], query: str, node_type: str) -> int:
    """Double-click on empty canvas at graph position `at`, type, pick the entry."""
    before = node_ids(ed)
    for attempt in range(3):
        # A canvas click of the step before, within litegraph's 300 ms double-click window, would pair with
        # this gesture's first click (read as a double-click) and leave its second to close the search box:
        # on a loaded machine that happened. Each gesture starts fresh.
        forget_last_click(ed)
        ed.page.mouse.dblclick(*client(ed, *at))
        try:
            ed.page.wait_for_selector(".search-box .search-input", timeout=15000)
            break
        except Exception:
            if attempt == 2:
                raise
    wait_search_focus(ed)
    ed.page.keyboard.type(query)
    ed.page.click(f".search-item[data-type={node_type}]")
    return new_node_id(ed, before)


def wait_search_focus(ed: EditorPage) -> None:
    ed.page.wait_for_function("document.activeElement && document.activeElement.classList.contains('search-input')")


def release_link_and_pick(ed: EditorPage, start: tuple[float, float], at: tuple[float, float],
                          query: str, node_type: str) -> tuple[int, list[str]]:
    """Drag a link from `start` to empty canvas at graph position `at`; pick from the filtered search."""
    before = node_ids(ed)
    drag(ed, start, client(ed, *at))
    ed.page.wait_for_selector(".search-box .search-input")
    wait_search_focus(ed)
    offered = ed.page.locator(".search-item").evaluate_all("els => els.map(e => e.dataset.type)")
    ed.page.keyboard.type(query)
    ed.page.click(f".search-item[data-type={node_type}]")
    return new_node_id(ed, before), offered


def forget_last_click(ed: EditorPage) -> None:
    """The next click on the canvas starts a new gesture: litegraph reads two clicks at about the same
    spot within 300 ms as a double-click, and a test issues its clicks faster than a person does."""
    ed.js("sdflow.canvas.pointer.eLastDown = undefined")


def set_widget_by_prompt(ed: EditorPage, node_id: int, name: str, value: Any) -> None:
    """Click the middle of a number widget, type into litegraph's value prompt, press Enter."""
    forget_last_click(ed)
    ed.page.mouse.click(*ed.js(f"sdflow.widgetPos({node_id}, {json.dumps(name)}, 0.5)"))
    box = ed.page.locator(".graphdialog input, .graphdialog textarea").first
    box.wait_for()
    box.fill(str(value))
    box.press("Enter")
    ed.page.wait_for_function("([id, name, v]) => sdflow.nodeState(id).widgets[name] === v", arg=[node_id, name, value])
    ed.page.wait_for_selector(".graphdialog", state="detached")


def type_into_textarea(ed: EditorPage, node_id: int, name: str, text: str) -> None:
    handle = ed.page.evaluate_handle(
        f"sdflow.graph.getNodeById({node_id}).widgets.find(w => w.name === {json.dumps(name)}).element")
    el = handle.as_element()
    assert el is not None and el.is_visible(), "the prompt textarea is not shown over its node"
    el.click()
    el.press("Control+A")
    el.type(text)


def wait_persisted(ed: EditorPage, node_id: int, widget: str, value: Any) -> None:
    """Waits until the page has kept the graph, with `widget` at `value`, for a reload."""
    ed.page.wait_for_function(
        """([id, name, v]) => { const wf = sdflow.persisted(); const n = wf && wf.nodes.find(n => n.id === id);
             if (!n) return false; const i = sdflow.graph.getNodeById(id).widgets.findIndex(w => w.name === name);
             return n.widgets_values[i] === v; }""", arg=[node_id, widget, value])


def state(ed: EditorPage, node_id: int) -> dict:
    return ed.js(f"sdflow.nodeState({node_id})")


def watch_progress(ed: EditorPage) -> None:
    """Records, every few ms, the highest progress and running flag the UI showed per node."""
    ed.js("""() => { window.__seen = {}; setInterval(() => {
        for (const n of sdflow.graph.nodes) { const s = sdflow.nodeState(n.id); const o = window.__seen[n.id] ??= {progress: 0, running: false, preview: false};
          if (s.progress) o.progress = Math.max(o.progress, s.progress); if (s.running) o.running = true; if (s.hasPreview) o.preview = true; } }, 5); }""")


def history_images(srv: Server, prompt_id: str) -> list[dict]:
    hist = srv.get(f"/api/history/{prompt_id}")
    out = []
    for node_out in hist[prompt_id]["outputs"].values():
        out += node_out.get("images", [])
    return out


def drop_file(ed: EditorPage, data: bytes, name: str, mime: str, at: tuple[float, float] | None = None) -> None:
    """Dispatches a real drop event carrying a File, as a drag from the desktop does."""
    x, y = at or (200, 200)
    dt = ed.page.evaluate_handle(
        """([b64, name, mime]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: mime})); return dt; }""",
        [base64.b64encode(data).decode(), name, mime])
    ed.page.dispatch_event(".canvas-wrap", "drop", {"dataTransfer": dt, "clientX": x, "clientY": y})


def make_small(ed: EditorPage) -> None:
    """64x64 and 2 steps: the tiny model then runs in a few seconds on CPU."""
    ed.js("""() => { for (const n of sdflow.graph.nodes) {
        if (n.type === 'EmptyLatentImage') { sdflow.setWidget(n.id, 'width', 64); sdflow.setWidget(n.id, 'height', 64); }
        if (n.type === 'KSampler') sdflow.setWidget(n.id, 'steps', 2); } }""")


def run_default_graph(ed: EditorPage, srv: Server) -> tuple[str, int]:
    """Queues the default graph (small) and waits for its SaveImage output; returns (prompt id, save id)."""
    ed.js("sdflow.app.loadDefault()")
    make_small(ed)
    save = ed.js("sdflow.graph.nodes.find(n => n.type === 'SaveImage').id")
    ids = ed.js("sdflow.queue(1)")
    assert len(ids) == 1
    ed.page.wait_for_function(f"sdflow.nodeState({save}).images.length > 0", timeout=180000)
    return ids[0], save


# ---- tests -----------------------------------------------------------------------------------------------

def test_build_txt2img_from_palette_and_run(editor: EditorPage, server: Server) -> None:
    ed = editor
    ed.page.set_viewport_size({"width": 1800, "height": 1000})
    reset_view(ed, 0.85)

    ckpt = add_from_library(ed, "checkpoint", "CheckpointLoaderSimple")
    place(ed, ckpt, 10, 330)
    pos = add_from_library(ed, "clip text", "CLIPTextEncode")
    place(ed, pos, 320, 30)
    neg = add_from_library(ed, "clip text", "CLIPTextEncode")
    place(ed, neg, 320, 290)
    ks = add_from_search(ed, (900, 700), "ksampler", "KSampler")
    place(ed, ks, 760, 30)

    # Dragging KSampler's latent input onto empty canvas offers only nodes producing LATENT.
    latent, offered = release_link_and_pick(ed, slot(ed, ks, "input", "latent_image"), (560, 640),
                                            "empty latent", "EmptyLatentImage")
    assert "EmptyLatentImage" in offered and "KSampler" in offered
    assert "CLIPTextEncode" not in offered and "CheckpointLoaderSimple" not in offered
    place(ed, latent, 380, 560)

    vae = add_from_search(ed, (1200, 700), "vae decode", "VAEDecode")
    place(ed, vae, 1080, 30)
    save, offered = release_link_and_pick(ed, slot(ed, vae, "output", "IMAGE"), (1150, 400), "save",
                                          "SaveImage")
    assert "SaveImage" in offered and "KSampler" not in offered
    place(ed, save, 1330, 30)

    connect(ed, ckpt, "MODEL", ks, "model")
    connect(ed, ckpt, "CLIP", pos, "clip")
    connect(ed, ckpt, "CLIP", neg, "clip")
    connect(ed, pos, "CONDITIONING", ks, "positive")
    connect(ed, neg, "CONDITIONING", ks, "negative")
    connect(ed, ks, "LATENT", vae, "samples")
    connect(ed, ckpt, "VAE", vae, "vae")

    expected_links = {
        (ckpt, 0, ks, "model"), (ckpt, 1, pos, "clip"), (ckpt, 1, neg, "clip"), (pos, 0, ks, "positive"),
        (neg, 0, ks, "negative"), (latent, 0, ks, "latent_image"), (ks, 0, vae, "samples"),
        (ckpt, 2, vae, "vae"), (vae, 0, save, "images"),
    }
    assert links(ed) == expected_links

    type_into_textarea(ed, pos, "text", "a red fox in the snow")
    type_into_textarea(ed, neg, "text", "blurry")
    set_widget_by_prompt(ed, latent, "width", 64)
    set_widget_by_prompt(ed, latent, "height", 64)
    set_widget_by_prompt(ed, ks, "steps", 3)
    ed.js(f"sdflow.setWidget({ks}, 'control_after_generate', 'fixed')")

    api = ed.js("sdflow.graphToApi()")
    assert sorted(n["class_type"] for n in api.values()) == sorted(
        ["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "KSampler", "EmptyLatentImage",
         "VAEDecode", "SaveImage"])
    assert api[str(pos)]["inputs"] == {"text": "a red fox in the snow", "clip": [str(ckpt), 1]}
    k_in = api[str(ks)]["inputs"]
    assert k_in["model"] == [str(ckpt), 0] and k_in["latent_image"] == [str(latent), 0]
    assert k_in["steps"] == 3 and "control_after_generate" not in k_in
    assert api[str(latent)]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    ed.screenshot("editor_built_graph.png")

    watch_progress(ed)
    ed.page.click(".queue-btn")
    ed.page.wait_for_function(f"(window.__seen[{ks}] || {{}}).progress > 0", timeout=180000)
    ed.screenshot("editor_running.png")
    ed.page.wait_for_function(f"sdflow.nodeState({save}).images.length > 0", timeout=180000)
    ed.page.wait_for_function("sdflow.events().some(e => e.type === 'execution_success') && !sdflow.app.execution.runningNode",
                              timeout=60000)
    ed.screenshot("editor_run_done.png")

    seen = ed.js("window.__seen")
    assert seen[str(ks)]["running"] and seen[str(ks)]["progress"] > 0
    st = state(ed, save)
    assert st["images"] == [{"w": 64, "h": 64}]
    events = ed.js("sdflow.events()")
    prompt_id = next(e["data"]["prompt_id"] for e in events if e["type"] == "execution_start")
    assert any(e["type"] == "progress" and str(e["data"]["node"]) == str(ks) for e in events)
    assert any(e["type"] == "execution_success" for e in events)
    # The running outline is gone once the prompt finished.
    assert not any(state(ed, n)["running"] for n in (ckpt, ks, vae, save))

    # What was sent is what the server stored: the UI workflow travels in extra_pnginfo.
    images = history_images(server, prompt_id)
    assert len(images) == 1
    entry = server.get(f"/api/history/{prompt_id}")[prompt_id]
    wf = entry["prompt"][3]["extra_pnginfo"]["workflow"]
    assert sorted(n["type"] for n in wf["nodes"]) == sorted(n["class_type"] for n in api.values())
    ks_node = next(n for n in wf["nodes"] if n["id"] == ks)
    assert ks_node["widgets_values"][1] == "fixed"  # ComfyUI layout: control value right after the seed
    assert ed.errors == []


def test_png_drop_restores_graph(editor: EditorPage, server: Server) -> None:
    ed = editor
    prompt_id, _ = run_default_graph(ed, server)
    ref = history_images(server, prompt_id)[0]
    png = server.request(f"/api/view?filename={ref['filename']}&subfolder={ref['subfolder']}&type={ref['type']}")
    info = Image.open(io.BytesIO(png)).text  # type: ignore[attr-defined]
    sent_workflow = json.loads(info["workflow"])
    sent_prompt = json.loads(info["prompt"])

    # A fresh page with a different graph; dropping the PNG brings the run's graph back.
    ed.js("sdflow.graph.clear()")
    drop_file(ed, png, "result.png", "image/png")
    ed.page.wait_for_function("sdflow.graph.nodes.length === 7", timeout=10000)
    now = ed.js("sdflow.serialize()")

    def shape(wf: dict) -> tuple:
        nodes = sorted((n["id"], n["type"], n.get("mode", 0), json.dumps(n.get("widgets_values")),
                        tuple(round(v) for v in n["pos"])) for n in wf["nodes"])
        return nodes, sorted(tuple(link[:5]) for link in wf["links"])

    assert shape(now) == shape(sent_workflow)
    assert ed.js("sdflow.graphToApi()") == sent_prompt
    ed.screenshot("editor_png_dropped.png")

    # A PNG with only the API prompt (no workflow chunk) rebuilds the same prompt.
    meta = PngImagePlugin.PngInfo()
    meta.add_text("prompt", info["prompt"])
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, "PNG", pnginfo=meta)
    ed.js("sdflow.graph.clear()")
    drop_file(ed, buf.getvalue(), "prompt_only.png", "image/png")
    ed.page.wait_for_function("sdflow.graph.nodes.length === 7", timeout=10000)
    rebuilt = ed.js("sdflow.graphToApi()")
    assert {k: (v["class_type"], v["inputs"]) for k, v in rebuilt.items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in sent_prompt.items()}

    # A .json file in API format loads the same way.
    ed.js("sdflow.graph.clear()")
    drop_file(ed, json.dumps(sent_prompt).encode(), "prompt.json", "application/json")
    ed.page.wait_for_function("sdflow.graph.nodes.length === 7", timeout=10000)
    assert ed.errors == []


def test_type_mismatched_link_is_refused(editor: EditorPage) -> None:
    ed = editor
    reset_view(ed)
    vae = add_from_search(ed, (300, 500), "vae decode", "VAEDecode")
    place(ed, vae, 40, 80)
    ks = add_from_search(ed, (300, 600), "ksampler", "KSampler")
    place(ed, ks, 420, 80)

    # IMAGE -> MODEL: refused, with a message, and no link.
    connect(ed, vae, "IMAGE", ks, "model")
    assert links(ed) == set()
    refused = ed.js("sdflow.lastRefusedLink()")
    assert refused and refused["type"] == "IMAGE" and refused["slot"] == "model"
    ed.page.wait_for_selector(".toast-warning")
    assert "IMAGE" in ed.page.inner_text(".toast-warning")
    ed.screenshot("editor_link_refused.png")

    # The same gesture with matching types connects (so the refusal above is about types).
    connect(ed, ks, "LATENT", vae, "samples")
    assert links(ed) == {(ks, 0, vae, "samples")}
    # A link cannot be forced through the API either.
    assert ed.js(f"sdflow.graph.getNodeById({vae}).connect(0, sdflow.graph.getNodeById({ks}), 0)") is None
    assert ed.errors == []


def test_validation_errors_highlighted(editor: EditorPage, server: Server) -> None:
    ed = editor
    ed.js("sdflow.app.loadDefault()")
    make_small(ed)
    ckpt = ed.js("sdflow.graph.nodes.find(n => n.type === 'CheckpointLoaderSimple').id")
    ks = ed.js("sdflow.graph.nodes.find(n => n.type === 'KSampler').id")
    ed.js(f"sdflow.setWidget({ckpt}, 'ckpt_name', 'no-such-model.safetensors')")
    ed.js(f"sdflow.graph.getNodeById({ks}).disconnectInput(0)")  # model

    queued = ed.js("sdflow.queue(1)")
    assert queued == []
    ed.page.wait_for_selector(".toast-error")
    ed.page.wait_for_function(f"sdflow.nodeState({ckpt}).hasErrors && sdflow.nodeState({ks}).hasErrors")
    ck = state(ed, ckpt)
    assert ck["hasErrors"] and any(i["input"] == "ckpt_name" for i in ck["issues"])
    k = state(ed, ks)
    assert k["hasErrors"] and "model" in k["inputErrors"]
    path = ed.screenshot("editor_validation_error.png")

    # The outline is really drawn: red pixels around the checkpoint node.
    x0, y0 = ed.js(f"(() => {{ const n = sdflow.graph.getNodeById({ckpt}); return sdflow.app.graphToClient(n.pos[0], n.pos[1] - 30); }})()")
    x1, y1 = ed.js(f"(() => {{ const n = sdflow.graph.getNodeById({ckpt}); return sdflow.app.graphToClient(n.pos[0] + n.size[0], n.pos[1] + n.size[1]); }})()")
    img = Image.open(path).convert("RGB")
    red = 0
    for x in range(int(x0) - 12, int(x1) + 12, 2):
        for y in (int(y0) - 6, int(y1) + 6):
            if 0 <= x < img.width and 0 <= y < img.height:
                r, g, b = img.getpixel((x, y))
                red += r > 180 and g < 110 and b < 110
    assert red > 10, "no red outline drawn around the node with the error"

    # Fixing the input clears its error.
    ed.js(f"sdflow.setWidget({ckpt}, 'ckpt_name', 'tiny.safetensors')")
    assert not any(i["input"] == "ckpt_name" for i in state(ed, ckpt)["issues"])
    assert server.get("/api/queue")["queue_pending"] == []


def test_queue_panel_pause_cancel_clear_and_seed_control(editor: EditorPage, server: Server) -> None:
    ed = editor
    ed.js("sdflow.app.loadDefault()")
    make_small(ed)
    ks = ed.js("sdflow.graph.nodes.find(n => n.type === 'KSampler').id")
    ed.page.click(".tab[data-tab=queue]")
    ed.page.click(".queue-panel button:has-text('Pause')")
    ed.page.wait_for_selector(".queue-panel button:has-text('Resume')")
    try:
        ed.js(f"sdflow.setWidget({ks}, 'seed', 100); sdflow.setWidget({ks}, 'control_after_generate', 'increment')")
        ed.page.fill(".batch", "3")
        ed.page.press(".batch", "Tab")
        ed.page.keyboard.press("Control+Enter")
        ed.page.wait_for_function("document.querySelectorAll('.queue-item').length === 3", timeout=10000)
        pending = server.get("/api/queue")["queue_pending"]
        seeds = sorted(item[2][str(ks)]["inputs"]["seed"] for item in pending)
        assert seeds == [100, 101, 102]
        assert state(ed, ks)["widgets"]["seed"] == 103
        ed.screenshot("editor_queue_panel.png")

        # Cancel one pending prompt with its button, then clear the rest.
        first = ed.page.locator(".queue-item").first
        cancelled = first.get_attribute("data-prompt-id")
        first.locator("button[title=Cancel]").click()
        ed.page.wait_for_function("document.querySelectorAll('.queue-item').length === 2", timeout=10000)
        assert cancelled not in [i[1] for i in server.get("/api/queue")["queue_pending"]]
        ed.page.click(".queue-panel button:has-text('Clear')")
        ed.page.wait_for_function("document.querySelectorAll('.queue-item').length === 0", timeout=10000)
        assert server.get("/api/queue")["queue_pending"] == []

        # randomize stays within what a JS number holds exactly; fixed keeps the value.
        ed.js(f"sdflow.setWidget({ks}, 'control_after_generate', 'randomize')")
        ed.page.fill(".batch", "1")
        ed.page.press(".batch", "Tab")
        ed.js("sdflow.queue(1)")
        seed = state(ed, ks)["widgets"]["seed"]
        assert 0 <= seed <= 2**53 - 1 and seed != 103
        ed.js(f"sdflow.setWidget({ks}, 'control_after_generate', 'fixed')")
        ed.js("sdflow.queue(1)")
        assert state(ed, ks)["widgets"]["seed"] == seed
        ed.page.click(".queue-panel button:has-text('Clear')")
    finally:
        server.post("/api/queue", {"clear": True})
        server.post("/api/queue", {"resume": True})
    ed.page.wait_for_selector(".queue-panel button:has-text('Pause')", timeout=10000)
    assert server.get("/api/queue")["paused"] is False


def test_interrupt_from_queue_panel(editor: EditorPage, server: Server) -> None:
    ed = editor
    ed.js("sdflow.app.loadDefault()")
    make_small(ed)
    ks = ed.js("sdflow.graph.nodes.find(n => n.type === 'KSampler').id")
    ed.js(f"sdflow.setWidget({ks}, 'steps', 400)")
    ed.page.click(".tab[data-tab=queue]")
    watch_progress(ed)
    ed.js("sdflow.queue(1)")
    ed.page.wait_for_function(f"(window.__seen[{ks}] || {{}}).progress > 0", timeout=120000)
    ed.page.click(".queue-item.running button[title=Interrupt]")
    ed.page.wait_for_function("sdflow.events().some(e => e.type === 'execution_interrupted')", timeout=60000)
    ed.page.wait_for_selector(".toast-warning")
    assert not state(ed, ks)["running"]


def test_save_load_and_reload_keeps_graph(editor: EditorPage, server: Server) -> None:
    ed = editor
    ed.js("sdflow.app.loadDefault()")
    ks = ed.js("sdflow.graph.nodes.find(n => n.type === 'KSampler').id")
    ed.js(f"sdflow.setWidget({ks}, 'steps', 7)")
    ed.page.keyboard.press("Control+s")
    ed.page.fill(".modal input", "my graph")
    ed.page.press(".modal input", "Enter")
    ed.page.wait_for_selector(".toast-success:has-text('Saved')")
    names = [w["name"] for w in server.get("/api/workflows")]
    assert "my graph" in names
    saved = server.get("/api/workflows/my%20graph")
    assert next(n for n in saved["nodes"] if n["id"] == ks)["widgets_values"][2] == 7

    # The last graph survives a reload (local storage).
    before = ed.js("sdflow.serialize()")
    ed.js(f"sdflow.setWidget({ks}, 'steps', 9)")
    wait_persisted(ed, ks, "steps", 9)
    ed.page.reload()
    ed.page.wait_for_function("window.sdflow && document.body.classList.contains('ready')")
    after = ed.js("sdflow.serialize()")
    assert [n["type"] for n in after["nodes"]] == [n["type"] for n in before["nodes"]]
    assert next(n for n in after["nodes"] if n["id"] == ks)["widgets_values"][2] == 9

    # The change after saving is unsaved work, and stays marked as such after the reload.
    assert ed.js("sdflow.tabs()")[0]["dirty"] is True
    # Loading from the Workflows panel asks first, then brings back the saved version.
    ed.page.click(".tab[data-tab=workflows]")
    ed.page.click(".workflow-item[data-name='my graph']")
    ed.page.click(".modal button[data-choice=replace]")
    ed.page.wait_for_function(f"sdflow.nodeState({ks}).widgets.steps === 7")
    assert ed.page.inner_text(".workflow-name") == "my graph"
    assert ed.errors == []


def test_upload_image_on_load_image(editor: EditorPage, server: Server, tmp_path: Any) -> None:
    ed = editor
    reset_view(ed)
    node = add_from_library(ed, "load image", "LoadImage")
    place(ed, node, 100, 100)
    img_path = tmp_path / "upload me.png"
    Image.new("RGB", (48, 32), (200, 30, 30)).save(img_path)
    with ed.page.expect_file_chooser() as fc:
        ed.page.mouse.click(*ed.js(f"sdflow.widgetPos({node}, 'upload', 0.5)"))
    fc.value.set_files(str(img_path))
    ed.page.wait_for_function(f"sdflow.nodeState({node}).widgets.image === 'upload me.png'", timeout=10000)
    ed.page.wait_for_function(f"sdflow.nodeState({node}).images.length === 1", timeout=10000)
    assert state(ed, node)["images"] == [{"w": 48, "h": 32}]
    # The layout keeps the upload value right after the combo, as ComfyUI stores it.
    wf = ed.js("sdflow.serialize()")
    assert next(n for n in wf["nodes"] if n["id"] == node)["widgets_values"] == ["upload me.png", "image"]
    assert ed.js("sdflow.graphToApi()")[str(node)]["inputs"] == {"image": "upload me.png"}
    # The server lists it after a refresh of the node definitions.
    ed.page.click("button:has-text('Refresh')")
    ed.page.wait_for_selector(".toast-success:has-text('refreshed')")
    values = ed.js(f"sdflow.graph.getNodeById({node}).widgets[0].options.values")
    assert "upload me.png" in values

    # A plain image (no workflow inside) dropped on the canvas becomes a LoadImage node holding it.
    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (20, 120, 220)).save(buf, "JPEG")
    before = node_ids(ed)
    drop_file(ed, buf.getvalue(), "photo.jpg", "image/jpeg", at=client(ed, 600, 500))
    ed.page.wait_for_function(f"sdflow.graph.nodes.length === {len(before) + 1}", timeout=10000)
    dropped = new_node_id(ed, before)
    ed.page.wait_for_function(f"sdflow.nodeState({dropped}).images.length === 1", timeout=10000)
    assert state(ed, dropped)["type"] == "LoadImage" and state(ed, dropped)["widgets"]["image"] == "photo.jpg"
    ed.screenshot("editor_upload.png")


def test_conversion_bypass_mute_reroute_runs(editor: EditorPage, server: Server) -> None:
    ed = editor
    ed.js("sdflow.app.loadDefault()")
    make_small(ed)
    g = ed.js("""(() => { const by = t => sdflow.graph.nodes.find(n => n.type === t);
      const L = sdflow.LiteGraph, G = sdflow.graph;
      const ckpt = by('CheckpointLoaderSimple'), dec = by('VAEDecode'), save = by('SaveImage');
      // Reroute between the checkpoint's VAE and the decoder.
      const rr = L.createNode('Reroute'); rr.pos = [1000, 420]; G.add(rr);
      ckpt.connect(2, rr, 0); rr.connect(0, dec, 1);
      // A bypassed ImageInvert between decoder and save.
      const inv = L.createNode('ImageInvert'); inv.pos = [1250, 420]; G.add(inv);
      dec.connect(0, inv, 0); inv.connect(0, save, 0); inv.mode = 4;
      // A muted preview node.
      const prev = L.createNode('PreviewImage'); prev.pos = [1250, 600]; G.add(prev);
      dec.connect(0, prev, 0); prev.mode = 2;
      const note = L.createNode('Note'); note.pos = [40, 40]; G.add(note);
      return {ckpt: ckpt.id, dec: dec.id, save: save.id, rr: rr.id, inv: inv.id, prev: prev.id, note: note.id}; })()""")
    api = ed.js("sdflow.graphToApi()")
    assert api[str(g["dec"])]["inputs"]["vae"] == [str(g["ckpt"]), 2]
    assert api[str(g["save"])]["inputs"]["images"] == [str(g["dec"]), 0]
    for hidden in ("rr", "inv", "prev", "note"):
        assert str(g[hidden]) not in api
    # Array widget values are wrapped so the server does not read them as links.
    ed.js(f"sdflow.graph.getNodeById({g['save']}).widgets[0].value = ['a', 'b']")
    assert ed.js("sdflow.graphToApi()")[str(g["save"])]["inputs"]["filename_prefix"] == {"__value__": ["a", "b"]}
    ed.js(f"sdflow.setWidget({g['save']}, 'filename_prefix', 'bypass_test')")

    # A Primitive linked to the sampler's seed socket supplies the seed.
    ks = ed.js("sdflow.graph.nodes.find(n => n.type === 'KSampler').id")
    prim, offered = release_link_and_pick(ed, slot(ed, ks, "input", "seed"), (560, 900), "primitive", "PrimitiveNode")
    assert "PrimitiveNode" in offered
    assert ed.js(f"sdflow.graph.getNodeById({prim}).widgets.map(w => w.name)") == ["value", "control_after_generate"]
    ed.js(f"sdflow.setWidget({prim}, 'value', 4242); sdflow.setWidget({prim}, 'control_after_generate', 'fixed')")
    assert ed.js("sdflow.graphToApi()")[str(ks)]["inputs"]["seed"] == 4242
    assert str(prim) not in ed.js("sdflow.graphToApi()")

    ids = ed.js("sdflow.queue(1)")
    assert len(ids) == 1
    ed.page.wait_for_function(f"sdflow.nodeState({g['save']}).images.length > 0", timeout=180000)
    assert history_images(server, ids[0])[0]["filename"].startswith("bypass_test")


def test_auth_token(browser: Any, editor_dist: Any, models_dir: Any, tmp_path: Any) -> None:
    srv = Server(tmp_path / "data", models_dir, token="s3cret-token", name="server_auth")
    try:
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        ed = EditorPage(page)
        # The token comes from the URL once, is kept, and leaves the address bar.
        ed.open(srv.url + "/?token=s3cret-token")
        assert "token" not in page.url
        assert ed.js("localStorage.getItem('sdflow.token')") == "s3cret-token"
        page.wait_for_selector(".conn.online", timeout=15000)
        assert ed.js("Object.keys(sdflow.app.objectInfo).length") > 5
        ctx.close()

        # Without a token, the editor asks for one and then works.
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        page.goto(srv.url + "/")
        page.wait_for_selector(".modal input[type=password]", timeout=15000)
        page.fill(".modal input", "s3cret-token")
        page.press(".modal input", "Enter")
        page.wait_for_function("window.sdflow && document.body.classList.contains('ready')", timeout=30000)
        page.wait_for_selector(".conn.online", timeout=15000)
        ctx.close()
    finally:
        srv.stop()


def test_execution_error_shown_on_node(editor: EditorPage, server: Server) -> None:
    ed = editor
    # A file that passes validation (it exists) but is not an image: LoadImage fails at run time.
    boundary = "----sdflowtest"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"broken.png\"\r\n"
            f"Content-Type: image/png\r\n\r\nnot really a png\r\n--{boundary}--\r\n").encode()
    import urllib.request
    req = urllib.request.Request(server.url + "/api/upload/image", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    urllib.request.urlopen(req, timeout=30).read()
    ed.page.click("button:has-text('Refresh')")
    ed.page.wait_for_selector(".toast-success:has-text('refreshed')")
    reset_view(ed)
    load = add_from_library(ed, "load image", "LoadImage")
    place(ed, load, 80, 80)
    preview, _ = release_link_and_pick(ed, slot(ed, load, "output", "IMAGE"), (600, 200), "preview", "PreviewImage")
    ed.js(f"sdflow.setWidget({load}, 'image', 'broken.png')")
    assert len(ed.js("sdflow.queue(1)")) == 1
    ed.page.wait_for_function(f"sdflow.nodeState({load}).hasErrors", timeout=60000)
    issue = state(ed, load)["issues"][0]["message"]
    assert "Execution failed" in issue and "broken.png" in issue
    assert not state(ed, preview)["hasErrors"]
    ed.page.wait_for_selector(".toast-error:has-text('LoadImage')")
    ed.screenshot("editor_execution_error.png")
    # Choosing another image is the fix: the failure's outline goes with the edit, not at the next run.
    ed.js(f"sdflow.setWidget({load}, 'image', 'another.png')")
    assert not state(ed, load)["hasErrors"]


def click_title(ed: EditorPage, node_id: int) -> None:
    """A real click on a node's title; returns once the editor has it selected."""
    forget_last_click(ed)
    ed.page.mouse.click(*ed.js(f"sdflow.nodeTitlePos({node_id})"))
    ed.page.wait_for_function(f"sdflow.selected().length === 1 && sdflow.selected()[0] === {node_id}")


def undo_depth(ed: EditorPage) -> dict:
    return ed.js("sdflow.undoDepth()")


def test_undo_redo_and_mode_shortcuts(editor: EditorPage) -> None:
    ed = editor
    ed.js("sdflow.app.loadDefault()")
    count = ed.js("sdflow.graph.nodes.length")
    vae = ed.js("sdflow.graph.nodes.find(n => n.type === 'VAEDecode').id")
    # Select the decoder with a real click on its title, then delete it with the keyboard.
    click_title(ed, vae)
    steps = undo_depth(ed)["undo"]
    ed.page.keyboard.press("Delete")
    ed.page.wait_for_function(f"sdflow.graph.nodes.length === {count - 1}")
    ed.page.wait_for_function(f"sdflow.undoDepth().undo === {steps + 1}")
    ed.page.keyboard.press("Control+z")
    ed.page.wait_for_function(f"sdflow.graph.nodes.length === {count}")
    assert ed.js(f"!!sdflow.graph.getNodeById({vae})")
    assert undo_depth(ed) == {"undo": steps, "redo": 1}
    ed.page.keyboard.press("Control+y")
    ed.page.wait_for_function(f"sdflow.graph.nodes.length === {count - 1}")
    assert undo_depth(ed) == {"undo": steps + 1, "redo": 0}
    ed.page.keyboard.press("Control+z")
    ed.page.wait_for_function(f"sdflow.graph.nodes.length === {count}")
    assert undo_depth(ed) == {"undo": steps, "redo": 1}

    # Ctrl+B bypasses the selected node: it leaves the prompt, its links are bridged.
    click_title(ed, vae)
    ed.page.keyboard.press("Control+b")
    assert ed.js(f"sdflow.graph.getNodeById({vae}).mode") == 4
    assert str(vae) not in ed.js("sdflow.graphToApi()")
    ed.screenshot("editor_bypassed.png")
    ed.page.keyboard.press("Control+b")
    ed.page.keyboard.press("Control+m")
    assert ed.js(f"sdflow.graph.getNodeById({vae}).mode") == 2
    api = ed.js("sdflow.graphToApi()")
    save = ed.js("sdflow.graph.nodes.find(n => n.type === 'SaveImage').id")
    assert str(vae) not in api and "images" not in api[str(save)]["inputs"]
    assert ed.errors == []


COMFY_DEFAULT_WORKFLOW = {
    "last_node_id": 9, "last_link_id": 9, "version": 0.4, "config": {}, "groups": [], "extra": {},
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
              [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
              [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
    "nodes": [
        {"id": 3, "type": "KSampler", "pos": [863, 186], "size": [315, 262], "flags": {}, "order": 4, "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1}, {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 6}, {"name": "latent_image", "type": "LATENT", "link": 2}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7], "slot_index": 0}],
         "properties": {}, "widgets_values": [156680208700286, True, 20, 8, "euler", "normal", 1]},
        {"id": 4, "type": "CheckpointLoaderSimple", "pos": [26, 474], "size": [315, 98], "flags": {}, "order": 0, "mode": 0,
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0},
                     {"name": "CLIP", "type": "CLIP", "links": [3, 5], "slot_index": 1},
                     {"name": "VAE", "type": "VAE", "links": [8], "slot_index": 2}],
         "properties": {}, "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
        {"id": 5, "type": "EmptyLatentImage", "pos": [473, 609], "size": [315, 106], "flags": {}, "order": 1, "mode": 0,
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [2], "slot_index": 0}],
         "properties": {}, "widgets_values": [512, 512, 1]},
        {"id": 6, "type": "CLIPTextEncode", "pos": [415, 186], "size": [422, 164], "flags": {}, "order": 2, "mode": 0,
         "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4], "slot_index": 0}],
         "properties": {}, "widgets_values": ["beautiful scenery nature glass bottle landscape, purple galaxy bottle,"]},
        {"id": 7, "type": "CLIPTextEncode", "pos": [413, 389], "size": [425, 180], "flags": {}, "order": 3, "mode": 0,
         "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6], "slot_index": 0}],
         "properties": {}, "widgets_values": ["text, watermark"]},
        {"id": 8, "type": "VAEDecode", "pos": [1209, 188], "size": [210, 46], "flags": {}, "order": 5, "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 7}, {"name": "vae", "type": "VAE", "link": 8}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [9], "slot_index": 0}], "properties": {}},
        {"id": 9, "type": "SaveImage", "pos": [1451, 189], "size": [210, 58], "flags": {}, "order": 6, "mode": 0,
         "inputs": [{"name": "images", "type": "IMAGE", "link": 9}], "properties": {}, "widgets_values": ["ComfyUI"]},
    ],
}


def test_comfyui_workflow_loads_and_converts(editor: EditorPage) -> None:
    """A workflow saved by ComfyUI (no widget sockets, old boolean control value) converts exactly."""
    ed = editor
    drop_file(ed, json.dumps(COMFY_DEFAULT_WORKFLOW).encode(), "comfy_default.json", "application/json")
    ed.page.wait_for_function("sdflow.graph.nodes.length === 7")
    api = ed.js("sdflow.graphToApi()")
    assert {k: (v["class_type"], v["inputs"]) for k, v in api.items()} == {
        "3": ("KSampler", {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
                           "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0],
                           "negative": ["7", 0], "latent_image": ["5", 0]}),
        "4": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        "5": ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
        "6": ("CLIPTextEncode", {"text": "beautiful scenery nature glass bottle landscape, purple galaxy bottle,",
                                 "clip": ["4", 1]}),
        "7": ("CLIPTextEncode", {"text": "text, watermark", "clip": ["4", 1]}),
        "8": ("VAEDecode", {"samples": ["3", 0], "vae": ["4", 2]}),
        "9": ("SaveImage", {"filename_prefix": "ComfyUI", "images": ["8", 0]}),
    }
    saved = ed.js("sdflow.serialize()")
    ks = next(n for n in saved["nodes"] if n["id"] == 3)
    assert ks["widgets_values"] == [156680208700286, "randomize", 20, 8, "euler", "normal", 1]
    # Widget inputs gained sockets (appended, so existing link slots keep their indexes).
    names = [i["name"] for i in ks["inputs"]]
    assert names[:4] == ["model", "positive", "negative", "latent_image"] and "seed" in names
    assert sorted(tuple(link[:5]) for link in saved["links"]) == sorted(tuple(l[:5]) for l in COMFY_DEFAULT_WORKFLOW["links"])
    assert ed.errors == []

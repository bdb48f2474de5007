"""ComfyUI's official front end (comfyui-frontend-package) served by `sdflow serve --frontend comfyui`:
its default graph runs, workflows and settings persist on the server, the model library lists the
checkpoints, and no request fails except those ComfyUI itself answers 4xx."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.timeout(600)

SAVE_IMAGE_LOADED = """() => { const n = app.graph.nodes.find(n => n.type === 'SaveImage');
    return !!(n && n.imgs && n.imgs.length > 0 && n.imgs[0].complete && n.imgs[0].naturalWidth > 0); }"""


def test_default_graph_runs_and_shows_the_image(frontend):
    frontend.open()
    page = frontend.page
    graph = page.evaluate("""() => app.graph.nodes.map(n => ({type: n.type,
        widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value,
                                              values: w.options && w.options.values}))}))""")
    types = sorted(n["type"] for n in graph)
    assert types == ["CLIPTextEncode", "CLIPTextEncode", "CheckpointLoaderSimple", "EmptyLatentImage", "KSampler",
                     "SaveImage", "VAEDecode"]
    loader = next(n for n in graph if n["type"] == "CheckpointLoaderSimple")
    ckpt = next(w for w in loader["widgets"] if w["name"] == "ckpt_name")
    assert ckpt["values"] == ["tiny.safetensors"] and ckpt["value"] == "tiny.safetensors"
    # keep the CPU run short: the same graph with a small latent and two steps
    page.evaluate("""() => { for (const n of app.graph.nodes) for (const w of n.widgets || []) {
        if (w.name === 'steps') w.value = 2; if (w.name === 'width' || w.name === 'height') w.value = 64; }
        app.canvas.ds.scale = 0.6; app.canvas.ds.offset = [100, 0]; app.canvas.setDirty(true, true); }""")
    page.get_by_role("button", name="Run").first.click()
    page.wait_for_function(SAVE_IMAGE_LOADED, timeout=120000)
    frontend.shot("default-graph-run")
    src = page.evaluate("() => app.graph.nodes.find(n => n.type === 'SaveImage').imgs[0].src")
    assert "/view?filename=ComfyUI_" in src and "type=output" in src
    assert any(s == 200 and p.startswith("/api/view?filename=ComfyUI_") for s, _, p in frontend.responses)
    prompts = [p for s, m, p in frontend.responses if m == "POST" and p == "/api/prompt"]
    assert len(prompts) == 1 and (200, "POST", "/api/prompt") in frontend.responses
    assert frontend.failures() == []


def test_saved_workflow_and_setting_survive_a_reload(frontend):
    frontend.open()
    page = frontend.page
    page.evaluate("() => app.extensionManager.setting.set('Comfy.LinkRenderMode', 1)")
    page.evaluate("() => { app.extensionManager.command.execute('Comfy.SaveWorkflow'); }")
    prompt = page.locator(".p-dialog input").first
    prompt.wait_for(state="visible", timeout=20000)
    prompt.fill("from the front end")
    with page.expect_response(lambda r: r.request.method == "POST" and "/api/userdata/workflows" in r.url,
                              timeout=20000) as saved:
        prompt.press("Enter")
    assert saved.value.status == 200
    stored = frontend.server.user_root / "workflows" / "from the front end.json"
    assert stored.exists()
    assert json.loads(stored.read_text())["nodes"]

    frontend.reload()
    assert page.evaluate("() => app.extensionManager.setting.get('Comfy.LinkRenderMode')") == 1
    settings = json.loads((frontend.server.user_root / "comfy.settings.json").read_text())
    assert settings["Comfy.LinkRenderMode"] == 1
    page.keyboard.press("w")                                   # the workflows sidebar
    page.get_by_text("from the front end.json").first.wait_for(state="visible", timeout=20000)
    frontend.shot("workflows-sidebar")
    # sdflow's own workflow library sees the same file
    assert "from the front end" in [w["name"] for w in frontend.server.get("/api/workflows")]
    assert frontend.failures() == []


def test_model_library_lists_the_checkpoints(frontend):
    frontend.open()
    page = frontend.page
    page.keyboard.press("m")                                   # the model library sidebar
    page.get_by_text("checkpoints", exact=True).first.click()
    page.get_by_text("tiny", exact=False).first.wait_for(state="visible", timeout=20000)
    frontend.shot("model-library")
    assert any(s == 200 and p == "/api/experiment/models/checkpoints" for s, _, p in frontend.responses)
    assert frontend.failures() == []

"""The front-end variants of the sampling and SD3 compat workflows (written by
tests/compat/data/make_front_end_variants.py) dropped on the editor in a real Chromium: the schema-0.4 UI file, the schema-1 save, an older front end's save and the SaveImage PNG each give
the editor the graph whose prompt is the API file's (an older save's missing widgets at their defaults)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.compat.front_end_variants import VARIANTS, core, later_filled, variant_path

from .test_editor import drop_file

pytestmark = pytest.mark.browser

DATA = Path(__file__).parents[1] / "compat" / "data"
# one workflow per family: SD1, SD2 v-prediction, SDXL, SD3, SD3.5
CASES = [("sampling", "custom_advanced"), ("sampling", "zsnr_vpred_rescale"), ("sampling", "sdxl_turbo"),
         ("sampling", "split_sigmas_dual_cfg"), ("sd3", "sd3_medium_incl_clips"),
         ("sd3", "sd35_medium_clip_text_encode_sd3")]


@pytest.mark.parametrize(("set_name", "name"), CASES)
def test_dropped_variant_gives_the_api_prompt(editor, server, set_name, name):
    folder = DATA / set_name
    api = json.loads((folder / f"{name}_api.json").read_text())
    object_info = server.get("/api/object_info")
    for variant in VARIANTS:
        path = variant_path(folder, name, variant)
        editor.js("sdflow.graph.clear()")
        mime = "image/png" if path.suffix == ".png" else "application/json"
        drop_file(editor, path.read_bytes(), path.name, mime)
        editor.page.wait_for_function(f"sdflow.graph.nodes.length === {len(api)}", timeout=10000)
        expected = later_filled(api, object_info)[0] if variant == "old" else api
        assert core(editor.js("sdflow.graphToApi()")) == core(expected), variant
    assert editor.errors == []

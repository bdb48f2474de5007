"""`POST /check`: what a posted workflow needs that this server lacks (node classes, model files)."""
from __future__ import annotations

import asyncio

from aiohttp import web

from engine.check import check_prompt
from engine.ui_workflow import is_api_prompt, is_ui_workflow, ui_to_api

from .routing import Routes, json_response, read_json_object
from .security import ApiError
from .state import STATE

routes = Routes("queue")

CHECK_BODY = {
    "type": "object",
    "properties": {"prompt": {"type": "object",
                              "description": "API-format prompt or UI-format workflow (also accepted as the body)"}},
}


@routes.post("/check", "List the missing node classes and model files of a workflow, without running it",
             body=CHECK_BODY,
             responses={"200": "{ok, node_count, missing_nodes: [{class_type, node_ids}], "
                               "missing_models: [{name, folder, paths, nodes}]}",
                        "400": "{error}"})
async def post_check(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request)
    doc = body.get("prompt", body.get("workflow", body)) if isinstance(body, dict) else body
    if is_ui_workflow(doc):
        try:
            object_info = await asyncio.to_thread(state.registry.object_info)
            doc = await asyncio.to_thread(ui_to_api, doc, object_info)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ApiError(400, f"cannot convert the UI workflow: {str(e)[:500]}", type_="invalid_prompt") from None
    elif not is_api_prompt(doc):
        raise ApiError(400, "expected an API-format prompt or a UI-format workflow, as 'prompt' or as the body",
                       type_="invalid_prompt")
    locator_for = getattr(state.catalog, "model_locator", None)
    locator = locator_for(state.registry) if callable(locator_for) else None
    report = await asyncio.to_thread(check_prompt, doc, state.registry, locator)
    return json_response(report.to_dict())

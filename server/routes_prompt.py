"""`/prompt`, `/queue`, `/interrupt`, `/free` and `/history` (reference §2.1-2.2, §2.4)."""
from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp import web

from engine.prompt import apply_overrides
from engine.store import DuplicatePromptId
from engine.ui_workflow import is_ui_workflow, ui_to_api
from engine.validation import validate_prompt

from .routing import Routes, finite_number, json_response, query_int, read_json_object
from .security import ApiError
from .state import STATE, AppState

routes = Routes("queue")

MAX_PROMPT_ID = 200


def _bad_prompt(type_: str, message: str, details: str = "") -> web.Response:
    return json_response({"error": {"type": type_, "message": message, "details": details, "extra_info": {}},
                          "node_errors": {}}, status=400)


def queue_changed(state: AppState) -> None:
    state.hub.broadcast_status()


@routes.get("/prompt", "Queue size", responses={"200": '{"exec_info": {"queue_remaining": N}}'})
async def get_prompt(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].exec_info())


PROMPT_BODY = {
    "type": "object",
    "properties": {
        "prompt": {"type": "object", "description": "API-format prompt, or a UI-format workflow (converted)"},
        "client_id": {"type": "string"}, "prompt_id": {"type": "string"},
        "extra_data": {"type": "object"}, "front": {"type": "boolean"}, "number": {"type": "number"},
        "partial_execution_targets": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["prompt"],
}


@routes.post("/prompt", "Validate and queue a prompt", body=PROMPT_BODY,
             responses={"200": "{prompt_id, number, node_errors}", "400": "{error, node_errors}"})
async def post_prompt(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request)
    prompt = body.get("prompt")
    extra_data = body.get("extra_data", {})
    if extra_data is None:
        extra_data = {}
    if not isinstance(extra_data, dict):
        raise ApiError(400, "'extra_data' must be an object")
    extra_data = dict(extra_data)
    client_id = body.get("client_id")
    if client_id is not None:
        if not isinstance(client_id, str) or len(client_id) > MAX_PROMPT_ID:
            raise ApiError(400, "'client_id' must be a string")
        extra_data["client_id"] = client_id
    targets = body.get("partial_execution_targets")
    if targets is not None:
        if not isinstance(targets, list) or not all(isinstance(t, (str, int)) and not isinstance(t, bool)
                                                    for t in targets):
            raise ApiError(400, "'partial_execution_targets' must be a list of node ids")
        targets = [str(t) for t in targets]
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and (not isinstance(prompt_id, str) or not prompt_id
                                  or len(prompt_id) > MAX_PROMPT_ID):
        raise ApiError(400, f"'prompt_id' must be a non-empty string of at most {MAX_PROMPT_ID} characters")
    front = body.get("front", False)
    if not isinstance(front, bool):
        raise ApiError(400, "'front' must be true or false")
    number = finite_number(body["number"], "number") if body.get("number") is not None else None

    return await enqueue(state, prompt, extra_data, targets=targets, prompt_id=prompt_id, front=front,
                         number=number)


async def enqueue(state: AppState, prompt, extra_data: dict, *, targets: list[str] | None = None,
                  prompt_id: str | None = None, front: bool = False, number: float | None = None,
                  overrides: dict | None = None) -> web.Response:
    """Convert (UI format), apply input overrides, validate and queue: /prompt's answer, shared by the
    routes that queue work."""
    prompt_id = prompt_id or str(uuid.uuid4())
    extra_data.setdefault("create_time", int(time.time() * 1000))   # as ComfyUI: the jobs view sorts by it
    if is_ui_workflow(prompt):
        # A UI-format workflow: convert with the live node schemas; keep the original for PNG metadata.
        try:
            object_info = await asyncio.to_thread(state.registry.object_info)
            api = await asyncio.to_thread(ui_to_api, prompt, object_info)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return _bad_prompt("invalid_prompt", "Cannot convert the UI workflow to a prompt", str(e)[:500])
        pnginfo = extra_data.get("extra_pnginfo")
        pnginfo = dict(pnginfo) if isinstance(pnginfo, dict) else {}
        pnginfo.setdefault("workflow", prompt)
        extra_data["extra_pnginfo"] = pnginfo
        prompt = api
    if prompt is not None and not isinstance(prompt, dict):
        return _bad_prompt("invalid_prompt", "'prompt' must be a JSON object of nodes",
                           f"got {type(prompt).__name__}")
    if overrides:
        try:
            prompt = apply_overrides(prompt or {}, overrides)
        except ValueError as e:
            return _bad_prompt("invalid_prompt", "Cannot apply the inputs", str(e))

    result = await asyncio.to_thread(validate_prompt, prompt, state.registry, targets)
    if not result.ok:
        return json_response({"error": result.error, "node_errors": result.node_errors}, status=400)

    if number is None:
        number = float(state.store.next_number())
        if front:
            number = -number
    try:
        state.store.enqueue(number, prompt_id, prompt, extra_data, result.outputs)
    except DuplicatePromptId:
        raise ApiError(400, f"prompt_id {prompt_id!r} is already queued or in history",
                       type_="duplicate_prompt_id") from None
    state.worker.notify()
    queue_changed(state)
    return json_response({"prompt_id": prompt_id, "number": int(number) if number.is_integer() else number,
                          "node_errors": result.node_errors})


# ---- /queue --------------------------------------------------------------------------------------

@routes.get("/queue", "Running and pending prompts",
            responses={"200": "{queue_running: [item], queue_pending: [item], paused}"})
async def get_queue(request: web.Request) -> web.Response:
    store = request.app[STATE].store
    running, pending = await asyncio.to_thread(lambda: (store.running(), store.pending()))
    return json_response({"queue_running": [i.wire() for i in running],
                          "queue_pending": [i.wire() for i in pending],
                          "paused": store.paused})


def _id_list(body: dict, key: str) -> list[str]:
    ids = body.get(key)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ApiError(400, f"'{key}' must be a list of prompt ids")
    return ids


@routes.post("/queue", "Clear or delete pending prompts; pause or resume the queue",
             body={"type": "object", "properties": {
                 "clear": {"type": "boolean"}, "delete": {"type": "array", "items": {"type": "string"}},
                 "pause": {"type": "boolean"}, "resume": {"type": "boolean"}}})
async def post_queue(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request)
    if body.get("clear"):
        state.store.clear_pending()
    if "delete" in body:
        state.store.delete_pending(_id_list(body, "delete"))
    if body.get("pause"):
        state.worker.set_paused(True)
    if body.get("resume"):
        state.worker.set_paused(False)
    queue_changed(state)
    return web.Response(status=200)


@routes.post("/interrupt", "Interrupt the running prompt (all, or only the given prompt_id)",
             body={"type": "object", "properties": {"prompt_id": {"type": "string"}}})
async def post_interrupt(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request, allow_empty=True)
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not isinstance(prompt_id, str):
        raise ApiError(400, "'prompt_id' must be a string")
    state.worker.interrupt(prompt_id)
    return web.Response(status=200)


@routes.post("/free", "Unload models and/or drop cached outputs (done by the worker when it is idle)",
             body={"type": "object", "properties": {"unload_models": {"type": "boolean"},
                                                    "free_memory": {"type": "boolean"}}})
async def post_free(request: web.Request) -> web.Response:
    body = await read_json_object(request, allow_empty=True)
    request.app[STATE].worker.request_free(bool(body.get("unload_models")), bool(body.get("free_memory")))
    return web.Response(status=200)


# ---- /history ------------------------------------------------------------------------------------

@routes.get("/history", "Finished prompts in insertion order",
            params=[{"name": "max_items", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer"}}])
async def get_history(request: web.Request) -> web.Response:
    store = request.app[STATE].store
    max_items = query_int(request, "max_items", None, minimum=0)
    offset = query_int(request, "offset", -1)
    data = await asyncio.to_thread(store.history, max_items, offset)
    return json_response(data)


@routes.get("/history/{prompt_id}", "One history entry, or {}")
async def get_history_item(request: web.Request) -> web.Response:
    prompt_id = request.match_info["prompt_id"]
    entry = await asyncio.to_thread(request.app[STATE].store.history_item, prompt_id)
    return json_response({prompt_id: entry} if entry is not None else {})


@routes.post("/history", "Clear history or delete entries",
             body={"type": "object", "properties": {"clear": {"type": "boolean"},
                                                    "delete": {"type": "array", "items": {"type": "string"}}}})
async def post_history(request: web.Request) -> web.Response:
    store = request.app[STATE].store
    body = await read_json_object(request)
    if body.get("clear"):
        store.clear_history()
    if "delete" in body:
        store.delete_history(_id_list(body, "delete"))
    return web.Response(status=200)

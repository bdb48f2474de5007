"""ComfyUI's V3 node schema (`comfy_api.latest.io`) as far as custom-node packs use it: `ComfyNode`
subclasses with `define_schema()` / `execute()` classmethods, `Schema`, the input/output types, `Hidden`,
`NodeOutput`. `classic_class(node)` turns such a node into a classic node class, so it becomes a NodeDef
the same way (engine.classic), with one code path for validation, caching and execution.
"""
from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from engine.expansion import ExecutionBlocker


class Input:
    io_type = "*"

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: Any = None, min: Any = None, max: Any = None, step: Any = None,
                 round: Any = None, multiline: bool = False, placeholder: str | None = None, options: Any = None,
                 force_input: bool = False, raw_link: bool | None = None, control_after_generate: bool | None = None,
                 dynamic_prompts: bool | None = None, label_on: str | None = None, label_off: str | None = None,
                 display_mode: Any = None, socketless: bool | None = None, advanced: bool | None = None,
                 extra_dict: dict | None = None, **_: Any) -> None:
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.options: list[Any] | None = None
        if isinstance(options, type) and issubclass(options, Enum):
            self.options = [e.value for e in options]
        elif options is not None:
            self.options = list(options)
        given = {"default": default, "min": min, "max": max, "step": step, "round": round, "tooltip": tooltip,
                 "lazy": lazy, "placeholder": placeholder, "rawLink": raw_link,
                 "control_after_generate": control_after_generate, "dynamicPrompts": dynamic_prompts,
                 "label_on": label_on, "label_off": label_off, "display_name": display_name}
        self.extra = {k: v for k, v in given.items() if v is not None}
        if multiline:
            self.extra["multiline"] = True
        if force_input:
            self.extra["forceInput"] = True
        self.extra.update(extra_dict or {})

    def classic(self) -> tuple:
        if self.io_type == "COMBO":
            return (list(self.options or []), self.extra)
        return (self.io_type, self.extra)


class Output:
    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False, **_: Any) -> None:
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


class ComfyType:
    io_type = "*"
    Input: type[Input] = Input
    Output: type[Output] = Output


def Custom(io_type: str) -> type[ComfyType]:
    """A socket type by name (`io.Custom("MY_TYPE").Input("x")`)."""
    return type(io_type.title().replace("_", ""), (ComfyType,), {
        "io_type": io_type, "Input": type("Input", (Input,), {"io_type": io_type}),
        "Output": type("Output", (Output,), {"io_type": io_type})})


Int = Custom("INT")
Float = Custom("FLOAT")
String = Custom("STRING")
Boolean = Custom("BOOLEAN")
Combo = Custom("COMBO")
AnyType = Custom("*")
Image = Custom("IMAGE")
Mask = Custom("MASK")
Latent = Custom("LATENT")
Conditioning = Custom("CONDITIONING")
Model = Custom("MODEL")
Clip = Custom("CLIP")
Vae = Custom("VAE")
ControlNet = Custom("CONTROL_NET")
ClipVision = Custom("CLIP_VISION")
ClipVisionOutput = Custom("CLIP_VISION_OUTPUT")
StyleModel = Custom("STYLE_MODEL")
UpscaleModel = Custom("UPSCALE_MODEL")
Sampler = Custom("SAMPLER")
Sigmas = Custom("SIGMAS")
Noise = Custom("NOISE")
Guider = Custom("GUIDER")
Gligen = Custom("GLIGEN")
Audio = Custom("AUDIO")
Video = Custom("VIDEO")
Webcam = Custom("WEBCAM")


class Hidden(StrEnum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    """`cls.hidden` during `execute`: the hidden values by their V3 names."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        values = values or {}
        for member in Hidden:
            setattr(self, member.name, values.get(member.name))


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_input_list: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False
    search_aliases: list = field(default_factory=list)
    is_api_node: bool = False
    price_badge: Any = None
    essentials_category: Any = None


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: str | None = None) -> None:
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self) -> tuple | None:
        return self.args or None


class ComfyNode:
    hidden: HiddenHolder = HiddenHolder()

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} must define define_schema()")

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError(f"{cls.__name__} must define execute()")

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        return None

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        return True

    @classmethod
    def check_lazy_status(cls, **kwargs: Any) -> list[str]:
        return []


def is_v3(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, ComfyNode)


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name).__func__ is not getattr(ComfyNode, name).__func__


def _await(value: Any) -> Any:
    # V3 `execute` may be async; nodes run in the executor's worker thread, which has no event loop.
    if inspect.isawaitable(value):
        async def wait() -> Any:
            return await value
        return asyncio.run(wait())
    return value


def _classic_result(out: Any, n_out: int) -> Any:
    if not isinstance(out, NodeOutput):
        return out if isinstance(out, (tuple, dict)) else (out,)
    values: tuple = tuple(out.args)
    if out.block_execution is not None:
        values = tuple(ExecutionBlocker(out.block_execution) for _ in range(n_out))
    ui = out.ui.as_dict() if hasattr(out.ui, "as_dict") else out.ui
    if out.expand is not None:
        return {"result": values, "expand": out.expand, **({"ui": ui} if ui is not None else {})}
    if ui is not None:
        return {"ui": ui, "result": values}
    return values


def classic_class(node: type) -> type:
    """A classic node class that runs the V3 node `node`."""
    schema = node.define_schema()   # type: ignore[attr-defined]
    hidden = {h.name: h.value for h in schema.hidden}
    n_out = len(schema.outputs)

    def input_types(cls: type) -> dict:
        live = node.define_schema()   # type: ignore[attr-defined]   # combos may list files: read each time
        required = {i.id: i.classic() for i in live.inputs if not i.optional}
        optional = {i.id: i.classic() for i in live.inputs if i.optional}
        return {"required": required, "optional": optional, "hidden": dict(hidden)}

    def execute_v3(self: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in hidden}
        # A per-call subclass holds the hidden values, so concurrent graphs do not share them.
        clone: Any = type(node.__name__, (node,), {"hidden": HiddenHolder(values)})
        return _classic_result(_await(clone.execute(**kwargs)), n_out)

    attrs: dict[str, Any] = {
        "INPUT_TYPES": classmethod(input_types), "FUNCTION": "execute_v3", "execute_v3": execute_v3,
        "RETURN_TYPES": tuple(o.io_type for o in schema.outputs),
        "RETURN_NAMES": tuple(o.display_name or o.id or o.io_type for o in schema.outputs),
        "OUTPUT_IS_LIST": tuple(o.is_output_list for o in schema.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in schema.outputs), "CATEGORY": schema.category,
        "DESCRIPTION": schema.description, "OUTPUT_NODE": schema.is_output_node,
        "INPUT_IS_LIST": schema.is_input_list, "NOT_IDEMPOTENT": schema.not_idempotent,
        "DEPRECATED": schema.is_deprecated, "EXPERIMENTAL": schema.is_experimental, "__module__": node.__module__,
    }
    if _overrides(node, "fingerprint_inputs"):
        attrs["IS_CHANGED"] = node.fingerprint_inputs   # type: ignore[attr-defined]
    if _overrides(node, "validate_inputs"):
        attrs["VALIDATE_INPUTS"] = node.validate_inputs   # type: ignore[attr-defined]
    if _overrides(node, "check_lazy_status"):
        def check_lazy_status(self: Any, **available: Any) -> Any:
            return node.check_lazy_status(**available)   # type: ignore[attr-defined]
        attrs["check_lazy_status"] = check_lazy_status
    made = type(node.__name__, (), attrs)
    made.DISPLAY_NAME = schema.display_name   # type: ignore[attr-defined]
    made.SDFLOW_NODE_ID = schema.node_id   # type: ignore[attr-defined]
    return made

"""ComfyUI's classic node protocol mapped onto sdflow's NodeDef.

A classic node is a class: `INPUT_TYPES()` (a classmethod) returns `{"required": {name: (TYPE, options)},
"optional": {...}, "hidden": {name: "PROMPT" | "EXTRA_PNGINFO" | "UNIQUE_ID" | ...}}`; `RETURN_TYPES`,
`RETURN_NAMES`, `OUTPUT_IS_LIST`, `OUTPUT_TOOLTIPS`, `INPUT_IS_LIST`, `OUTPUT_NODE`, `FUNCTION`, `CATEGORY`,
`DESCRIPTION`, `DEPRECATED`, `EXPERIMENTAL` are class attributes; `IS_CHANGED` and `VALIDATE_INPUTS` are
classmethods taking the constant inputs; `check_lazy_status` is a method taking the inputs evaluated so far.
The function returns a tuple, or `{"ui": ..., "result": (...)}`.

The same NodeDef comes out as from a decorated sdflow function, so validation, `/object_info`, the cache
key and the executor treat both alike:
- a TYPE is a widget kind (INT, FLOAT, STRING, BOOLEAN), a combo (a list, or "COMBO" with `options`), or a
  socket wire name; `"*"` and str subclasses that compare unequal to nothing ("any type") match every link;
- an `optional` dict that claims to contain every key ("any input") makes the node accept undeclared inputs;
- `IS_CHANGED` becomes the fingerprint; NaN (ComfyUI's "always changed") becomes a fresh value each time;
- `VALIDATE_INPUTS` becomes the validator, and the inputs it names skip the built-in range/combo checks;
- one instance is kept per node id, as ComfyUI does, so stateful nodes keep their state between runs.
"""
from __future__ import annotations

import inspect
import math
import threading
import uuid
from collections.abc import Callable
from typing import Any

from .expansion import expansion_from
from .inputs import (
    HIDDEN_KINDS,
    BooleanSpec,
    ComboSpec,
    FloatSpec,
    HiddenSpec,
    InputSpec,
    IntSpec,
    SocketSpec,
    StringSpec,
)
from .node import InputDecl, NodeDef, NodeOutput, OutputDecl, Section

_WIDGET_OPTIONS = {"default", "min", "max", "step", "round", "tooltip", "lazy", "forceInput", "multiline",
                   "dynamicPrompts", "placeholder", "label_on", "label_off", "control_after_generate",
                   "options"}


class ClassicNodeError(TypeError):
    """A classic node class that cannot be mapped (named with the class in the message)."""


def is_any_type(wire: Any) -> bool:
    """`"*"`, or a str subclass that claims to equal everything (the any-type trick packs use)."""
    if not isinstance(wire, str):
        return False
    if wire == "*":
        return True
    return type(wire) is not str and not (wire != "\x00sdflow-probe\x00")


def accepts_any_key(section: Any) -> bool:
    """A dict subclass whose `__contains__` says yes to every key (the any-input trick)."""
    if not isinstance(section, dict) or type(section) is dict:
        return False
    try:
        return "\x00sdflow-probe\x00" in section
    except Exception:
        return False


def spec_from_classic(wire: Any, options: dict | None) -> InputSpec:
    """One `(TYPE, options)` entry of `INPUT_TYPES` as an InputSpec."""
    opts = dict(options or {})
    common: dict[str, Any] = {"tooltip": opts.get("tooltip"), "lazy": bool(opts.get("lazy", False))}
    extra = {k: v for k, v in opts.items() if k not in _WIDGET_OPTIONS}
    force = bool(opts.get("forceInput", False))
    if isinstance(wire, (list, tuple)):
        return ComboSpec(choices=tuple(wire), default=opts.get("default", _first(wire)), extra=extra, **common)
    if not isinstance(wire, str):
        raise ClassicNodeError(f"input type {wire!r} is neither a type name nor a list of choices")
    if is_any_type(wire):
        return SocketSpec(wire="*", extra=extra, **common)
    kind = str(wire)
    if kind == "COMBO":
        choices = tuple(opts.get("options") or ())
        return ComboSpec(choices=choices, default=opts.get("default", _first(choices)), extra=extra, **common)
    default = opts["default"] if "default" in opts else _UNSET_DEFAULT.get(kind)
    if kind == "INT":
        return IntSpec(default=default, min=opts.get("min"), max=opts.get("max"), step=opts.get("step"),
                       control_after_generate=bool(opts.get("control_after_generate", False)),
                       force_input=force, extra=extra, **common)
    if kind == "FLOAT":
        return FloatSpec(default=default, min=opts.get("min"), max=opts.get("max"), step=opts.get("step"),
                         round=opts.get("round"), force_input=force, extra=extra, **common)
    if kind == "STRING":
        return StringSpec(default=default, multiline=bool(opts.get("multiline", False)),
                          dynamic_prompts=bool(opts.get("dynamicPrompts", False)),
                          placeholder=opts.get("placeholder"), force_input=force, extra=extra, **common)
    if kind == "BOOLEAN":
        return BooleanSpec(default=default, label_on=opts.get("label_on"), label_off=opts.get("label_off"),
                           force_input=force, extra=extra, **common)
    return SocketSpec(wire=kind, extra=extra, **common)


_UNSET_DEFAULT = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}


def _first(choices: Any) -> Any:
    return choices[0] if len(choices) else None


def _param_names(fn: Callable) -> frozenset[str]:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({"*"})
    return frozenset(n for n in params if n not in ("self", "cls"))


def nodedef_from_class(name: str, cls: Any, *, display_name: str | None = None,
                       python_module: str = "custom_nodes") -> NodeDef:
    """The NodeDef of a classic ComfyUI node class; raises ClassicNodeError naming the class."""
    try:
        declared = cls.INPUT_TYPES()
    except Exception as exc:
        raise ClassicNodeError(f"{name}: INPUT_TYPES() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(declared, dict):
        raise ClassicNodeError(f"{name}: INPUT_TYPES() must return a dict, got {type(declared).__name__}")
    function_name = getattr(cls, "FUNCTION", None)
    if not isinstance(function_name, str) or not callable(getattr(cls, function_name, None)):
        raise ClassicNodeError(f"{name}: FUNCTION must name a method of the class")

    inputs: dict[str, InputDecl] = {}
    accepts_extra = False
    sections: tuple[Section, ...] = ("required", "optional", "hidden")
    for section in sections:
        entries = declared.get(section)
        if entries is None:
            continue
        if section != "hidden" and accepts_any_key(entries):
            accepts_extra = True
        for input_name, entry in dict(entries).items():
            inputs[input_name] = InputDecl(input_name, _input_spec(name, section, input_name, entry), section)

    outputs = _outputs(name, cls)
    instances = _Instances(cls)
    method_name: str = function_name

    def run(**kwargs: Any) -> NodeOutput:
        # Classic nodes always return a tuple (or a ui/result dict); sdflow functions with one output
        # return the bare value, so the result is handed over as a NodeOutput, which means "as is".
        ret = getattr(instances.get(), method_name)(**kwargs)
        if isinstance(ret, dict) and "expand" in ret:
            return expansion_from(ret)  # type: ignore[return-value]   # the executor runs the sub-graph
        if isinstance(ret, dict) and ("ui" in ret or "result" in ret):
            return NodeOutput(tuple(ret.get("result") or ()), ret.get("ui"))
        if isinstance(ret, NodeOutput):
            return ret
        if not isinstance(ret, (tuple, list)):
            raise TypeError(f"{name}.{method_name} must return a tuple, got {type(ret).__name__}")
        return NodeOutput(tuple(ret), None)

    run.__name__ = f"{name}.{method_name}"
    run.__doc__ = getattr(cls, "DESCRIPTION", None) or cls.__doc__

    fingerprint = fingerprint_names = None
    if callable(getattr(cls, "IS_CHANGED", None)):
        is_changed = cls.IS_CHANGED
        fingerprint_names = _param_names(is_changed)

        def fingerprint(**constants: Any) -> Any:
            value = is_changed(**constants)
            # NaN never equals itself: ComfyUI's way of saying "always re-run".
            if isinstance(value, float) and math.isnan(value):
                return f"changed:{uuid.uuid4().hex}"
            return value

    validate = validate_names = None
    if callable(getattr(cls, "VALIDATE_INPUTS", None)):
        validate = cls.VALIDATE_INPUTS
        validate_names = _param_names(validate) - {"input_types"}

    check_lazy = None
    if callable(getattr(cls, "check_lazy_status", None)):
        def check_lazy(**available: Any) -> list[str]:
            return list(instances.get().check_lazy_status(**available) or [])

    description = getattr(cls, "DESCRIPTION", None) or ""
    return NodeDef(
        name=name, fn=run, inputs=inputs, outputs=outputs,
        category=str(getattr(cls, "CATEGORY", "custom") or "custom"), display_name=display_name,
        description=description if isinstance(description, str) else "",
        output_node=bool(getattr(cls, "OUTPUT_NODE", False)),
        deterministic=not bool(getattr(cls, "NOT_IDEMPOTENT", False)),
        fingerprint=fingerprint, validate=validate, check_lazy=check_lazy,
        input_is_list=bool(getattr(cls, "INPUT_IS_LIST", False)), accepts_extra=accepts_extra,
        deprecated=bool(getattr(cls, "DEPRECATED", False)), experimental=bool(getattr(cls, "EXPERIMENTAL", False)),
        python_module=python_module, validate_names=validate_names or frozenset(),
        fingerprint_names=fingerprint_names,
    )


def _input_spec(node: str, section: str, input_name: str, entry: Any) -> InputSpec:
    if section == "hidden":
        kind = entry[0] if isinstance(entry, (list, tuple)) else entry
        if kind not in HIDDEN_KINDS:
            raise ClassicNodeError(f"{node}, hidden input {input_name!r}: unknown kind {kind!r}")
        return HiddenSpec(wire=kind)
    if isinstance(entry, str) or (isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], list)):
        entry = (entry,) if isinstance(entry, str) else entry
    if not isinstance(entry, (list, tuple)) or not entry:
        raise ClassicNodeError(f"{node}, input {input_name!r}: expected (TYPE, options), got {entry!r}")
    options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else None
    try:
        return spec_from_classic(entry[0], options)
    except ClassicNodeError as exc:
        raise ClassicNodeError(f"{node}, input {input_name!r}: {exc}") from None


def _outputs(node: str, cls: Any) -> list[OutputDecl]:
    types = tuple(getattr(cls, "RETURN_TYPES", ()) or ())
    names = tuple(getattr(cls, "RETURN_NAMES", ()) or ())
    is_list = getattr(cls, "OUTPUT_IS_LIST", None)
    tooltips = tuple(getattr(cls, "OUTPUT_TOOLTIPS", ()) or ())
    flags = [bool(is_list)] * len(types) if isinstance(is_list, bool) else list(is_list or ())
    outs = []
    for i, wire in enumerate(types):
        if isinstance(wire, (list, tuple)):
            wire_name = "COMBO"
        elif isinstance(wire, str):
            wire_name = "*" if is_any_type(wire) else str(wire)
        else:
            raise ClassicNodeError(f"{node}: RETURN_TYPES[{i}] is {wire!r}, not a type name")
        outs.append(OutputDecl(wire_name, names[i] if i < len(names) else wire_name,
                               bool(flags[i]) if i < len(flags) else False,
                               tooltips[i] if i < len(tooltips) else None))
    return outs


class _Instances:
    """One instance of the class per node id (ComfyUI keeps node objects between runs of the same graph);
    outside an executor run, one shared instance."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls
        self._by_node: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self) -> Any:
        from .progress import _current
        ctx = _current.get()
        key = getattr(ctx, "node_id", None) or ""
        with self._lock:
            obj = self._by_node.get(key)
            if obj is None:
                if len(self._by_node) > 4096:   # bounded: graphs come and go
                    self._by_node.clear()
                obj = self._by_node[key] = self.cls()
            return obj




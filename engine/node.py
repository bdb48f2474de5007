"""The node declaration: one decorated Python function is a node type.

    @node("KSampler", category="sampling")
    def ksampler(model: Model, seed: Int(0, min=0, max=2**64 - 1, control_after_generate=True), ...) -> Latent:

The signature gives the inputs (names, order, sockets and widgets with their ranges), the return
annotation the outputs, and the decorator the rest. From that one declaration come validation (pydantic),
the `/object_info` entry, the cache key's inputs and the function the executor calls. The function is
returned unchanged, so a node is unit-tested by calling it.
"""
from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .inputs import (
    BooleanSpec,
    ComboSpec,
    FloatSpec,
    HiddenSpec,
    InputSpec,
    IntSpec,
    StringSpec,
    output_wire,
    spec_from_annotation,
)

Section = Literal["required", "optional", "hidden"]


@dataclass(frozen=True)
class InputDecl:
    name: str
    spec: InputSpec
    section: Section


@dataclass(frozen=True)
class OutputDecl:
    wire: str
    name: str
    is_list: bool = False
    tooltip: str | None = None


@dataclass
class NodeOutput:
    """What a node may return when it has UI to show (output nodes) besides its socket values."""

    result: tuple = ()
    ui: dict | None = None


def UI(**ui: Any) -> NodeOutput:
    """Shorthand for an output node with no socket outputs: `return UI(images=[...])`."""
    return NodeOutput((), ui)


@dataclass
class NodeDef:
    name: str
    fn: Callable[..., Any]
    inputs: dict[str, InputDecl]
    outputs: list[OutputDecl]
    category: str = "sdflow"
    display_name: str | None = None
    description: str = ""
    output_node: bool = False
    version: int | str = 1
    deterministic: bool = True
    fingerprint: Callable[..., Any] | None = None
    validate: Callable[..., Any] | None = None
    check_lazy: Callable[..., Any] | None = None
    input_is_list: bool = False
    accepts_extra: bool = False        # the function takes **kwargs: undeclared inputs are passed through
    deprecated: bool = False
    experimental: bool = False
    python_module: str = "nodes"
    validate_names: frozenset[str] = field(default_factory=frozenset)
    fingerprint_names: frozenset[str] | None = None
    # `cost(**inputs) -> engine.cost.Estimate`: the memory the node will need, from its constants and its
    # linked inputs' estimated sizes, so a prompt that cannot fit is refused before it runs.
    cost: Callable[..., Any] | None = None

    # ---- schema -----------------------------------------------------------------------------------
    def info(self) -> dict:
        """The `/object_info` entry, in ComfyUI's shape. Dynamic combos are listed as of now."""
        sections: dict[str, dict] = {"required": {}, "optional": {}, "hidden": {}}
        order: dict[str, list[str]] = {"required": [], "optional": [], "hidden": []}
        for decl in self.inputs.values():
            sections[decl.section][decl.name] = decl.spec.wire if decl.section == "hidden" else decl.spec.to_info()
            order[decl.section].append(decl.name)
        info = {
            "input": {k: v for k, v in sections.items() if v or k == "required"},
            "input_order": {k: v for k, v in order.items() if v or k == "required"},
            "output": [o.wire for o in self.outputs],
            "output_is_list": [o.is_list for o in self.outputs],
            "output_name": [o.name for o in self.outputs],
            "name": self.name,
            "display_name": self.display_name or self.name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if any(o.tooltip for o in self.outputs):
            info["output_tooltips"] = [o.tooltip or "" for o in self.outputs]
        if self.deprecated:
            info["deprecated"] = True
        if self.experimental:
            info["experimental"] = True
        return info

    # ---- value validation -------------------------------------------------------------------------
    def validates_itself(self, name: str) -> bool:
        """Inputs the node's own `validate` takes skip the built-in range and combo checks (ComfyUI's
        VALIDATE_INPUTS rule; a `**kwargs` validator takes them all)."""
        return name in self.validate_names or "*" in self.validate_names

    @cached_property
    def widget_model(self) -> type[BaseModel]:
        """A pydantic model over the INT/FLOAT/STRING/BOOLEAN inputs; every field optional because a link
        may supply the value instead."""
        fields: dict[str, Any] = {}
        for decl in self.inputs.values():
            spec = decl.spec
            if decl.section == "hidden" or self.validates_itself(decl.name):
                continue
            if isinstance(spec, IntSpec):
                fields[decl.name] = (int | None, Field(None, ge=spec.min, le=spec.max))
            elif isinstance(spec, FloatSpec):
                fields[decl.name] = (float | None, Field(None, ge=spec.min, le=spec.max, allow_inf_nan=False))
            elif isinstance(spec, StringSpec):
                fields[decl.name] = (str | None, None)
            elif isinstance(spec, BooleanSpec):
                fields[decl.name] = (bool | None, None)
        config = ConfigDict(coerce_numbers_to_str=True, extra="ignore")
        return create_model(f"{self.name}Widgets", __config__=config, **fields)

    @cached_property
    def _exact_types(self) -> dict[str, tuple[type, Any, Any]]:
        """name -> (python type, min, max) of the widget inputs pydantic validates."""
        kinds = {IntSpec: int, FloatSpec: float, StringSpec: str, BooleanSpec: bool}
        out = {}
        for name in self.widget_model.model_fields:
            spec = self.inputs[name].spec
            out[name] = (kinds[type(spec)], getattr(spec, "min", None), getattr(spec, "max", None))
        return out

    def _already_valid(self, name: str, value: Any) -> bool:
        """The common case, a value of exactly the right type within range, needs no pydantic round trip
        (validation cost matters for large graphs); anything else goes through the model."""
        kind, low, high = self._exact_types[name]
        if type(value) is not kind:
            return False
        if kind is float and (value != value or value in (float("inf"), float("-inf"))):
            return False
        return (low is None or value >= low) and (high is None or value <= high)

    def check_values(self, values: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
        """Coerce and range-check constant widget values. Returns (coerced values, ComfyUI error dicts)."""
        errors: list[dict] = []
        coerced = dict(values)
        model = self.widget_model
        subset = {k: v for k, v in values.items() if k in model.model_fields and not self._already_valid(k, v)}
        if subset:
            try:
                parsed = model.model_validate(subset)
                for k in subset:
                    coerced[k] = getattr(parsed, k)
            except ValidationError as exc:
                bad = set()
                for err in exc.errors():
                    name = str(err["loc"][0])
                    if name in bad:
                        continue
                    bad.add(name)
                    errors.append(_value_error(self, name, values.get(name), err))
                model_ok = {k: v for k, v in subset.items() if k not in bad}
                if model_ok:
                    parsed = model.model_validate(model_ok)
                    for k in model_ok:
                        coerced[k] = getattr(parsed, k)
        for name, value in values.items():
            decl = self.inputs.get(name)
            if decl is None or not isinstance(decl.spec, ComboSpec) or self.validates_itself(name):
                continue
            choices = decl.spec.values()
            if value not in choices:
                shown = f"(list of length {len(choices)})" if len(choices) > 20 else str(choices)
                text = value if isinstance(value, str) else repr(value)
                hint = ""
                if isinstance(value, str) and len(value) < 200 and len(choices) <= 500:
                    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.6)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                errors.append(_error("value_not_in_list", "Value not in list",
                                     f"{name}: '{text[:200]}' not in {shown}{hint}", name, value))
        return coerced, errors


def _error(kind: str, message: str, details: str, name: str, value: Any, **more: Any) -> dict:
    shown = value if _jsonable(value) else repr(value)
    if isinstance(shown, str) and len(shown) > 200:   # an error must stay small whatever was sent
        shown = shown[:200] + "…"
    extra = {"input_name": name, "received_value": shown}
    extra.update(more)
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _value_error(nd: NodeDef, name: str, value: Any, err: Mapping[str, Any]) -> dict:
    spec = nd.inputs[name].spec
    kind = err.get("type", "")
    if kind in ("greater_than_equal", "greater_than"):
        return _error("value_smaller_than_min", f"Value {value} smaller than min of {getattr(spec, 'min', None)}",
                      f"{name}", name, value, input_config=spec.to_info())
    if kind in ("less_than_equal", "less_than"):
        return _error("value_bigger_than_max", f"Value {value} bigger than max of {getattr(spec, 'max', None)}",
                      f"{name}", name, value, input_config=spec.to_info())
    return _error("invalid_input_type", f"Failed to convert an input value to a {spec.wire} value",
                  f"{name}, {value!r}, {err.get('msg', '')}", name, value)


# ---- the decorator ------------------------------------------------------------------------------

def node(name: str | None = None, *, category: str = "sdflow", display_name: str | None = None,
         description: str | None = None, output_node: bool = False, version: int | str = 1,
         deterministic: bool = True, fingerprint: Callable[..., Any] | None = None,
         validate: Callable[..., Any] | None = None, check_lazy: Callable[..., Any] | None = None,
         input_is_list: bool = False, output_is_list: bool | Sequence[bool] = False,
         output_names: Sequence[str] | None = None, output_tooltips: Sequence[str] | None = None,
         deprecated: bool = False, experimental: bool = False,
         cost: Callable[..., Any] | None = None) -> Callable[[Callable], Callable]:
    """Declare a node type. `fingerprint(**constants)` returns what else the result depends on (a file's
    hash); `deterministic=False` re-runs the node on every prompt; `validate(**constants)` returns True or
    an error string; `check_lazy(**inputs)` returns the names of lazy inputs it needs."""

    def wrap(fn: Callable) -> Callable:
        nd = build_nodedef(fn, name=name or fn.__name__, category=category, display_name=display_name,
                           description=description, output_node=output_node, version=version,
                           deterministic=deterministic, fingerprint=fingerprint, validate=validate,
                           check_lazy=check_lazy, input_is_list=input_is_list, output_is_list=output_is_list,
                           output_names=output_names, output_tooltips=output_tooltips,
                           deprecated=deprecated, experimental=experimental, cost=cost)
        fn.__sdflow_node__ = nd  # type: ignore[attr-defined]  # the declaration rides on its function
        return fn

    return wrap


def build_nodedef(fn: Callable, *, name: str, output_is_list: bool | Sequence[bool] = False,
                  output_names: Sequence[str] | None = None, output_tooltips: Sequence[str] | None = None,
                  description: str | None = None, **flags: Any) -> NodeDef:
    hints = typing.get_type_hints(fn, include_extras=True)
    sig = inspect.signature(fn)
    inputs: dict[str, InputDecl] = {}
    accepts_extra = False
    for pname, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_extra = True
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"node {name}: *args is not supported")
        if pname not in hints:
            raise TypeError(f"node {name}: parameter {pname!r} needs an annotation")
        annotation, optional = _strip_optional(hints[pname])
        try:
            spec = spec_from_annotation(annotation)
        except TypeError as exc:
            raise TypeError(f"node {name}, input {pname!r}: {exc}") from None
        if param.default is not inspect.Parameter.empty and param.default is not None:
            spec = spec.with_default(param.default)
        if isinstance(spec, HiddenSpec):
            section: Section = "hidden"
        elif optional:
            section = "optional"
        else:
            section = "required"
        inputs[pname] = InputDecl(pname, spec, section)

    outputs = _outputs(name, hints.get("return", None), output_is_list, output_names, output_tooltips)
    validate = flags.get("validate")
    fingerprint = flags.get("fingerprint")
    return NodeDef(
        name=name, fn=fn, inputs=inputs, outputs=outputs,
        description=description if description is not None else _first_paragraph(fn.__doc__),
        accepts_extra=accepts_extra, python_module=getattr(fn, "__module__", "nodes") or "nodes",
        validate_names=frozenset(_param_names(validate)) if validate else frozenset(),
        fingerprint_names=frozenset(_param_names(fingerprint)) if fingerprint else None,
        **flags,
    )


def _param_names(fn: Callable) -> list[str]:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return ["*"]
    return list(params)


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(annotation)):
            return args[0], True
    return annotation, False


def _outputs(name: str, annotation: Any, is_list: bool | Sequence[bool], names: Sequence[str] | None,
             tooltips: Sequence[str] | None) -> list[OutputDecl]:
    if annotation is None or annotation is type(None) or annotation is NodeOutput:
        items: list[tuple[str | None, Any]] = []
    elif isinstance(annotation, type) and issubclass(annotation, tuple) and hasattr(annotation, "_fields"):
        field_hints = typing.get_type_hints(annotation, include_extras=True)
        items = [(f, field_hints[f]) for f in annotation._fields]
    elif get_origin(annotation) is tuple:
        items = [(None, a) for a in get_args(annotation)]
    else:
        items = [(None, annotation)]
    flags = [is_list] * len(items) if isinstance(is_list, bool) else list(is_list)
    outs = []
    for i, (fname, ann) in enumerate(items):
        try:
            wire = output_wire(ann)
        except TypeError as exc:
            raise TypeError(f"node {name}, output {i}: {exc}") from None
        label = (names[i] if names else None) or fname or wire
        outs.append(OutputDecl(wire, label, bool(flags[i]) if i < len(flags) else False,
                               tooltips[i] if tooltips and i < len(tooltips) else None))
    return outs


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()


def nodedef_of(obj: Any) -> NodeDef | None:
    return getattr(obj, "__sdflow_node__", None)

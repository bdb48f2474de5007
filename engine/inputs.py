"""Input and socket declarations: what a node parameter's annotation may say.

A parameter annotation resolves to one `InputSpec`. Declarations are `typing.Annotated`, so type checkers
see the real Python type and sdflow reads the spec from the metadata (FastAPI's `Annotated[int, Query()]`):
- a socket type: `Image = Annotated[torch.Tensor, Socket("IMAGE")]` (or `socket("IMAGE", torch.Tensor)`,
  which builds the same alias at run time but is not a type alias to a type checker);
- a widget: `seed: Annotated[int, Int(0, min=0)]`, likewise `Float`, `String`, `Boolean`, `Combo`; or the
  plain types int/float/str/bool, or `Literal[...]` (a fixed combo);
- `Annotated[Any, Hidden("PROMPT")]` and friends for values the executor fills in;
- `Annotated[Image, Lazy()]` marks a socket or widget lazy.
The helpers return specs; the older bare form `seed: Int(0)` still works at run time (the annotation is then
the spec itself) but type checkers reject a call in an annotation, so the code base uses `Annotated`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, get_args, get_origin

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
HIDDEN_KINDS = ("PROMPT", "DYNPROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG")
_UNSET: Any = object()


@dataclass(frozen=True, eq=False)
class InputSpec:
    """How one node input looks on the wire and in `/object_info`."""

    wire: str
    tooltip: str | None = None
    lazy: bool = False
    force_input: bool = False
    extra: dict = field(default_factory=dict)   # passthrough options (image_upload, display, ...)
    default: Any = _UNSET

    @property
    def is_widget(self) -> bool:
        return self.wire in WIDGET_TYPES and not self.force_input

    def with_default(self, value: Any) -> InputSpec:
        return replace(self, default=value)

    def options(self) -> dict:
        """The options dict of the `/object_info` input tuple."""
        opts: dict[str, Any] = {}
        if self.default is not _UNSET:
            opts["default"] = self.default
        if self.tooltip:
            opts["tooltip"] = self.tooltip
        if self.lazy:
            opts["lazy"] = True
        if self.force_input:
            opts["forceInput"] = True
        opts.update(self.extra)
        return opts

    def wire_type(self) -> Any:
        return self.wire

    def to_info(self) -> list:
        opts = self.options()
        return [self.wire_type(), opts] if opts else [self.wire_type()]


@dataclass(frozen=True, eq=False)
class IntSpec(InputSpec):
    wire: str = "INT"
    min: int | None = None
    max: int | None = None
    step: int | None = None
    control_after_generate: bool = False

    def options(self) -> dict:
        opts = super().options()
        opts.setdefault("default", 0)
        for key in ("min", "max", "step"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        if self.control_after_generate:
            opts["control_after_generate"] = True
        return opts


@dataclass(frozen=True, eq=False)
class FloatSpec(InputSpec):
    wire: str = "FLOAT"
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None

    def options(self) -> dict:
        opts = super().options()
        opts.setdefault("default", 0.0)
        for key in ("min", "max", "step", "round"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts


@dataclass(frozen=True, eq=False)
class StringSpec(InputSpec):
    wire: str = "STRING"
    multiline: bool = False
    dynamic_prompts: bool = False
    placeholder: str | None = None

    def options(self) -> dict:
        opts = super().options()
        opts.setdefault("default", "")
        if self.multiline:
            opts["multiline"] = True
        if self.dynamic_prompts:
            opts["dynamicPrompts"] = True
        if self.placeholder:
            opts["placeholder"] = self.placeholder
        return opts


@dataclass(frozen=True, eq=False)
class BooleanSpec(InputSpec):
    wire: str = "BOOLEAN"
    label_on: str | None = None
    label_off: str | None = None

    def options(self) -> dict:
        opts = super().options()
        opts.setdefault("default", False)
        if self.label_on:
            opts["label_on"] = self.label_on
        if self.label_off:
            opts["label_off"] = self.label_off
        return opts


@dataclass(frozen=True, eq=False)
class ComboSpec(InputSpec):
    """A choice among values. `choices` is a list, or a callable for lists that change (file names);
    it is called each time the schema is read or a value is validated."""

    wire: str = "COMBO"
    choices: Sequence[Any] | Callable[[], Sequence[Any]] = ()

    def values(self) -> list:
        return list(self.choices() if callable(self.choices) else self.choices)

    def wire_type(self) -> Any:
        # Classic ComfyUI combos put the list itself in the type position.
        return self.values()

    def options(self) -> dict:
        opts = super().options()
        if self.default is _UNSET:
            opts.pop("default", None)
        return opts


@dataclass(frozen=True, eq=False)
class HiddenSpec(InputSpec):
    wire: str = "PROMPT"


@dataclass(frozen=True, eq=False)
class SocketSpec(InputSpec):
    """A link-only input (MODEL, LATENT, IMAGE, ...). `"A,B"` is a union and `"*"` matches anything."""


# ---- the public declaration helpers -------------------------------------------------------------

def Socket(wire: str, **options: Any) -> SocketSpec:
    """The metadata of a socket type: `Image = Annotated[torch.Tensor, Socket("IMAGE")]`."""
    return SocketSpec(wire=wire, **options)


def socket(wire: str, python_type: Any = Any) -> Any:
    """A socket type built at run time: `Image = socket("IMAGE", torch.Tensor)` (for plugins; in typed code
    write the `Annotated` alias so type checkers accept it)."""
    return Annotated[python_type, SocketSpec(wire=wire)]


def Int(default: int = _UNSET, *, min: int | None = None, max: int | None = None, step: int | None = None,
        control_after_generate: bool = False, tooltip: str | None = None, lazy: bool = False,
        force_input: bool = False, **extra: Any) -> IntSpec:
    return (IntSpec(default=default, min=min, max=max, step=step,
                                  control_after_generate=control_after_generate, tooltip=tooltip,
                                  lazy=lazy, force_input=force_input, extra=extra))


def Float(default: float = _UNSET, *, min: float | None = None, max: float | None = None,
          step: float | None = None, round: float | None = None, tooltip: str | None = None,
          lazy: bool = False, force_input: bool = False, **extra: Any) -> FloatSpec:
    return (FloatSpec(default=default, min=min, max=max, step=step, round=round,
                                      tooltip=tooltip, lazy=lazy, force_input=force_input, extra=extra))


def String(default: str = _UNSET, *, multiline: bool = False, dynamic_prompts: bool = False,
           placeholder: str | None = None, tooltip: str | None = None, lazy: bool = False,
           force_input: bool = False, **extra: Any) -> StringSpec:
    return (StringSpec(default=default, multiline=multiline, dynamic_prompts=dynamic_prompts,
                                     placeholder=placeholder, tooltip=tooltip, lazy=lazy,
                                     force_input=force_input, extra=extra))


def Boolean(default: bool = _UNSET, *, label_on: str | None = None, label_off: str | None = None,
            tooltip: str | None = None, lazy: bool = False, **extra: Any) -> BooleanSpec:
    return (BooleanSpec(default=default, label_on=label_on, label_off=label_off,
                                       tooltip=tooltip, lazy=lazy, extra=extra))


def Combo(choices: Sequence[Any] | Callable[[], Sequence[Any]], default: Any = _UNSET, *,
          tooltip: str | None = None, lazy: bool = False, **extra: Any) -> ComboSpec:
    return ComboSpec(choices=choices, default=default, tooltip=tooltip, lazy=lazy, extra=extra)


def Hidden(kind: str) -> HiddenSpec:
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"unknown hidden input kind {kind!r}; expected one of {HIDDEN_KINDS}")
    return HiddenSpec(wire=kind)


@dataclass(frozen=True)
class LazyMarker:
    """`Annotated[Image, Lazy()]`: the input is evaluated only when the node's `check_lazy` asks for it."""


def Lazy(annotation: Any = None) -> Any:
    """`Annotated[T, Lazy()]` marks an input lazy. The older `Lazy(T)` form returns the lazy spec of `T`."""
    if annotation is None:
        return LazyMarker()
    return replace(spec_from_annotation(annotation), lazy=True)


# ---- annotation -> spec -------------------------------------------------------------------------

_PLAIN = {int: IntSpec, float: FloatSpec, str: StringSpec, bool: BooleanSpec}


def spec_from_annotation(annotation: Any) -> InputSpec:
    """Resolve a parameter annotation to its InputSpec (raises TypeError for anything else)."""
    if get_origin(annotation) is Annotated:
        metas = get_args(annotation)[1:]
        lazy = any(isinstance(m, LazyMarker) for m in metas)
        for meta in reversed(metas):   # the innermost alias's spec comes first; the outermost wins
            if isinstance(meta, InputSpec):
                return replace(meta, lazy=True) if lazy else meta
        inner = spec_from_annotation(get_args(annotation)[0])
        return replace(inner, lazy=True) if lazy else inner
    if isinstance(annotation, InputSpec):
        return annotation
    if annotation in _PLAIN:
        return _PLAIN[annotation]()
    if get_origin(annotation) is Literal:
        return ComboSpec(choices=tuple(get_args(annotation)))
    raise TypeError(f"cannot derive a node input from annotation {annotation!r}")


def output_wire(annotation: Any) -> str:
    """Wire name of an output annotation (a socket alias or a plain widget type)."""
    spec = spec_from_annotation(annotation)
    return spec.wire


def types_match(output_type: str, input_type: str) -> bool:
    """ComfyUI's link rule: equal, either side '*', or overlapping comma-separated unions."""
    if output_type == input_type or output_type == "*" or input_type == "*":
        return True
    outs = {t.strip() for t in output_type.split(",")}
    ins = {t.strip() for t in input_type.split(",")}
    return bool(outs & ins) or "*" in outs or "*" in ins

"""sdflow's Stable Diffusion domain: node definitions and the model machinery under them."""
from typing import Any

MAX_RESOLUTION = 16384   # ComfyUI's `nodes.MAX_RESOLUTION`, which custom-node packs read

_COMPAT = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "common_ksampler")


def build_registry(config, *, plugins: bool = True):
    """(Registry of the built-in SD nodes plus installed plugins, model catalog), configured for `config`."""
    from .builtin import build_registry as build
    return build(config, plugins=plugins)


def __getattr__(name: str) -> Any:
    # ComfyUI's `nodes` module as custom-node packs use it (`nodes.KSampler().sample(...)`), built on first use.
    if name in _COMPAT or (name[:1].isupper() and not name.startswith("__")):
        from .comfy_compat import classes
        if name in _COMPAT:
            return getattr(classes, name)
        try:
            return classes.NODE_CLASS_MAPPINGS[name]
        except KeyError:
            pass
    raise AttributeError(f"module 'nodes' has no attribute {name!r}")

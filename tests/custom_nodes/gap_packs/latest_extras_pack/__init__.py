"""A pack in the shape of big V3-era packs: it imports `ui`, `Types` and `InputImpl` from
`comfy_api.latest` next to `io` at load time, and uses `ui` only inside one node."""
from comfy_api.latest import InputImpl, Types, io, ui  # noqa: F401  (imported at load, as packs do)
from comfy_api.latest.ui import PreviewText  # noqa: F401


class GapShout:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hi"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "go"
    OUTPUT_NODE = True

    def go(self, text):
        return {"ui": {"text": [text.upper()]}, "result": (text.upper(),)}


class GapPreview:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hi"})}}

    RETURN_TYPES = ()
    FUNCTION = "go"
    OUTPUT_NODE = True

    def go(self, text):
        return {"ui": ui.PreviewText(text)}


NODE_CLASS_MAPPINGS = {"GapShout": GapShout, "GapPreview": GapPreview}

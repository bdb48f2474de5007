"""A pack in the shape of ones that import the binary frame types next to PromptServer at load time."""
from server import BinaryEventTypes, PromptServer  # noqa: F401


class GapFrameType:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["TEXT", "PREVIEW_IMAGE", "UNENCODED_PREVIEW_IMAGE"],)}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"
    OUTPUT_NODE = True

    def go(self, kind):
        code = getattr(BinaryEventTypes, kind)
        return {"ui": {"code": [code]}, "result": (code,)}


NODE_CLASS_MAPPINGS = {"GapFrameType": GapFrameType}

"""A single-file pack with only the classic protocol and plain values."""


class SimpleConcat:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("STRING", {"default": "x"}), "b": ("STRING", {"default": "y"})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "concat"
    OUTPUT_NODE = True
    CATEGORY = "simple"

    def concat(self, a, b):
        return {"ui": {"text": [a + b]}, "result": (a + b,)}


NODE_CLASS_MAPPINGS = {"SimpleConcat": SimpleConcat}

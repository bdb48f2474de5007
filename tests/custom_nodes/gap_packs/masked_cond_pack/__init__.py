"""A pack in the shape of regional-prompt packs that call the core ConditioningSetMask node by its
ComfyUI method name."""
import nodes


class GapMaskedCond:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "mask": ("MASK",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "go"
    OUTPUT_NODE = True

    def go(self, conditioning, mask):
        (masked,) = nodes.ConditioningSetMask().append(conditioning, mask, 0.5, "default")
        return {"ui": {"entries": [len(masked)], "changed": [masked is not conditioning]}, "result": (masked,)}


NODE_CLASS_MAPPINGS = {"GapMaskedCond": GapMaskedCond}

"""A pack in the shape of ControlNet packs that build their key maps from comfy.utils' UNet tables at load
time (iterating and merging them at module level)."""
from comfy.utils import TRANSFORMER_BLOCKS, UNET_MAP_ATTENTIONS, UNET_MAP_BASIC, UNET_MAP_RESNET

TEMPORAL_BLOCKS = {"time_stack.norm.weight"}
TEMPORAL_BLOCKS.update(TRANSFORMER_BLOCKS)
LDM_TOP = {ldm for ldm, _ in UNET_MAP_BASIC}


class GapUnetMap:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"resnet_key": ("STRING", {"default": "in_layers.2.weight"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "go"
    OUTPUT_NODE = True

    def go(self, resnet_key):
        counts = [len(UNET_MAP_ATTENTIONS), len(TEMPORAL_BLOCKS), len(LDM_TOP)]
        return {"ui": {"text": [UNET_MAP_RESNET[resnet_key]], "counts": counts}, "result": ("",)}


NODE_CLASS_MAPPINGS = {"GapUnetMap": GapUnetMap}

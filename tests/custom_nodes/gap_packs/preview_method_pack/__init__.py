"""A pack in the shape of sampler packs that switch the preview method through `latent_preview`'s
namespace before sampling and read it back."""
import latent_preview
from comfy.cli_args import args


class GapPreviewMethod:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"method": (["taesd", "none"],)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "go"
    OUTPUT_NODE = True

    def go(self, method):
        chosen = {"taesd": latent_preview.LatentPreviewMethod.TAESD}.get(method,
                                                                          latent_preview.LatentPreviewMethod.NoPreviews)
        args.preview_method = chosen
        return {"ui": {"text": [latent_preview.args.preview_method.value]}, "result": ("",)}


NODE_CLASS_MAPPINGS = {"GapPreviewMethod": GapPreviewMethod}

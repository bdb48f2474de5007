"""A pack in the shape of real ones: helper modules imported at load time, a model folder and an HTTP
route of its own, a web directory, and nodes using ComfyUI's tricks (any type, any input, lazy inputs,
lists, expansion, blocking, IS_CHANGED, built-in nodes called by their ComfyUI method names)."""
import os

import comfy.model_management
import comfy.samplers
import comfy.sd  # not provided by sdflow: a stub, so the pack still loads
import comfy.utils
import folder_paths
import latent_preview  # noqa: F401
import node_helpers
from aiohttp import web
from comfy_execution.graph import ExecutionBlocker
from comfy_execution.graph_utils import GraphBuilder
from comfy_extras.nodes_mask import ImageCompositeMasked  # noqa: F401   (a placeholder class)

import nodes
from server import PromptServer

from .util import AnyType, ContainsAnything

HERE = os.path.dirname(__file__)
folder_paths.add_model_folder_path("helper_models", os.path.join(folder_paths.models_dir, "helper_models"))
any_type = AnyType("*")
CALLS = {"counted": 0}


@PromptServer.instance.routes.get("/helpers_pack/hello")
async def hello(request):
    return web.json_response({"hello": "from the pack", "files": folder_paths.get_filename_list("helper_models")})


class ComfyModelStub(comfy.sd.VAE):   # subclassing a placeholder works
    pass


class HelperInfo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sampler": (comfy.samplers.KSampler.SAMPLERS,),
                             "size": ("INT", {"default": 64, "min": 16, "max": nodes.MAX_RESOLUTION})}}
    RETURN_TYPES = ()
    FUNCTION = "info"
    OUTPUT_NODE = True
    CATEGORY = "helpers"

    def info(self, sampler, size):
        bar = comfy.utils.ProgressBar(2)
        bar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)
        device = comfy.model_management.get_torch_device()
        up = comfy.utils.common_upscale(__import__("torch").zeros(1, 3, 8, 8), size, size, "bilinear", "center")
        cond = node_helpers.conditioning_set_values([[None, {"a": 1}]], {"strength": 0.5})
        try:
            comfy.sd.load_checkpoint_guess_config("x")
            stub = "no error"
        except NotImplementedError as exc:
            stub = str(exc)
        server = PromptServer.instance
        server.send_sync("helpers_pack.info", {"sampler": sampler, "to": server.client_id}, server.client_id)
        return {"ui": {"text": [sampler, str(device.type), str(tuple(up.shape)), str(cond[0][1]),
                                ",".join(folder_paths.get_filename_list("helper_models")), stub,
                                str(len(nodes.NODE_CLASS_MAPPINGS) > 10)]}}


class AnyPassthrough:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"anything": (any_type, {})}}
    RETURN_TYPES = (any_type,)
    FUNCTION = "run"
    CATEGORY = "helpers"

    def run(self, anything):
        return (anything,)


class CountInputs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": ContainsAnything()}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "helpers"

    def run(self, **kwargs):
        return (sum(int(v) for v in kwargs.values()),)


class LazySwitch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"use_a": ("BOOLEAN", {"default": True}),
                             "a": ("INT", {"lazy": True, "forceInput": True}),
                             "b": ("INT", {"lazy": True, "forceInput": True})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "helpers"

    def check_lazy_status(self, use_a, a=None, b=None):
        return ["a"] if use_a else ["b"]

    def run(self, use_a, a=None, b=None):
        return (a if use_a else b,)


class Number:
    """Counts its runs, so a test sees which branch of a lazy switch ran."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -1000})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "helpers"

    def run(self, value):
        CALLS[f"number{value}"] = CALLS.get(f"number{value}", 0) + 1
        return (value,)


class ListMaker:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3, "min": 1})}}
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "run"
    CATEGORY = "helpers"

    def run(self, count):
        return (list(range(1, count + 1)),)


class ShowInts:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("INT", {"forceInput": True})}}
    INPUT_IS_LIST = True
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "helpers"

    def run(self, values):
        return {"ui": {"values": [repr(values)]}, "result": (sum(values),)}


class DoubleByExpansion:
    """Expands into two Number nodes and a CountInputs adding them: the result is 2 * value."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "helpers"

    def run(self, value):
        graph = GraphBuilder()
        first = graph.node("HelperNumber", value=value)
        second = graph.node("HelperNumber", value=value)
        total = graph.node("HelperCountInputs", x=first.out(0), y=second.out(0))
        return {"result": (total.out(0),), "expand": graph.finalize()}


class MaybeBlock:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True}), "block": ("BOOLEAN", {"default": True}),
                             "message": ("STRING", {"default": ""})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "helpers"

    def run(self, value, block, message):
        return (ExecutionBlocker(message or None) if block else value,)


class Changing:
    """IS_CHANGED: the `key` input decides, and `always` says NaN (re-run every time)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "a"}), "always": ("BOOLEAN", {"default": False})}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "helpers"

    @classmethod
    def IS_CHANGED(cls, key, always):
        return float("nan") if always else key

    def run(self, key, always):
        CALLS["counted"] += 1
        return {"ui": {"runs": [CALLS["counted"]]}}


class Txt2ImgByBuiltins:
    """Calls sdflow's built-in nodes by ComfyUI's class and method names, as many packs do."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),),
                             "text": ("STRING", {"default": "a cat"}), "seed": ("INT", {"default": 0})}}
    RETURN_TYPES = ("IMAGE", "LATENT")
    FUNCTION = "run"
    CATEGORY = "helpers"

    def run(self, ckpt_name, text, seed):
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)[:3]
        positive = nodes.CLIPTextEncode().encode(clip, text)[0]
        negative = nodes.CLIPTextEncode().encode(clip=clip, text="")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        samples = nodes.common_ksampler(model, seed, 2, 7.0, "euler", "normal", positive, negative, latent)[0]
        image = nodes.VAEDecode().decode(vae, samples)[0]
        return (image, samples)


NODE_CLASS_MAPPINGS = {
    "HelperInfo": HelperInfo, "HelperAny": AnyPassthrough, "HelperCountInputs": CountInputs,
    "HelperLazySwitch": LazySwitch, "HelperNumber": Number, "HelperListMaker": ListMaker,
    "HelperShowInts": ShowInts, "HelperDouble": DoubleByExpansion, "HelperMaybeBlock": MaybeBlock,
    "HelperChanging": Changing, "HelperTxt2Img": Txt2ImgByBuiltins,
}
NODE_DISPLAY_NAME_MAPPINGS = {"HelperInfo": "Helper info"}
WEB_DIRECTORY = "./js"

"""A pack of V3-schema nodes (comfy_api.latest), exported through `comfy_entrypoint()` as new packs do."""
from comfy_api.latest import ComfyExtension, io


class V3Add(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="V3Add", display_name="Add (V3)", category="v3",
            inputs=[io.Int.Input("a", default=1, min=0, max=100), io.Int.Input("b", default=2, optional=True)],
            outputs=[io.Int.Output(display_name="sum")])

    @classmethod
    async def execute(cls, a, b=0) -> io.NodeOutput:    # async execute, as V3 allows
        return io.NodeOutput(a + b)


class V3Show(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="V3Show", category="v3", is_output_node=True,
            inputs=[io.Int.Input("value", force_input=True), io.Combo.Input("mode", options=["plain", "loud"])],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, value, mode) -> io.NodeOutput:
        text = f"{value}!" if mode == "loud" else str(value)
        return io.NodeOutput(ui={"text": [text, cls.hidden.unique_id]})


class V3Pick(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="V3Pick", category="v3",
            inputs=[io.Boolean.Input("first", default=True),
                    io.AnyType.Input("x", lazy=True), io.AnyType.Input("y", lazy=True)],
            outputs=[io.AnyType.Output()])

    @classmethod
    def check_lazy_status(cls, first, x=None, y=None):
        return ["x"] if first else ["y"]

    @classmethod
    def validate_inputs(cls, first):
        return True if isinstance(first, bool) else "first must be a boolean"

    @classmethod
    def execute(cls, first, x=None, y=None) -> io.NodeOutput:
        return io.NodeOutput(x if first else y)


class V3Stamp(io.ComfyNode):
    """fingerprint_inputs: the content of the file `key` names (a node reading a file re-runs when it changes)."""
    runs = 0

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="V3Stamp", category="v3", is_output_node=True,
                         inputs=[io.String.Input("key"), io.String.Input("note", default="")])

    @classmethod
    def fingerprint_inputs(cls, key):
        with open(key) as f:
            return f.read()

    @classmethod
    def execute(cls, key, note) -> io.NodeOutput:
        V3Stamp.runs += 1
        return io.NodeOutput(ui={"runs": [V3Stamp.runs]})


class V3Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [V3Add, V3Show, V3Pick, V3Stamp]


async def comfy_entrypoint() -> V3Extension:
    return V3Extension()

"""sdflow's Stable Diffusion domain: node definitions and the model machinery under them."""


def build_registry(config, *, plugins: bool = True):
    """(Registry of the built-in SD nodes plus installed plugins, model catalog), configured for `config`."""
    from .builtin import build_registry as build
    return build(config, plugins=plugins)

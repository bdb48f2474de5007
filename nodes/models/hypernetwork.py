"""A1111 hypernetworks (`.pt`): small MLPs, one pair per attention width, that rewrite the inputs of
every attention layer's key and value projections: `k_in = x + strength * mlp_k(x)`, likewise for v,
where x is what the layer attends to (the image features in self-attention, the text embedding in
cross-attention); widths without a pair are left alone.

The file is a pickle of plain containers (`{width: [state_dict_k, state_dict_v], "activation_func",
"is_layer_norm", "use_dropout", "activate_output", "last_layer_dropout", ...}`), loaded with
`torch.load(weights_only=True)`: nothing in it is executed. Each MLP is rebuilt from the file's
linear (and layer-norm) tensors in file order, with the activation between layers as the file says;
dropout does nothing at inference and is left out.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state_dict import ModelFileError

ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish,
}


def _mlp(sd: dict, activation: type[nn.Module] | None, activate_output: bool) -> nn.Sequential:
    """Layers in file order: a 2-D weight is a linear layer, a 1-D one a layer norm (A1111 puts one
    after every linear layer when is_layer_norm is set); the activation follows every linear layer but
    the last, unless activate_output."""
    names = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    n_linear = sum(1 for n in names if sd[f"{n}.weight"].ndim == 2)
    layers: list[nn.Module] = []
    seen = 0
    for name in names:
        w, b = sd[f"{name}.weight"].float(), sd[f"{name}.bias"].float()
        if w.ndim == 2:
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.load_state_dict({"weight": w, "bias": b})
            layers.append(lin)
            seen += 1
            if activation is not None and (seen < n_linear or activate_output):
                layers.append(activation())
        elif w.ndim == 1:
            ln = nn.LayerNorm(w.shape[0])
            ln.load_state_dict({"weight": w, "bias": b})
            layers.append(ln)
        else:
            raise ValueError(f"{name}.weight has {w.ndim} dimensions")
    if not n_linear:
        raise ValueError("no linear layers")
    return nn.Sequential(*layers).eval().requires_grad_(False)


def load_hypernetwork(path: str | Path) -> dict[int, tuple[nn.Module, nn.Module]]:
    """{attention width: (mlp for the key input, mlp for the value input)}; ModelFileError on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "file not found")
    try:
        obj: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():
            raise ModelFileError(path, "refused: needs unsafe unpickling") from None
        raise ModelFileError(path, "corrupt hypernetwork file: cannot be unpickled") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        raise ModelFileError(path, f"corrupt hypernetwork file: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or not any(isinstance(k, int) for k in obj):
        raise ModelFileError(path, "not an A1111 hypernetwork (no per-width layer lists)")
    act_name = str(obj.get("activation_func", "linear"))
    if act_name not in ACTIVATIONS:
        raise ModelFileError(path, f"unsupported hypernetwork activation {act_name!r}")
    activation = ACTIVATIONS[act_name]
    activate_output = bool(obj.get("activate_output", False))
    out: dict[int, tuple[nn.Module, nn.Module]] = {}
    try:
        for width, pair in obj.items():
            if not isinstance(width, int):
                continue
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"width {width}: expected a [key, value] pair of layer dicts")
            k, v = (_mlp(dict(sd), activation, activate_output) for sd in pair)
            out[width] = (k, v)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise ModelFileError(path, f"unusable hypernetwork layers: {e}") from None
    return out


class HypernetworkPatch:
    """One hypernetwork at a strength; `hooks(unet)` installs it on the key/value projections."""

    def __init__(self, layers: dict[int, tuple[nn.Module, nn.Module]], strength: float) -> None:
        self.layers, self.strength = layers, float(strength)

    def hooks(self, unet: nn.Module) -> list[Any]:
        param = next(unet.parameters())
        for k, v in self.layers.values():
            k.to(device=param.device, dtype=param.dtype)
            v.to(device=param.device, dtype=param.dtype)
        handles = []
        for module in unet.modules():
            to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
            if not isinstance(to_k, nn.Linear) or not isinstance(to_v, nn.Linear):
                continue
            pair = self.layers.get(int(to_k.in_features))
            if pair is None:
                continue
            for proj, mlp in ((to_k, pair[0]), (to_v, pair[1])):
                handles.append(proj.register_forward_pre_hook(self._hook(mlp)))
        return handles

    def _hook(self, mlp: nn.Module):
        strength = self.strength

        def hook(module, args):
            x = args[0]
            return (x + mlp(x) * strength,) + tuple(args[1:])
        return hook

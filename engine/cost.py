"""A prompt's memory, estimated from its sizes before it runs.

A node may declare `cost=` in its decorator: a function called with the node's constant inputs and, for
each linked input, the estimated size of what its source will produce (None when that is unknown). It
returns an `Estimate`: the bytes the node needs at its peak and the sizes of its outputs, which flow to the
nodes downstream. A node whose estimate exceeds the device's work budget is refused with a node error
that names the inputs its size comes from: a 16384x16384 latent or a batch of 4096 is a 400 with a clear
reason, not an allocation failure minutes later.

Estimates are deliberately simple (the output tensors plus the working memory of one chunk, for nodes
that work in chunks); they catch the prompts that cannot possibly fit, not the borderline ones.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

GB = 1 << 30


@dataclass
class Estimate:
    bytes: int = 0                                   # peak memory the node needs while it runs
    outputs: Sequence[Any] = ()                      # per output slot: a size description, or None
    inputs: Sequence[str] = field(default_factory=tuple)   # the inputs the size comes from (for the error)


def tensor_bytes(shape: Sequence[int], itemsize: int = 4) -> int:
    n = itemsize
    for d in shape:
        n *= max(int(d), 0)
    return n


def work_budget(config: Any = None) -> int:
    """Bytes one node may use: `config.work_budget_bytes`, else 80% of the compute device's memory (the
    first GPU when torch has one, else system RAM)."""
    explicit = getattr(config, "work_budget_bytes", None) if config is not None else None
    if explicit:
        return int(explicit)
    import sys
    torch = sys.modules.get("torch")   # only ask torch if someone already loaded it
    try:
        if torch is not None and torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory * 0.8)
    except Exception:
        pass
    try:
        import psutil
        return int(psutil.virtual_memory().total * 0.8)
    except Exception:
        return 16 * GB


def _fmt(nbytes: int) -> str:
    return f"{nbytes / GB:.1f} GiB" if nbytes >= GB / 10 else f"{nbytes / (1 << 20):.0f} MiB"


def check_costs(nodes: dict, order: Sequence[str], budget: int,
                skip: set[str] | frozenset[str] = frozenset()) -> dict[str, dict]:
    """node id -> a `cost_over_budget` error, for the nodes (ResolvedNode by id, in topological `order`)
    whose estimate exceeds `budget`. Nodes in `skip` (already invalid) pass on no sizes."""
    sizes: dict[str, Sequence[Any]] = {}
    errors: dict[str, dict] = {}
    for nid in order:
        rn = nodes.get(nid)
        if rn is None or nid in skip:
            continue
        nd = rn.nodedef
        if nd.cost is None:
            continue
        args = dict(rn.constants)
        for name, (src, slot) in rn.links.items():
            out = sizes.get(src)
            args[name] = out[slot] if out is not None and 0 <= slot < len(out) else None
        try:
            est = nd.cost(**{k: v for k, v in args.items() if k in nd.inputs})
        except Exception:   # an estimator must never be the reason a prompt fails
            log.debug("cost estimate of %s failed", nd.name, exc_info=True)
            continue
        if est is None:
            continue
        sizes[nid] = list(est.outputs)
        if est.bytes > budget:
            names = list(est.inputs)
            shown = ", ".join(f"{n}={rn.constants[n]}" if n in rn.constants else f"{n} (linked)" for n in names)
            errors[nid] = {
                "type": "cost_over_budget",
                "message": "Not enough memory for this node",
                "details": (f"{nd.name} would need about {_fmt(est.bytes)}"
                            + (f" with {shown}" if shown else "")
                            + f", over the device budget of {_fmt(budget)}; use smaller sizes or batches"),
                "extra_info": {"input_name": names[0] if names else None, "inputs": names,
                               "estimated_bytes": int(est.bytes), "budget_bytes": int(budget)},
            }
            sizes[nid] = [None] * len(est.outputs)   # downstream nodes are blamed on this one, not again
    return errors

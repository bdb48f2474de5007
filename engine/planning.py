"""Planning: content-addressed cache keys, and the nodes a run must execute.

A node's key hashes its class and version, its constant inputs, its fingerprint (what else it depends on,
such as a file's hash) and the keys of its inputs' sources with their slots. Node ids are not part of it
(unless the node asks for its UNIQUE_ID), so renumbered or duplicated sub-graphs hash the same, and
changing one widget changes exactly that node's key and its descendants'.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from .validation import ResolvedNode


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def static_signature(rn: ResolvedNode) -> str:
    """The part of a node's key that only depends on the prompt text (memoized on the node)."""
    sig = rn.__dict__.get("_static_sig")
    if sig is None:
        nd = rn.nodedef
        parts = [nd.name, str(nd.version), _canonical(sorted(rn.constants.items()))]
        if any(d.section == "hidden" and d.spec.wire == "UNIQUE_ID" for d in nd.inputs.values()):
            parts.append("id=" + rn.id)
        sig = rn.__dict__["_static_sig"] = "\x1f".join(parts)
    return sig


def compute_keys(nodes: dict[str, ResolvedNode], order: Iterable[str], run_nonce: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    blake2b = hashlib.blake2b
    for nid in order:
        rn = nodes[nid]
        nd = rn.nodedef
        parts = [static_signature(rn)]
        if nd.fingerprint is not None:
            parts.append(_canonical(_fingerprint(rn)))
        if not nd.deterministic:
            # Per run and per node: two copies of a random node in one prompt must not share a result.
            parts.append(f"{run_nonce}:{nid}")
        links = rn.links
        for name in sorted(links) if len(links) > 1 else links:
            src, slot = links[name]
            parts.append(f"{name}<{keys.get(src, src)}:{slot}")
        keys[nid] = blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()
    return keys


def _fingerprint(rn: ResolvedNode) -> Any:
    nd = rn.nodedef
    names = nd.fingerprint_names or frozenset()
    args = dict(rn.constants) if "*" in names else {k: rn.constants.get(k) for k in names}
    assert nd.fingerprint is not None  # called only for nodes that declare one
    try:
        return nd.fingerprint(**args)
    except Exception as exc:  # an unanswerable fingerprint means "assume changed"
        import uuid
        return f"fingerprint-failed:{type(exc).__name__}:{uuid.uuid4()}"


def needed_nodes(nodes: dict[str, ResolvedNode], targets: Iterable[str], is_cached) -> set[str]:
    """Nodes to run for `targets`: walk back through non-lazy links, stopping at cached nodes."""
    plan: set[str] = set()
    stack = list(targets)
    while stack:
        nid = stack.pop()
        if nid in plan or is_cached(nid):
            continue
        plan.add(nid)
        rn = nodes[nid]
        for name, (src, _slot) in rn.links.items():
            decl = rn.nodedef.inputs.get(name)
            if decl is not None and decl.spec.lazy:
                continue
            if src in nodes:
                stack.append(src)
    return plan

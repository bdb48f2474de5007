"""The output cache: content-addressed entries under a byte budget per device kind, evicted LRU.

Keys come from planning (class, version, constants, fingerprint and the keys of the sources), so renumbered
or duplicated sub-graphs hit. Entries stay on the device that produced them. When a GPU budget is exceeded,
the least recently used entry moves to CPU if the CPU budget has room (cheaper than recomputing a model
load or a sampling run), otherwise it is dropped. Entries used by the running prompt are pinned.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .memory import Footprint, default_budgets, device_kind, footprint, move


@dataclass
class CacheEntry:
    outputs: list[list[Any]]          # per output slot, one item per mapped call
    ui: dict | None = None
    footprint: Footprint = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    node_type: str = ""


class OutputCache:
    def __init__(self, budgets: dict[str, int] | None = None) -> None:
        self.budgets = dict(budgets) if budgets is not None else default_budgets()
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.RLock()
        self._used: dict[str, int] = {}   # bytes per device kind, kept up to date on every change
        self.hits = self.misses = self.evictions = self.offloads = 0

    # ---- lookups --------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, outputs: list[list[Any]], ui: dict | None = None, node_type: str = "") -> CacheEntry:
        entry = CacheEntry(outputs, ui, footprint(outputs), node_type=node_type)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._account(old, -1)
            self._entries[key] = entry
            self._account(entry, +1)
            if self._over_budget():
                self.evict_to_budget()
        return entry

    def _account(self, entry: CacheEntry, sign: int) -> None:
        for device, nbytes in entry.footprint.items():
            kind = device_kind(device)
            self._used[kind] = self._used.get(kind, 0) + sign * nbytes

    def _over_budget(self) -> bool:
        return any(used > self.budgets.get(kind, used) for kind, used in self._used.items())

    # ---- pinning (entries the running prompt still needs) ----------------------------------------
    def pin(self, keys) -> None:
        with self._lock:
            self._pinned |= set(keys)

    def unpin_all(self) -> None:
        with self._lock:
            self._pinned.clear()
            self.evict_to_budget()

    # ---- accounting ---------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        return {kind: n for kind, n in self._used.items() if n}

    def _budget(self, kind: str) -> int | None:
        return self.budgets.get(kind)

    def evict_to_budget(self) -> None:
        with self._lock:
            for kind, used in list(self.usage().items()):
                budget = self._budget(kind)
                if budget is None:
                    continue
                while used > budget:
                    victim = next((k for k, e in self._entries.items() if k not in self._pinned
                                   and any(device_kind(d) == kind for d in e.footprint)), None)
                    if victim is None:
                        break
                    entry = self._entries[victim]
                    freed = sum(n for d, n in entry.footprint.items() if device_kind(d) == kind)
                    self._account(entry, -1)
                    if kind != "cpu" and self._cpu_has_room(freed):
                        entry.outputs = move(entry.outputs, "cpu")
                        entry.footprint = footprint(entry.outputs)
                        self._account(entry, +1)
                        self.offloads += 1
                    else:
                        del self._entries[victim]
                        self.evictions += 1
                    used -= freed

    def _cpu_has_room(self, nbytes: int) -> bool:
        budget = self._budget("cpu")
        return budget is None or self.usage().get("cpu", 0) + nbytes <= budget

    def clear(self, *, only_models: bool = False) -> None:
        """Drop entries (all, or those holding objects with their own footprint: loaded models)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if not only_models or _holds_model(e.outputs)]:
                self._account(self._entries.pop(key), -1)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.usage(), "budget_bytes": dict(self.budgets),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "offloads": self.offloads, "pinned": len(self._pinned)}


def _holds_model(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_model(v) for v in value)
    return callable(getattr(value, "footprint", None)) and not isinstance(value, type)

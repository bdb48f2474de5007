"""The output cache: content-addressed entries under a byte budget per device kind, evicted LRU.

Keys come from planning (class, version, constants, fingerprint and the keys of the sources), so renumbered
or duplicated sub-graphs hit. Entries stay on the device that produced them. When a GPU budget is exceeded,
the least recently used entry moves to CPU if the CPU budget has room (cheaper than recomputing a model
load or a sampling run), otherwise it is dropped. Entries used by the running prompt are pinned.

Memory shared by several entries (a model and its LoRA-patched or clip-skip clones) is counted once: each
entry lists its memory parts, and the cache knows which entries hold each part. Eviction goes oldest first
among entries holding memory that could be freed at all (memory also held by a pinned entry cannot be).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .memory import Footprint, Parts, default_budgets, device_kind, move, parts, register_accountant, sum_parts


@dataclass
class CacheEntry:
    outputs: list[list[Any]]          # per output slot, one item per mapped call
    ui: dict | None = None
    parts: Parts = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    node_type: str = ""

    @property
    def footprint(self) -> Footprint:
        """All the memory this entry holds, shared or not."""
        return sum_parts(self.parts)


class OutputCache:
    def __init__(self, budgets: dict[str, int] | None = None) -> None:
        self.budgets = dict(budgets) if budgets is not None else default_budgets()
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.RLock()
        self._used: dict[str, int] = {}   # bytes per device kind, kept up to date on every change
        self._refs: dict[Any, list] = {}  # memory part -> [holder entry keys, device kind, bytes]
        self.hits = self.misses = self.evictions = self.offloads = 0
        self._own_move = False            # set while the cache moves values itself
        register_accountant(self)

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
        entry = CacheEntry(outputs, ui, parts(outputs), node_type=node_type)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._account(key, old, -1)
            self._entries[key] = entry
            self._account(key, entry, +1)
            if self._over_budget():
                self.evict_to_budget()
        return entry

    def _account(self, key: str, entry: CacheEntry, sign: int) -> None:
        refs, used = self._refs, self._used
        for part, (device, nbytes) in entry.parts.items():
            ref = refs.get(part)
            if sign > 0:
                if ref is None:
                    kind = device_kind(device)
                    refs[part] = [{key}, kind, nbytes]
                    used[kind] = used.get(kind, 0) + nbytes
                else:
                    ref[0].add(key)
            elif ref is not None:
                ref[0].discard(key)
                if not ref[0]:
                    del refs[part]
                    used[ref[1]] = used.get(ref[1], 0) - ref[2]

    def _freeable(self, entry: CacheEntry, kind: str) -> int:
        """Bytes of `kind` memory held by `entry` that no pinned entry holds: what evicting it, and the
        other unpinned holders in their turn, can give back."""
        total = 0
        for part in entry.parts:
            ref = self._refs.get(part)
            if ref is not None and ref[1] == kind and not (ref[0] & self._pinned):
                total += ref[2]
        return total

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
        # dict() copies in one step under the GIL, so a reader never sees the dict change mid-iteration.
        return {kind: n for kind, n in dict(self._used).items() if n}

    def room(self, kind: str) -> int | None:
        """What the `kind` budget has left (None: no budget for that kind)."""
        budget = self._budget(kind)
        return None if budget is None else max(0, budget - self.usage().get(kind, 0))

    def _budget(self, kind: str) -> int | None:
        return self.budgets.get(kind)

    def evict_to_budget(self) -> None:
        with self._lock:
            for kind in list(self._used):
                budget = self._budget(kind)
                if budget is not None:
                    self._evict_kind(kind, budget)

    def _evict_kind(self, kind: str, budget: int) -> None:
        while self._used.get(kind, 0) > budget:
            # The oldest unpinned entry holding memory of this kind that can be freed; an entry whose
            # memory others share frees it once the last of them goes.
            victim, freed = None, 0
            for key, entry in self._entries.items():
                if key not in self._pinned:
                    freed = self._freeable(entry, kind)
                    if freed:
                        victim = key
                        break
            if victim is None:
                break
            # Every turn frees memory of this kind or removes an entry, so the loop ends. An offload
            # that frees nothing here (a value that reports memory but cannot move, or one whose move
            # left it where it was) falls through to dropping the entry.
            before = self._used.get(kind, 0)
            if kind != "cpu" and self._cpu_has_room(freed):
                self._offload(victim)
                if self._used.get(kind, 0) < before or victim not in self._entries:
                    continue
            self._account(victim, self._entries.pop(victim), -1)
            self.evictions += 1

    # ---- moves made elsewhere (engine.memory.request_room / notify_moved) --------------------------------
    def make_room(self, kind: str, nbytes: int) -> None:
        """Something is about to put `nbytes` on a `kind` device: evict as if it were already there."""
        budget = self._budget(kind)
        if budget is None or nbytes <= 0 or self._own_move:
            return
        with self._lock:
            self._evict_kind(kind, max(0, budget - nbytes))

    def moved(self, value: Any) -> None:
        """A value moved in place: re-measure every entry (a moved model moves for all its holders),
        then keep the budgets."""
        if self._own_move:
            return
        with self._lock:
            if not self._entries:
                return
            self._remeasure()
            self._touch_holders(value)
            if self._over_budget():
                self.evict_to_budget()

    def _touch_holders(self, value: Any) -> None:
        """A value loaded onto an accelerator is in use now: its entries become the most recently used,
        so the next offload takes a model that has waited longer."""
        loaded = {key for key, (device, _) in parts(value).items() if device_kind(device) != "cpu"}
        if not loaded:
            return
        for key in [k for k, e in self._entries.items() if loaded & e.parts.keys()]:
            self._entries.move_to_end(key)

    def _remeasure(self) -> None:
        self._refs.clear()
        self._used.clear()
        for key, entry in self._entries.items():
            entry.parts = parts(entry.outputs)
            self._account(key, entry, +1)

    def _offload(self, key: str) -> None:
        """Move an entry's values to the CPU. Its objects may be shared with other entries (a model moved
        in place moves for every holder), so every entry's parts are taken again."""
        entry = self._entries[key]
        self._own_move = True
        try:
            entry.outputs = move(entry.outputs, "cpu")
        finally:
            self._own_move = False
        self.offloads += 1
        self._remeasure()

    def _cpu_has_room(self, nbytes: int) -> bool:
        budget = self._budget("cpu")
        return budget is None or self.usage().get("cpu", 0) + nbytes <= budget

    def clear(self, *, only_models: bool = False) -> None:
        """Drop entries (all, or those holding objects with their own footprint: loaded models)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if not only_models or _holds_model(e.outputs)]:
                self._account(key, self._entries.pop(key), -1)

    def model_keys(self) -> list[str]:
        """Keys of the entries that hold loaded models: what a dispatcher routes by (model affinity)."""
        with self._lock:
            return [k for k, e in self._entries.items() if _holds_model(e.outputs)]

    def stats(self) -> dict:
        """Read without the lock: `/system_stats` must answer while an eviction or a long model move holds
        it. Each figure is read atomically; together they may be a moment apart, which a report can bear."""
        return {"entries": len(self._entries), "bytes": self.usage(), "budget_bytes": dict(self.budgets),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "offloads": self.offloads, "pinned": len(self._pinned)}


def _holds_model(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_model(v) for v in value)
    return callable(getattr(value, "footprint", None)) and not isinstance(value, type)

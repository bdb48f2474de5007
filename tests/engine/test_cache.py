"""OutputCache (byte budget per device kind, LRU, pinning, offload) and memory accounting."""
import pytest
import torch

from engine.cache import OutputCache
from engine.memory import device_kind, footprint, move
from engine.planning import compute_keys
from engine.registry import Registry
from engine.validation import validate_prompt
from tests.engine import toy_nodes as t

KiB = 1024


def tensor_kib(k: int) -> torch.Tensor:
    return torch.zeros(k * 256, dtype=torch.float32)      # k KiB


class FakeModel:
    """Something with its own footprint that can move between devices, as loaded models do."""

    def __init__(self, nbytes: int, device: str = "cuda:0") -> None:
        self.nbytes, self.device = nbytes, device
        self.moves: list[str] = []

    def footprint(self) -> dict[str, int]:
        return {self.device: self.nbytes}

    def to_device(self, device: str) -> None:
        self.moves.append(device)
        self.device = device


# ---- memory accounting --------------------------------------------------------------------------------

def test_footprint_counts_tensor_bytes_per_device():
    assert footprint([[tensor_kib(4)]]) == {"cpu": 4 * KiB}
    assert footprint({"a": tensor_kib(1), "b": (tensor_kib(2), "text", 3)}) == {"cpu": 3 * KiB}
    assert footprint([[1, "x", None, 2.5]]) == {}


def test_footprint_counts_shared_storage_once():
    base = tensor_kib(8)
    view = base[: 256]                                    # a view: same storage
    assert footprint([[base, view, base]]) == {"cpu": 8 * KiB}


def test_footprint_of_objects_with_their_own_accounting():
    assert footprint([[FakeModel(1000)], [FakeModel(24, "cpu")]]) == {"cuda:0": 1000, "cpu": 24}


def test_device_kind_and_move():
    assert device_kind("cuda:1") == "cuda" and device_kind("cpu") == "cpu"
    m = FakeModel(10)
    moved = move([[m], {"k": (tensor_kib(1),)}], "cpu")
    assert moved[0][0] is m and m.device == "cpu"
    assert moved[1]["k"][0].device.type == "cpu"


# ---- the cache -------------------------------------------------------------------------------------------

def test_put_get_hits_misses():
    cache = OutputCache({"cpu": 100 * KiB})
    assert cache.get("k") is None
    entry = cache.put("k", [[tensor_kib(1)]], {"text": ["x"]}, "Node")
    assert "k" in cache and len(cache) == 1
    got = cache.get("k")
    assert got is entry and got.ui == {"text": ["x"]} and got.node_type == "Node"
    assert got.footprint == {"cpu": KiB}
    s = cache.stats()
    assert (s["hits"], s["misses"], s["entries"], s["bytes"]) == (1, 1, 1, {"cpu": KiB})


def test_replacing_a_key_keeps_accounting_right():
    cache = OutputCache({"cpu": 100 * KiB})
    cache.put("k", [[tensor_kib(4)]])
    cache.put("k", [[tensor_kib(2)]])
    assert cache.usage() == {"cpu": 2 * KiB} and len(cache) == 1


def test_lru_eviction_order():
    cache = OutputCache({"cpu": 3 * KiB})
    for k in "abc":
        cache.put(k, [[tensor_kib(1)]])
    cache.get("a")                                        # a is now the most recently used
    cache.put("d", [[tensor_kib(1)]])
    assert "b" not in cache and {"a", "c", "d"} <= set(cache._entries)
    assert cache.evictions == 1 and cache.usage() == {"cpu": 3 * KiB}
    cache.put("e", [[tensor_kib(2)]])                      # needs two victims: c then a
    assert "c" not in cache and "a" not in cache and "d" in cache and "e" in cache
    assert cache.evictions == 3


def test_entries_without_bytes_are_never_victims():
    cache = OutputCache({"cpu": 2 * KiB})
    cache.put("ui", [[]], {"text": ["hello"]})
    cache.put("n", [[42]])
    cache.put("a", [[tensor_kib(2)]])
    cache.put("b", [[tensor_kib(2)]])
    assert "ui" in cache and "n" in cache and "a" not in cache and "b" in cache


def test_pinned_entries_survive_until_unpinned():
    cache = OutputCache({"cpu": 2 * KiB})
    cache.pin(["a", "b", "c"])
    for k in "abc":
        cache.put(k, [[tensor_kib(1)]])
    assert len(cache) == 3 and cache.usage() == {"cpu": 3 * KiB} and cache.evictions == 0
    assert cache.stats()["pinned"] == 3
    cache.unpin_all()
    assert "a" not in cache and "b" in cache and "c" in cache
    assert cache.usage() == {"cpu": 2 * KiB} and cache.stats()["pinned"] == 0


def test_an_entry_larger_than_the_budget_is_dropped():
    cache = OutputCache({"cpu": KiB})
    cache.put("huge", [[tensor_kib(4)]])
    assert "huge" not in cache and cache.usage() == {}


def test_gpu_budget_offloads_lru_entry_to_cpu_when_it_fits():
    cache = OutputCache({"cuda": 1500, "cpu": 1500})
    m1, m2 = FakeModel(1000), FakeModel(1000)
    cache.put("m1", [[m1]])
    cache.put("m2", [[m2]])                              # cuda over budget: m1 (LRU) moves to cpu
    assert "m1" in cache and m1.device == "cpu" and m1.moves == ["cpu"]
    assert cache.offloads == 1 and cache.evictions == 0
    assert cache.usage() == {"cuda": 1000, "cpu": 1000}
    m3 = FakeModel(1000)
    cache.put("m3", [[m3]])                              # m2 no longer fits on cpu: dropped
    assert "m2" not in cache and cache.evictions == 1 and m2.device == "cuda:0"
    assert cache.usage() == {"cuda": 1000, "cpu": 1000}


def test_budgets_are_per_device_kind():
    cache = OutputCache({"cpu": KiB, "cuda": 10_000})
    cache.put("m", [[FakeModel(5000)]])
    cache.put("t", [[tensor_kib(1)]])
    assert "m" in cache and "t" in cache
    assert cache.usage() == {"cuda": 5000, "cpu": KiB}


def test_clear_only_models():
    cache = OutputCache({"cpu": 100 * KiB, "cuda": 10_000})
    cache.put("m", [[FakeModel(10)]])
    cache.put("t", [[tensor_kib(1)]])
    cache.clear(only_models=True)
    assert "m" not in cache and "t" in cache and cache.usage() == {"cpu": KiB}
    cache.clear()
    assert len(cache) == 0 and cache.usage() == {}


# ---- content-addressed keys ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.from_nodes(t)


def keys_of(reg, prompt: dict, nonce: str = "n") -> dict[str, str]:
    vr = validate_prompt(prompt, reg)
    assert vr.ok, vr.node_errors
    return compute_keys(vr.nodes, vr.order, nonce)


def test_keys_ignore_node_ids_and_input_order(reg):
    a = keys_of(reg, {"1": {"class_type": "Const", "inputs": {"value": 1}},
                      "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 2}},
                      "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}})
    b = keys_of(reg, {"x": {"class_type": "Collect", "inputs": {"value": ["y", 0]}},
                      "y": {"class_type": "Add", "inputs": {"b": 2, "a": ["z", 0]}},
                      "z": {"class_type": "Const", "inputs": {"value": 1}}})
    assert (a["1"], a["2"], a["3"]) == (b["z"], b["y"], b["x"])


def test_keys_change_with_constants_slot_and_upstream(reg):
    base = {"1": {"class_type": "DivMod", "inputs": {"a": 7, "b": 2}},
            "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 0}},
            "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    k0 = keys_of(reg, base)
    base["2"]["inputs"]["a"] = ["1", 1]                   # other output slot
    k1 = keys_of(reg, base)
    assert k1["1"] == k0["1"] and k1["2"] != k0["2"] and k1["3"] != k0["3"]
    base["1"]["inputs"]["a"] = 8                          # upstream constant
    k2 = keys_of(reg, base)
    assert len({k0["1"], k1["1"], k2["1"]}) == 2 and k2["2"] != k1["2"]


def test_non_deterministic_keys_differ_per_run_and_per_node(reg):
    prompt = {"1": {"class_type": "Random", "inputs": {"low": 0}},
              "2": {"class_type": "Random", "inputs": {"low": 0}},
              "3": {"class_type": "Collect", "inputs": {"value": ["1", 0]}},
              "4": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    k1, k2 = keys_of(reg, prompt, "run1"), keys_of(reg, prompt, "run2")
    assert k1["1"] != k2["1"] and k1["3"] != k2["3"]
    assert k1["1"] != k1["2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stay_on_device_until_the_gpu_budget_offloads_them():
    cache = OutputCache({"cuda": 6 * KiB, "cpu": 100 * KiB})
    a = torch.zeros(1024, device="cuda")                 # 4 KiB each
    b = torch.zeros(1024, device="cuda")
    cache.put("a", [[a]])
    assert cache.get("a").outputs[0][0].is_cuda and cache.usage() == {"cuda": 4 * KiB}
    cache.put("b", [[b]])                                # over the GPU budget: a (LRU) moves to CPU
    assert cache.get("a").outputs[0][0].device.type == "cpu"
    assert cache.get("b").outputs[0][0].is_cuda
    assert cache.offloads == 1 and cache.usage() == {"cuda": 4 * KiB, "cpu": 4 * KiB}


def test_shared_memory_is_counted_once_and_sharing_entries_free_nothing():
    import torch

    big = torch.zeros(262144)                      # 1 MiB
    view = big[: 1024]                             # same storage
    cache = OutputCache({"cpu": 3 * 2**20})
    cache.put("a", [[big]])
    cache.put("b", [[view]])                        # shares a's memory
    cache.put("c", [[{"x": big, "y": view}]])       # and again
    assert cache.usage()["cpu"] == 2**20
    cache.put("d", [[torch.zeros(262144 * 3)]])     # 3 MiB more: over budget
    # a, b and c hold the same MiB; only dropping all three frees it, oldest first
    assert cache.usage()["cpu"] == 3 * 2**20
    assert "d" in cache and not ({"a", "b", "c"} & {k for k in ("a", "b", "c") if k in cache})


class ReportsOnly:
    """An object that reports device memory but has no `to_device`: the cache can count it, not move it."""

    def footprint(self) -> dict[str, int]:
        return {"cuda:0": 1000}


def test_eviction_terminates_when_an_offload_frees_nothing():
    cache = OutputCache({"cuda": 1500, "cpu": 10_000})
    cache.put("a", [[ReportsOnly()]])
    cache.put("b", [[ReportsOnly()]])   # over budget; "a" cannot move, so it is dropped, not retried
    assert "a" not in cache and "b" in cache
    assert cache.usage() == {"cuda": 1000} and cache.evictions == 1


def test_namedtuple_values_move_to_cpu_on_offload():
    from typing import NamedTuple

    class Pair(NamedTuple):
        model: FakeModel
        weights: torch.Tensor

    cache = OutputCache({"cuda": 1500, "cpu": 100_000})
    first = Pair(FakeModel(1000), tensor_kib(1))
    cache.put("pair", [[first]])
    cache.put("m", [[FakeModel(1000)]])
    entry = cache.get("pair")
    assert entry is not None and isinstance(entry.outputs[0][0], Pair)
    assert first.model.device == "cpu" and cache.offloads == 1
    assert cache.usage() == {"cuda": 1000, "cpu": 1000 + KiB}


class SimHandle:
    """A model handle on a simulated accelerator kind ("sim"): it moves itself on use and tells the
    accounting before and after, the way nodes.models.memory.WeightsHolder does for real modules."""

    def __init__(self, nbytes: int, log: list) -> None:
        self.nbytes, self.device, self.log = nbytes, "cpu", log

    def footprint(self) -> dict[str, int]:
        return {self.device: self.nbytes}

    def to_device(self, device: str) -> None:
        from engine.memory import notify_moved, request_room
        if device == self.device:
            return
        request_room(device, self.nbytes)
        self.log.append((id(self), device))
        self.device = device
        notify_moved(self)

    def ensure_loaded(self) -> None:
        self.to_device("sim:0")


def test_moves_made_outside_the_cache_are_accounted_and_make_room_first():
    log: list = []
    cache = OutputCache({"sim": 1500, "cpu": 100_000})
    a, b = SimHandle(1000, log), SimHandle(1000, log)
    cache.put("a", [[a]])
    cache.put("b", [[b]])
    assert cache.usage() == {"cpu": 2000}
    a.ensure_loaded()                                   # first use moves the weights in place
    assert cache.usage() == {"sim": 1000, "cpu": 1000}
    b.ensure_loaded()                                   # no room for both: the LRU one goes to the CPU first
    assert log == [(id(a), "sim:0"), (id(a), "cpu"), (id(b), "sim:0")]
    assert a.device == "cpu" and b.device == "sim:0"
    assert cache.usage() == {"sim": 1000, "cpu": 1000} and cache.offloads == 1


def test_a_move_that_leaves_the_budget_exceeded_is_corrected_after():
    log: list = []
    cache = OutputCache({"sim": 500, "cpu": 100_000})
    a = SimHandle(1000, log)
    cache.put("a", [[a]])
    a.ensure_loaded()                                   # larger than the accelerator budget on its own
    assert a.device == "cpu" and cache.usage() == {"cpu": 1000} and "a" in cache


def test_accelerator_budget_comes_from_measured_free_memory():
    from engine.memory import MIN_RESERVE, accelerator_budgets
    gib = 1 << 30
    budgets = accelerator_budgets(lambda: {"cuda": (30 * gib, 80 * gib), "xpu": (100 << 20, 16 * gib)})
    assert budgets["cuda"] == 30 * gib - 8 * gib         # free minus a tenth of the total
    assert budgets["xpu"] == 0                           # less free than the reserve
    assert accelerator_budgets(lambda: {}) == {"cuda": 0} and MIN_RESERVE > 0


def test_offload_order_follows_use_and_accounting_holds_after_every_move():
    log: list = []
    cache = OutputCache({"sim": 2500, "cpu": 100_000})
    a, b, c = SimHandle(1000, log), SimHandle(1000, log), SimHandle(1000, log)
    for key, handle in (("a", a), ("b", b), ("c", c)):
        cache.put(key, [[handle]])

    def measured() -> dict[str, int]:
        total: dict[str, int] = {}
        for handle in (a, b, c):
            total[handle.device.split(":")[0]] = total.get(handle.device.split(":")[0], 0) + handle.nbytes
        return total

    a.ensure_loaded()
    assert cache.usage() == measured() == {"sim": 1000, "cpu": 2000}
    b.ensure_loaded()
    assert cache.usage() == measured() == {"sim": 2000, "cpu": 1000}
    cache.get("a")                      # a is now the most recently used: b is the one to go
    c.ensure_loaded()
    assert (a.device, b.device, c.device) == ("sim:0", "cpu", "sim:0")
    assert cache.usage() == measured() == {"sim": 2000, "cpu": 1000}
    b.ensure_loaded()                   # then a, the least recently used of the two on the accelerator
    assert (a.device, b.device, c.device) == ("cpu", "sim:0", "sim:0")
    assert cache.usage() == measured() and cache.offloads == 2 and cache.evictions == 0


def test_unmovable_entries_on_an_accelerator_are_dropped_not_retried():
    class Stuck:
        """Reports accelerator memory but cannot move (a foreign object holding device buffers)."""

        def footprint(self) -> dict[str, int]:
            return {"sim:0": 1000}

    cache = OutputCache({"sim": 1500, "cpu": 100_000})
    cache.put("stuck", [[Stuck()]])
    cache.put("also", [[Stuck()]])      # over budget: the older one goes, in one step
    assert "stuck" not in cache and "also" in cache
    assert cache.usage() == {"sim": 1000} and cache.evictions == 1


def test_stats_answer_while_another_thread_holds_the_cache_lock():
    import threading
    cache = OutputCache({"cpu": 100_000})
    cache.put("x", [[tensor_kib(1)]])
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache._lock:
            holding.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        result: list = []
        reader = threading.Thread(target=lambda: result.append(cache.stats()))
        reader.start()
        reader.join(30)                 # a deadline, not a timing: a blocked reader never finishes
        assert result and result[0]["entries"] == 1 and result[0]["bytes"] == {"cpu": KiB}
    finally:
        release.set()
        holder.join()

"""The executor on small non-diffusion nodes: events, partial re-execution, content-addressed caching,
eviction, interrupt, errors, list mapping, lazy inputs, progress and previews."""

import os
import threading
from typing import Annotated, Any

import pytest

from engine import progress
from engine.cache import OutputCache
from engine.events import Event
from engine.executor import Executor, RunResult
from engine.registry import Registry
from tests.engine import toy_nodes as t
from tests.waiting import wait_until

MiB = 1 << 20


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.from_nodes(t)


@pytest.fixture()
def ex(reg) -> Executor:
    t.CALLS.clear()
    return Executor(reg, OutputCache({"cpu": 256 * MiB}))


def n(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def of(self, kind: str) -> list[dict]:
        return [e.data for e in self.events if e.type == kind]

    def executing_nodes(self) -> list[str]:
        return [d["node"] for d in self.of("executing") if d["node"] is not None]


def run(ex: Executor, prompt: dict, pid: str = "p", **kw) -> tuple[RunResult, Recorder]:
    rec = Recorder()
    t.CALLS.clear()
    res = ex.execute(prompt, pid, emit=rec, **kw)
    return res, rec


def chain_prompt(b1: int = 2, b2: int = 3) -> dict:
    return {
        "1": n("Const", value=1),
        "2": n("Add", a=["1", 0], b=b1),
        "3": n("Add", a=["2", 0], b=b2),
        "4": n("Show", value=["3", 0]),
        "5": n("Const", value=7),
        "6": n("Show", value=["5", 0]),
    }


# ---- event sequence ------------------------------------------------------------------------------------

def test_event_sequence_and_data_keys(ex):
    prompt = {"1": n("Const", value=3), "2": n("Add", a=["1", 0], b=4), "3": n("Show", value=["2", 0])}
    res, rec = run(ex, prompt, "pid-1")
    assert res.status == "success"
    assert rec.types() == ["execution_start", "execution_cached", "executing", "executing", "executing",
                           "executed", "execution_success", "executing"]
    ev = rec.events
    assert set(ev[0].data) == {"prompt_id", "timestamp"} and ev[0].data["prompt_id"] == "pid-1"
    assert isinstance(ev[0].data["timestamp"], int)
    assert set(ev[1].data) == {"nodes", "prompt_id", "timestamp"} and ev[1].data["nodes"] == []
    assert [e.data for e in ev[2:5]] == [{"node": nid, "display_node": nid, "prompt_id": "pid-1"}
                                         for nid in ("1", "2", "3")]
    assert ev[5].data == {"node": "3", "display_node": "3", "output": {"text": ["7"]}, "prompt_id": "pid-1"}
    assert set(ev[6].data) == {"prompt_id", "timestamp"}
    assert ev[7].data == {"node": None, "display_node": None, "prompt_id": "pid-1"}
    # The result mirrors the history entry: outputs, recorded status messages, meta.
    assert res.outputs == {"3": {"text": ["7"]}}
    assert [m[0] for m in res.messages] == ["execution_start", "execution_cached", "execution_success"]
    assert res.meta["3"] == {"node_id": "3", "display_node": "3", "parent_node": None, "real_node_id": "3"}
    assert res.executed == ["1", "2", "3"] and res.cached == []
    assert t.CALLS == ["Const", "Add", "Show"]


def test_identical_rerun_executes_nothing(ex):
    prompt = chain_prompt()
    first, _ = run(ex, prompt, "a")
    assert sorted(first.executed) == ["1", "2", "3", "4", "5", "6"]
    res, rec = run(ex, prompt, "b")
    assert res.status == "success"
    assert t.CALLS == [] and res.executed == []
    assert sorted(rec.of("execution_cached")[0]["nodes"]) == ["1", "2", "3", "4", "5", "6"]
    assert rec.executing_nodes() == []
    # Cached output nodes still report their UI, as ComfyUI re-sends `executed`.
    assert sorted(d["node"] for d in rec.of("executed")) == ["4", "6"]
    assert res.outputs == {"4": {"text": ["6"]}, "6": {"text": ["7"]}}
    assert rec.types() == ["execution_start", "execution_cached", "executed", "executed", "execution_success",
                           "executing"]


def test_changed_widget_reruns_exactly_that_node_and_descendants(ex):
    run(ex, chain_prompt(b1=2), "a")
    res, rec = run(ex, chain_prompt(b1=5), "b")
    assert res.executed == ["2", "3", "4"]
    assert rec.executing_nodes() == ["2", "3", "4"]
    assert t.CALLS == ["Add", "Add", "Show"]
    assert sorted(res.cached) == ["1", "5", "6"]
    assert res.outputs["4"] == {"text": ["9"]}
    # Changing the last Add only re-runs it and the Show after it.
    res, _ = run(ex, chain_prompt(b1=5, b2=10), "c")
    assert res.executed == ["3", "4"] and t.CALLS == ["Add", "Show"]
    assert res.outputs["4"] == {"text": ["16"]}
    # Going back to an earlier value hits the cache again.
    res, _ = run(ex, chain_prompt(b1=2), "d")
    assert res.executed == [] and res.outputs["4"] == {"text": ["6"]}


def test_renumbered_node_ids_hit_the_cache(ex):
    first = {"1": n("Const", value=4), "2": n("Add", a=["1", 0], b=1), "3": n("Collect", value=["2", 0]),
             "4": n("Show", value=["2", 0])}
    run(ex, first, "a")
    renumbered = {"40": n("Show", value=["20", 0]), "10": n("Const", value=4), "20": n("Add", a=["10", 0], b=1),
                  "30": n("Collect", value=["20", 0])}
    res, rec = run(ex, renumbered, "b")
    assert sorted(rec.of("execution_cached")[0]["nodes"]) == ["10", "20", "30"]
    # Show takes its UNIQUE_ID as a hidden input, so its key includes its id (as in ComfyUI): it re-runs.
    assert res.executed == ["40"] and t.CALLS == ["Show"]
    assert res.outputs == {"30": {"values": [5]}, "40": {"text": ["5"]}}


def test_duplicated_subgraph_within_one_prompt_runs_once(ex):
    prompt = {"1": n("Const", value=5), "2": n("Add", a=["1", 0], b=1), "3": n("Collect", value=["2", 0]),
              "11": n("Const", value=5), "12": n("Add", a=["11", 0], b=1), "13": n("Collect", value=["12", 0])}
    res, rec = run(ex, prompt)
    assert res.status == "success"
    assert t.CALLS == ["Const", "Add", "Collect"]
    # Both output nodes still report their result.
    assert res.outputs == {"3": {"values": [6]}, "13": {"values": [6]}}
    assert sorted(d["node"] for d in rec.of("executed")) == ["13", "3"]


def test_non_deterministic_node_reruns_every_time_with_descendants(ex):
    prompt = {"1": n("Random", low=0), "2": n("Add", a=["1", 0], b=1), "3": n("Collect", value=["2", 0]),
              "4": n("Const", value=1), "5": n("Collect", value=["4", 0])}
    res1, _ = run(ex, prompt, "a")
    assert t.CALLS.count("Random") == 1
    res2, _ = run(ex, prompt, "b")
    assert t.CALLS == ["Random", "Add", "Collect"]
    assert res2.executed == ["1", "2", "3"]
    assert sorted(res2.cached) == ["4", "5"]


def test_two_random_nodes_in_one_prompt_are_independent(ex):
    prompt = {"1": n("Random", low=0), "2": n("Random", low=0),
              "3": n("Collect", value=["1", 0]), "4": n("Collect", value=["2", 0])}
    res, _ = run(ex, prompt)
    assert t.CALLS.count("Random") == 2 and t.CALLS.count("Collect") == 2
    assert set(res.outputs) == {"3", "4"}


def test_fingerprint_change_reruns(ex, tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("hello")
    prompt = {"1": n("ReadFile", path=str(path)), "2": n("Upper", text=["1", 0], enabled=True),
              "3": n("Collect", value=["2", 0])}
    res, _ = run(ex, prompt, "a")
    assert res.outputs["3"] == {"values": ["HELLO"]}
    res, _ = run(ex, prompt, "b")
    assert res.executed == [] and t.CALLS == []
    path.write_text("changed")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))   # a surely different mtime
    res, _ = run(ex, prompt, "c")
    assert res.executed == ["1", "2", "3"] and t.CALLS == ["ReadFile", "Upper", "Collect"]
    assert res.outputs["3"] == {"values": ["CHANGED"]}


def test_partial_execution_targets(ex):
    prompt = chain_prompt()
    res, rec = run(ex, prompt, "a", outputs=["6"])
    assert res.executed == ["5", "6"] and t.CALLS == ["Const", "Show"]
    assert list(res.outputs) == ["6"]
    # The other output later runs only its own branch.
    res, _ = run(ex, prompt, "b", outputs=["4"])
    assert res.executed == ["1", "2", "3", "4"] and list(res.outputs) == ["4"]


# ---- byte-budget eviction ----------------------------------------------------------------------------------

def big(tag: int, show_id: str = "2") -> dict:
    # Show's key includes its node id: a fresh id makes it run again, so it needs its BigTensor input
    # (from the cache if still there, else recomputed).
    return {"1": n("BigTensor", megabytes=1, tag=tag), show_id: n("Show", value=["1", 0])}


def test_byte_budget_evicts_least_recently_used(reg):
    cache = OutputCache({"cpu": int(2.5 * MiB)})
    ex = Executor(reg, cache)
    for tag in (1, 2):
        res, _ = run(ex, big(tag), f"fill{tag}")
        assert t.CALLS.count("BigTensor") == 1
    assert cache.usage() == {"cpu": 2 * MiB} and cache.evictions == 0
    run(ex, big(3), "fill3")                           # 3 MiB > 2.5: the oldest (tag 1) goes
    stats = cache.stats()
    assert stats["evictions"] == 1 and stats["bytes"] == {"cpu": 2 * MiB}
    assert stats["budget_bytes"] == {"cpu": int(2.5 * MiB)} and stats["pinned"] == 0
    res, _ = run(ex, big(2, "s2"), "again2")                 # still cached; this makes tag 3 the LRU entry
    assert t.CALLS.count("BigTensor") == 0 and "1" in res.cached
    res, _ = run(ex, big(1, "s3"), "again1")                 # evicted earlier: recomputed, evicting tag 3
    assert t.CALLS.count("BigTensor") == 1 and res.executed[0] == "1"
    assert cache.evictions == 2
    res, _ = run(ex, big(2, "s4"), "still2")
    assert t.CALLS.count("BigTensor") == 0
    res, _ = run(ex, big(3, "s5"), "gone3")
    assert t.CALLS.count("BigTensor") == 1
    assert cache.usage()["cpu"] <= int(2.5 * MiB)
    assert cache.hits >= 2


def test_entries_of_the_running_prompt_are_pinned(reg):
    cache = OutputCache({"cpu": int(1.5 * MiB)})
    ex = Executor(reg, cache)
    prompt = {"1": n("BigTensor", megabytes=1, tag=1), "2": n("BigTensor", megabytes=1, tag=2),
              "3": n("BigTensor", megabytes=1, tag=3),
              "4": n("Join3", a=["1", 0], b=["2", 0], c=["3", 0]), "5": n("Collect", value=["4", 0])}
    seen: dict = {}

    def emit(event: Event) -> None:
        if event.type == "executing" and event.data["node"] == "4":
            seen.update(cache.stats())

    t.CALLS.clear()
    res = ex.execute(prompt, "pinned", emit=emit)
    assert res.status == "success" and res.outputs["5"] == {"values": [3.0 * 262144]}
    # While the prompt ran, its three tensors were kept although they exceed the budget.
    assert seen["bytes"] == {"cpu": 3 * MiB} and seen["evictions"] == 0 and seen["pinned"] >= 3
    # Afterwards the cache is brought back under budget, oldest first.
    assert cache.usage()["cpu"] <= int(1.5 * MiB) and cache.evictions == 2
    assert cache.stats()["pinned"] == 0
    # The most recently produced tensor (tag 3) survived; tags 1 and 2 were evicted.
    res, _ = run(ex, {"3": n("BigTensor", megabytes=1, tag=3), "9": n("Show", value=["3", 0])}, "t3")
    assert t.CALLS == ["Show"]
    res, _ = run(ex, {"1": n("BigTensor", megabytes=1, tag=1), "9": n("Show", value=["1", 0])}, "t1")
    assert t.CALLS == ["BigTensor", "Show"]


# ---- interrupt ----------------------------------------------------------------------------------------------

def test_interrupt_from_another_thread_during_slow_node(ex):
    prompt = {"1": n("Const", value=1), "2": n("Slow", value=["1", 0], steps=1000, delay=0.01),
              "3": n("Collect", value=["2", 0])}
    rec = Recorder()
    started = threading.Event()

    def emit(event: Event) -> None:
        rec(event)
        if event.type == "progress":
            started.set()

    box: dict = {}
    t.CALLS.clear()
    worker = threading.Thread(target=lambda: box.update(res=ex.execute(prompt, "slow", emit=emit)))
    worker.start()
    assert started.wait(10)
    ex.interrupt("some-other-prompt")        # a different prompt id is ignored
    # The node checks for an interrupt at every progress report: reports after it prove it was ignored.
    seen = len(rec.of("progress"))
    wait_until(lambda: len(rec.of("progress")) >= seen + 3, what="progress after a foreign interrupt")
    assert worker.is_alive()
    ex.interrupt()
    worker.join(30)
    assert not worker.is_alive()
    res = box["res"]
    assert res.status == "interrupted"
    assert "execution_success" not in rec.types()
    assert rec.types()[-2:] == ["execution_interrupted", "executing"]
    data = rec.of("execution_interrupted")[0]
    assert set(data) == {"prompt_id", "node_id", "node_type", "executed", "timestamp"}
    assert data["prompt_id"] == "slow" and data["node_id"] == "2" and data["node_type"] == "Slow"
    assert data["executed"] == ["1"]
    assert 0 < len(rec.of("progress")) < 1000
    assert "Collect" not in t.CALLS

    # The next prompt runs normally; the interrupted node was not cached.
    prompt["2"]["inputs"]["steps"] = 2
    res2, rec2 = run(ex, prompt, "next")
    assert res2.status == "success" and res2.executed == ["2", "3"]
    assert rec2.types()[-2:] == ["execution_success", "executing"]


def test_interrupt_between_nodes(ex):
    prompt = {"1": n("Const", value=1), "2": n("Add", a=["1", 0], b=1), "3": n("Collect", value=["2", 0])}

    def emit(event: Event) -> None:
        if event.type == "executing" and event.data["node"] == "1":
            ex.interrupt()

    t.CALLS.clear()
    res = ex.execute(prompt, "between", emit=emit)
    assert res.status == "interrupted"
    assert t.CALLS == ["Const"]
    res, _ = run(ex, prompt, "after")
    assert res.status == "success" and res.executed == ["2", "3"]


# ---- errors ---------------------------------------------------------------------------------------------------

def test_exception_reports_execution_error_naming_the_node(ex):
    prompt = {"1": n("Const", value=3), "2": n("Fail", value=["1", 0], message="boom"),
              "3": n("Collect", value=["2", 0])}
    res, rec = run(ex, prompt, "err")
    assert res.status == "error"
    assert rec.types()[-2:] == ["execution_error", "executing"]
    assert "execution_success" not in rec.types()
    data = rec.of("execution_error")[0]
    assert set(data) == {"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                         "traceback", "current_inputs", "current_outputs", "timestamp"}
    assert data["prompt_id"] == "err" and data["node_id"] == "2" and data["node_type"] == "Fail"
    assert data["exception_type"] == "ValueError"
    assert "boom" in data["exception_message"]
    assert isinstance(data["traceback"], list) and data["traceback"]
    assert all(isinstance(line, str) for line in data["traceback"])
    assert any("raise ValueError" in line for line in data["traceback"])
    assert data["current_inputs"] == {"value": [3], "message": ["boom"]}
    assert data["executed"] == ["1"]
    assert res.error == data
    assert t.CALLS == ["Const", "Fail"]           # execution stopped at the failure
    # The failed node is not cached: the same prompt fails again, and a fixed prompt then runs.
    res, _ = run(ex, prompt, "err2")
    assert res.status == "error" and t.CALLS == ["Fail"]
    prompt["2"] = n("Add", a=["1", 0], b=1)
    res, _ = run(ex, prompt, "fixed")
    assert res.status == "success" and res.outputs["3"] == {"values": [4]}


def test_exception_type_of_a_non_builtin_exception(ex):
    prompt = {"1": n("Const", value=3), "2": n("FailCustom", value=["1", 0]), "3": n("Collect", value=["2", 0])}
    res, rec = run(ex, prompt)
    data = rec.of("execution_error")[0]
    assert data["exception_type"] == "tests.engine.toy_nodes.ToyError"
    assert "custom failure 3" in data["exception_message"]


# ---- lists ----------------------------------------------------------------------------------------------------

def test_output_list_maps_downstream_calls_and_input_list_gets_whole_lists(ex):
    prompt = {"1": n("MakeList", start=1, count=3), "2": n("Add", a=["1", 0], b=10),
              "3": n("SumList", values=["2", 0], offset=100), "4": n("Collect", value=["3", 0]),
              "5": n("Collect", value=["2", 0])}
    res, _ = run(ex, prompt)
    assert res.status == "success"
    assert t.CALLS.count("MakeList") == 1
    assert t.CALLS.count("Add") == 3                  # once per item
    assert t.CALLS.count("SumList") == 1              # once, with the whole list
    assert res.outputs["4"] == {"values": [11 + 12 + 13 + 100]}
    # An output node over a list is called per item; its UI lists are concatenated.
    assert t.CALLS.count("Collect") == 4
    assert res.outputs["5"] == {"values": [11, 12, 13]}


def test_shorter_list_repeats_its_last_item(ex):
    prompt = {"1": n("MakeList", start=1, count=3), "2": n("MakeList", start=100, count=2),
              "3": n("Add", a=["1", 0], b=["2", 0]), "4": n("Collect", value=["3", 0])}
    res, _ = run(ex, prompt)
    assert t.CALLS.count("Add") == 3
    assert res.outputs["4"] == {"values": [101, 103, 104]}


def test_input_is_list_receives_lists_even_for_constants(ex):
    prompt = {"1": n("Const", value=5), "2": n("SumList", values=["1", 0], offset=1),
              "3": n("Collect", value=["2", 0])}
    res, _ = run(ex, prompt)
    assert res.outputs["3"] == {"values": [6]}


def test_empty_list_calls_downstream_zero_times(ex):
    prompt = {"1": n("MakeList", start=0, count=0), "2": n("Add", a=["1", 0], b=1),
              "3": n("SumList", values=["2", 0], offset=7), "4": n("Collect", value=["3", 0])}
    res, _ = run(ex, prompt)
    assert res.status == "success"
    assert t.CALLS.count("Add") == 0
    assert res.outputs["4"] == {"values": [7]}


# ---- lazy inputs ----------------------------------------------------------------------------------------------

def lazy_prompt(use_first: bool) -> dict:
    return {"1": n("Const", value=1), "2": n("Add", a=["1", 0], b=10),
            "3": n("Const", value=2), "4": n("Add", a=["3", 0], b=20),
            "5": n("Choose", use_first=use_first, first=["2", 0], second=["4", 0]),
            "6": n("Collect", value=["5", 0])}


def test_lazy_untaken_branch_never_executes(ex):
    res, rec = run(ex, lazy_prompt(True), "a")
    assert res.status == "success"
    assert res.outputs["6"] == {"values": [11]}
    assert sorted(res.executed) == ["1", "2", "5", "6"]
    assert "3" not in rec.executing_nodes() and "4" not in rec.executing_nodes()
    assert t.CALLS.count("Add") == 1 and t.CALLS.count("Const") == 1
    # Taking the other branch executes only that branch (plus Choose and the output).
    res, rec = run(ex, lazy_prompt(False), "b")
    assert res.outputs["6"] == {"values": [22]}
    assert sorted(res.executed) == ["3", "4", "5", "6"]
    assert t.CALLS.count("Add") == 1 and t.CALLS.count("Const") == 1 and t.CALLS.count("Choose") == 1
    assert {"1", "2"} <= set(res.cached)


def test_lazy_node_is_announced_again_when_it_runs_after_its_branch(ex):
    _, rec = run(ex, lazy_prompt(True), "lazy-order")
    # Choose (5) is staged, its lazy branch (1, 2) runs, then Choose really runs: clients see it last.
    assert rec.executing_nodes() == ["5", "1", "2", "5", "6"]


def test_a_node_calling_sys_exit_fails_its_node_not_the_process(ex):
    res, rec = run(ex, {"1": n("Const", value=1), "2": n("Exit", value=["1", 0]), "3": n("Show", value=["2", 0])},
                   "exit")
    assert res.status == "error"
    err = rec.of("execution_error")[0]
    assert err["node_id"] == "2" and err["exception_type"] == "SystemExit"
    res, _ = run(ex, {"1": n("Const", value=5), "3": n("Show", value=["1", 0])}, "after")
    assert res.status == "success"


# ---- progress and previews -------------------------------------------------------------------------------------

def test_progress_events_from_report(ex):
    prompt = {"1": n("Const", value=1), "2": n("Slow", value=["1", 0], steps=3, delay=0.0),
              "3": n("Collect", value=["2", 0])}
    res, rec = run(ex, prompt, "prog")
    assert res.status == "success"
    assert rec.of("progress") == [{"value": i, "max": 3, "prompt_id": "prog", "node": "2"} for i in (1, 2, 3)]
    # Progress comes between the node's `executing` and the next node's.
    kinds = [(e.type, e.data.get("node")) for e in rec.events if e.type in ("executing", "progress")]
    assert kinds[:5] == [("executing", "1"), ("executing", "2"), ("progress", "2"), ("progress", "2"),
                         ("progress", "2")]


def test_preview_event_carries_an_image(ex):
    prompt = {"1": n("Const", value=1), "2": n("PreviewSteps", value=["1", 0], steps=2),
              "3": n("Collect", value=["2", 0])}
    res, rec = run(ex, prompt, "prev")
    previews = [e for e in rec.events if e.type == "preview"]
    assert len(previews) == 2 and len(rec.of("progress")) == 2
    from PIL import Image
    for i, e in enumerate(previews):
        assert isinstance(e.image, Image.Image) and e.image.size == (4, 4)
        assert e.image.getpixel((0, 0)) == (i * 40, 0, 0)
        assert e.data == {"node_id": "2", "prompt_id": "prev", "display_node_id": "2", "parent_node_id": None,
                          "real_node_id": "2"}
    # Each preview follows the progress event of its step.
    kinds = [e.type for e in rec.events if e.type in ("progress", "preview")]
    assert kinds == ["progress", "preview", "progress", "preview"]


def test_report_outside_execution_is_a_no_op():
    progress.report(1, 2)
    progress.check_interrupt()
    assert progress.current() is None


# ---- hidden inputs -----------------------------------------------------------------------------------------------

def test_hidden_inputs_are_filled(reg):
    seen = {}
    from engine.inputs import Hidden
    from engine.node import UI, node

    @node("Spy", output_node=True)
    def spy(prompt: Annotated[Any, Hidden("PROMPT")] = None, uid: Annotated[Any, Hidden("UNIQUE_ID")] = None,
            info: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None):
        seen.update(prompt=prompt, uid=uid, info=info)
        return UI(ok=[True])

    reg2 = Registry.from_nodes(t, spy)
    ex2 = Executor(reg2, OutputCache({"cpu": MiB}))
    prompt = {"s1": n("Spy")}
    res = ex2.execute(prompt, "h", extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}})
    assert res.status == "success"
    assert seen == {"prompt": prompt, "uid": "s1", "info": {"workflow": {"nodes": []}}}

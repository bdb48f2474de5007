"""engine.store on real SQLite files: ordering, recovery, windowing, persistence, concurrent writers."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from engine.store import DuplicatePromptId, Store, history_entry


def add(store: Store, pid: str, number: float | None = None) -> None:
    n = store.next_number() if number is None else number
    store.enqueue(n, pid, {"1": {"class_type": "X", "inputs": {}}}, {"client_id": "c", "api_key_comfy_org": "k"}, ["1"])


def test_heap_order_and_front(tmp_path):
    s = Store(tmp_path / "q.db")
    add(s, "a")
    add(s, "b")
    s.enqueue(-s.next_number(), "front", {}, {}, [])
    add(s, "c", number=1)            # ties with b's number: insertion order breaks the tie
    assert [i.prompt_id for i in s.pending()] == ["front", "a", "b", "c"]
    assert s.claim_next().prompt_id == "front"
    assert s.queue_remaining() == 4 and [i.prompt_id for i in s.running()] == ["front"]
    assert s.delete_pending(["a", "front"]) == 1   # a running prompt is not deleted
    assert [i.prompt_id for i in s.pending()] == ["b", "c"]
    assert s.pending()[0].wire()[3] == {"client_id": "c"}, "credentials never shown"


def test_duplicate_prompt_id(tmp_path):
    s = Store(tmp_path / "q.db")
    add(s, "a")
    with pytest.raises(DuplicatePromptId):
        add(s, "a")
    item = s.claim_next()
    s.finish("a", history_entry(item, status_str="success", completed=True, messages=[]))
    with pytest.raises(DuplicatePromptId):
        add(s, "a")


def test_survives_reopen_and_recovers_running(tmp_path):
    path = tmp_path / "q.db"
    s = Store(path)
    for pid in ("a", "b", "c"):
        add(s, pid)
    done = s.claim_next()
    s.finish("a", history_entry(done, status_str="success", completed=True, messages=[["execution_start", {}]],
                                outputs={"1": {"text": ["x"]}}))
    s.claim_next()                   # "b" is running when the process "dies" (no close)
    s.set_paused(True)
    s2 = Store(path)
    assert s2.recover() == ["b"]
    assert [i.prompt_id for i in s2.pending()] == ["c"]
    assert s2.paused is True
    hist = s2.history()
    assert list(hist) == ["a", "b"]
    assert hist["a"]["outputs"] == {"1": {"text": ["x"]}}
    assert hist["b"]["status"] == {"status_str": "error", "completed": False,
                                   "messages": hist["b"]["status"]["messages"]}
    assert hist["b"]["status"]["messages"][-1][1]["exception_message"] == "server stopped while this prompt was running"
    assert s2.next_number() == 3
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_history_windowing_and_cap(tmp_path):
    s = Store(tmp_path / "q.db", max_history=5)
    for i in range(8):
        add(s, f"p{i}")
        item = s.claim_next()
        s.finish(item.prompt_id, history_entry(item, status_str="success", completed=True, messages=[],
                                               outputs={"n": {"v": [float("nan"), i]}}))
    assert list(s.history()) == ["p3", "p4", "p5", "p6", "p7"]
    assert list(s.history(max_items=2)) == ["p6", "p7"]
    assert list(s.history(max_items=2, offset=1)) == ["p4", "p5"]
    assert list(s.history(offset=4)) == ["p7"]
    assert list(s.history(max_items=10, offset=-1)) == ["p3", "p4", "p5", "p6", "p7"]
    assert s.history_item("p7")["outputs"] == {"n": {"v": [None, 7]}}, "NaN stored as null"
    assert s.delete_history(["p3", "nope"]) == 1 and s.clear_history() == 4


def test_concurrent_writers(tmp_path):
    s = Store(tmp_path / "q.db")
    errors = []

    def producer(k: int) -> None:
        try:
            for i in range(50):
                add(s, f"{k}-{i}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    claimed = []
    while any(t.is_alive() for t in threads) or s.has_pending():
        item = s.claim_next()
        if item:
            claimed.append(item.prompt_id)
            s.finish(item.prompt_id, history_entry(item, status_str="success", completed=True, messages=[]))
    for t in threads:
        t.join()
    assert not errors
    assert len(claimed) == len(set(claimed)) == 200 and s.history_count() == 200


def test_a_failed_transaction_start_releases_the_lock(tmp_path):
    import sqlite3
    import threading

    store = Store(tmp_path / "q.db")
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.set_paused(True)           # BEGIN on a closed database fails...
    got = []
    worker = threading.Thread(target=lambda: got.append(store._lock.acquire(timeout=2)))
    worker.start()
    worker.join()
    assert got == [True]                  # ...and the lock is free for other threads

"""Durable queue and history in one SQLite file (WAL mode).

ComfyUI keeps both in memory and loses them on restart; here every queue change and every finished
prompt is committed before the caller goes on, so a crash (even SIGKILL) loses nothing that was
acknowledged. WAL with synchronous=NORMAL survives process crashes; only a power loss could drop
the last transactions.

Queue order is ComfyUI's heap order: the lowest `number` runs first (`front` uses negative numbers),
ties broken by insertion order. A prompt that was `running` when the process died is moved to history
as failed by `recover()`, which the server calls once at startup.

This module knows nothing about HTTP or nodes: prompts, extra_data and history entries are opaque
JSON-able values.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_HISTORY = 10000
# extra_data keys that carry credentials: never shown back in /queue or /history (ComfyUI strips them too)
SENSITIVE_EXTRA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
RESTART_REASON = "server stopped while this prompt was running"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id    TEXT NOT NULL UNIQUE,
    number       REAL NOT NULL,
    prompt       TEXT NOT NULL,
    extra_data   TEXT NOT NULL,
    outputs      TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running')),
    created_at   REAL NOT NULL,
    started_at   REAL
);
CREATE INDEX IF NOT EXISTS queue_order ON queue (status, number, seq);
CREATE TABLE IF NOT EXISTS history (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id    TEXT NOT NULL UNIQUE,
    entry        TEXT NOT NULL,
    status_str   TEXT NOT NULL,
    created_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class StoreUnusable(RuntimeError):
    """The database file cannot be opened or set aside (permissions, a directory in its place)."""


class DuplicatePromptId(ValueError):
    """The client chose a prompt_id that is already queued or in history."""


@dataclass(frozen=True)
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list[str]

    def wire(self) -> list:
        """ComfyUI's queue tuple `[number, prompt_id, prompt, extra_data, outputs_to_execute]`, minus secrets."""
        return [_wire_number(self.number), self.prompt_id, self.prompt, public_extra_data(self.extra_data),
                list(self.outputs)]


def public_extra_data(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if k not in SENSITIVE_EXTRA_KEYS}


def _wire_number(n: float) -> float | int:
    # The server counter hands out integers; keep them integers on the wire as ComfyUI does.
    return int(n) if float(n).is_integer() else n


def _dumps(value: Any) -> str:
    """JSON text for the database. Recording a result must never fail: objects that JSON cannot hold
    become strings and NaN/inf become null (a NaN would make the history unreadable by clients)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(finite_json(value), separators=(",", ":"), allow_nan=False, default=str)


def finite_json(value: Any) -> Any:
    """`value` with NaN/inf floats replaced by None (JSON has no NaN; clients choke on it)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _storable(value: object) -> bool:
    """A str SQLite can bind: UTF-8 has no lone surrogates, which JSON lets a client send."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass   # no transaction was open


class Store:
    """Thread-safe: one connection guarded by a lock; every method is one short transaction."""

    def __init__(self, path: str | Path, max_history: int = MAX_HISTORY) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_history = max_history
        self._lock = threading.RLock()
        # What was wrong with the file at start (damaged and set aside, deleted, emptied), for the server
        # to say; None when the database opened as it was left.
        self.problem: str | None = None
        self.set_aside: Path | None = None
        self._db = self._open_checked()
        self._recount(self._db)

    # -- opening, with an integrity check ----------------------------------------------------------

    @property
    def _marker(self) -> Path:
        """Written when the database is created: a missing or empty database next to it was lost, not new."""
        return self.path.with_name(self.path.name + ".created")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            row = db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else 'no answer'}")
            # executescript commits on its own, so it runs outside an explicit transaction
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _open_checked(self) -> sqlite3.Connection:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = None
        except OSError as e:
            raise StoreUnusable(f"cannot read the queue database {self.path.name}: {e.strerror}") from None
        if not size and self._marker.exists():
            what = "deleted" if size is None else "emptied"
            self.problem = (f"the queue database {self.path.name} was {what} since it was created "
                            f"({self._marker.read_text().strip() or 'earlier'}): queue and history start empty")
            for suffix in ("-wal", "-shm"):   # a stale log of the lost file must not be replayed into the new one
                stale = self.path.with_name(self.path.name + suffix)
                if stale.exists():
                    self._move_aside(stale)
        if self.path.exists() and not self.path.is_file():
            raise StoreUnusable(f"the queue database {self.path.name} is not a file")
        try:
            db = self._connect()
        except sqlite3.OperationalError as e:   # cannot open, locked, read-only: not damage; keep the file
            raise StoreUnusable(f"cannot open the queue database {self.path.name}: {e}") from None
        except sqlite3.DatabaseError as e:
            aside = self._move_aside(self.path)
            for suffix in ("-wal", "-shm"):
                extra = self.path.with_name(self.path.name + suffix)
                if extra.exists():
                    self._move_aside(extra, aside.name.replace(self.path.name, self.path.name + suffix, 1))
            self.set_aside = aside
            self.problem = (f"the queue database {self.path.name} is damaged ({e}); it was kept aside as "
                            f"{aside.name} and a new, empty queue and history were started")
            try:
                db = self._connect()
            except sqlite3.Error as e2:
                raise StoreUnusable(f"cannot create a new queue database {self.path.name}: {e2}") from None
        except sqlite3.Error as e:   # e.g. a read-only folder: say so instead of a traceback
            raise StoreUnusable(f"cannot open the queue database {self.path.name}: {e}") from None
        if not self._marker.exists():
            try:
                self._marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")
            except OSError:
                pass   # only the loss message depends on it
        return db

    def _move_aside(self, path: Path, name: str | None = None) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = path.with_name(name or f"{path.name}.damaged-{stamp}")
        i = 1
        while target.exists():
            target = path.with_name(f"{name or path.name + '.damaged-' + stamp}.{i}")
            i += 1
        try:
            os.replace(path, target)
        except OSError as e:
            raise StoreUnusable(f"the queue database {path.name} is damaged and cannot be moved aside: "
                                f"{e.strerror}") from None
        return target

    # -- plumbing -----------------------------------------------------------------------------------

    class _Tx:
        def __init__(self, store: Store) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:   # a locked or closed database must not keep the lock held forever
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> None:
            db = self.store._db
            try:
                if exc_type is None:
                    try:
                        db.execute("COMMIT")
                    except BaseException:
                        # leave no transaction open, or every later BEGIN would fail
                        _rollback(db)
                        raise
                    self.store._recount(db)
                else:
                    _rollback(db)
            finally:
                self.store._lock.release()

    def _tx(self) -> Store._Tx:
        return Store._Tx(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta ---------------------------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (key, _dumps(value)))

    def next_number(self) -> int:
        """ComfyUI's `server.number`: a counter that increments per queued prompt; it survives restarts."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='number'").fetchone()
            n = int(json.loads(row[0])) if row else 0
            db.execute("INSERT INTO meta(key, value) VALUES('number', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (_dumps(n + 1),))
        return n

    @property
    def paused(self) -> bool:
        return bool(self.get_meta("paused", False))

    def set_paused(self, paused: bool) -> None:
        self.set_meta("paused", bool(paused))

    # -- queue --------------------------------------------------------------------------------------

    def enqueue(self, number: float, prompt_id: str, prompt: dict, extra_data: dict, outputs: Iterable[str]) -> None:
        row = (prompt_id, float(number), _dumps(prompt), _dumps(extra_data), _dumps(list(outputs)), time.time())
        with self._tx() as db:
            if db.execute("SELECT 1 FROM history WHERE prompt_id=?", (prompt_id,)).fetchone():
                raise DuplicatePromptId(prompt_id)
            try:
                db.execute("INSERT INTO queue(prompt_id, number, prompt, extra_data, outputs, created_at) "
                           "VALUES(?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError as e:
                raise DuplicatePromptId(prompt_id) from e

    @staticmethod
    def _item(row: tuple) -> QueueItem:
        number, prompt_id, prompt, extra, outputs = row
        return QueueItem(number, prompt_id, json.loads(prompt), json.loads(extra), json.loads(outputs))

    _COLS = "number, prompt_id, prompt, extra_data, outputs"

    def claim_next(self) -> QueueItem | None:
        """Mark the first pending prompt (heap order) as running and return it."""
        with self._tx() as db:
            row = db.execute(f"SELECT seq, {self._COLS} FROM queue WHERE status='pending' "
                             "ORDER BY number, seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE queue SET status='running', started_at=? WHERE seq=?", (time.time(), row[0]))
        return self._item(row[1:])

    def pending(self) -> list[QueueItem]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLS} FROM queue WHERE status='pending' "
                                    "ORDER BY number, seq").fetchall()
        return [self._item(r) for r in rows]

    def running(self) -> list[QueueItem]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLS} FROM queue WHERE status='running' ORDER BY seq").fetchall()
        return [self._item(r) for r in rows]

    def queue_remaining(self) -> int:
        """Pending plus running, as ComfyUI's `exec_info.queue_remaining` counts them. Kept in memory and
        updated by every transaction that changes the queue, so the event loop can read it on each status
        broadcast without touching SQLite or waiting for the lock a long transaction holds."""
        return self._queue_rows

    def _recount(self, db: sqlite3.Connection) -> None:
        self._queue_rows = db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]

    def counts(self) -> dict[str, int]:
        """Queue items per status ("pending", "running"), without reading the prompts."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM queue GROUP BY status").fetchall()
        return {"pending": 0, "running": 0, **{status: n for status, n in rows}}

    def has_pending(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM queue WHERE status='pending' LIMIT 1").fetchone() is not None

    def delete_pending(self, prompt_ids: Iterable[str]) -> int:
        ids = [p for p in prompt_ids if _storable(p)]
        with self._tx() as db:
            n = 0
            for pid in ids:
                n += db.execute("DELETE FROM queue WHERE prompt_id=? AND status='pending'", (pid,)).rowcount
        return n

    def clear_pending(self) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM queue WHERE status='pending'").rowcount

    def finish(self, prompt_id: str, entry: dict) -> None:
        """Move a prompt from the queue to history in one transaction (so it is never in both or neither)."""
        status_str = str(entry.get("status", {}).get("status_str", ""))
        with self._tx() as db:
            db.execute("DELETE FROM queue WHERE prompt_id=?", (prompt_id,))
            db.execute("INSERT INTO history(prompt_id, entry, status_str, created_at) VALUES(?, ?, ?, ?) "
                       "ON CONFLICT(prompt_id) DO UPDATE SET entry=excluded.entry, status_str=excluded.status_str",
                       (prompt_id, _dumps(entry), status_str, time.time()))
            self._trim_history(db)

    def _trim_history(self, db: sqlite3.Connection) -> None:
        count = db.execute("SELECT COUNT(*) FROM history").fetchone()[0]
        if count > self.max_history:
            db.execute("DELETE FROM history WHERE seq IN (SELECT seq FROM history ORDER BY seq LIMIT ?)",
                       (count - self.max_history,))

    def recover(self, reason: str = RESTART_REASON) -> list[str]:
        """Turn prompts left `running` by a dead process into failed history entries; pending ones stay."""
        with self._tx() as db:
            rows = db.execute(f"SELECT {self._COLS}, started_at FROM queue WHERE status='running'").fetchall()
            failed = []
            for row in rows:
                item = self._item(row[:5])
                entry = failed_entry(item, reason, exception_type="ServerStopped")
                db.execute("DELETE FROM queue WHERE prompt_id=?", (item.prompt_id,))
                db.execute("INSERT INTO history(prompt_id, entry, status_str, created_at) VALUES(?, ?, ?, ?) "
                           "ON CONFLICT(prompt_id) DO UPDATE SET entry=excluded.entry",
                           (item.prompt_id, _dumps(entry), "error", time.time()))
                failed.append(item.prompt_id)
            self._trim_history(db)
        return failed

    # -- history ------------------------------------------------------------------------------------

    def history(self, max_items: int | None = None, offset: int = -1) -> dict[str, dict]:
        """ComfyUI's windowing: entries in insertion order from `offset`; a negative offset with
        `max_items` means "the last max_items"; a negative offset alone means "from the start"."""
        with self._lock:
            if offset < 0:
                if max_items is not None:
                    total = self._db.execute("SELECT COUNT(*) FROM history").fetchone()[0]
                    offset = max(total - max_items, 0)
                else:
                    offset = 0
            limit = -1 if max_items is None else max_items
            rows = self._db.execute("SELECT prompt_id, entry FROM history ORDER BY seq LIMIT ? OFFSET ?",
                                    (limit, offset)).fetchall()
        return {pid: json.loads(entry) for pid, entry in rows}

    def history_item(self, prompt_id: str) -> dict | None:
        if not _storable(prompt_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT entry FROM history WHERE prompt_id=?", (prompt_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def history_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM history").fetchone()[0]

    def delete_history(self, prompt_ids: Iterable[str]) -> int:
        ids = [p for p in prompt_ids if _storable(p)]
        with self._tx() as db:
            return sum(db.execute("DELETE FROM history WHERE prompt_id=?", (pid,)).rowcount for pid in ids)

    def clear_history(self) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM history").rowcount


def history_entry(item: QueueItem, *, status_str: str, completed: bool, messages: list,
                  outputs: dict | None = None, meta: dict | None = None) -> dict:
    """ComfyUI's history entry shape (reference §2.4)."""
    return {
        "prompt": item.wire(),
        "outputs": outputs or {},
        "status": {"status_str": status_str, "completed": completed, "messages": messages},
        "meta": meta or {},
    }


def failed_entry(item: QueueItem, reason: str, *, exception_type: str = "RuntimeError",
                 node_id: str | None = None, node_type: str | None = None, messages: list | None = None) -> dict:
    """A failed-prompt entry whose messages carry an `execution_error` the ComfyUI frontend can show."""
    now = int(time.time() * 1000)
    error: dict[str, Any] = {
        "prompt_id": item.prompt_id, "node_id": node_id, "node_type": node_type, "executed": [],
        "exception_message": reason, "exception_type": exception_type, "traceback": [],
        "current_inputs": {}, "current_outputs": [], "timestamp": now,
    }
    msgs = list(messages or []) + [["execution_error", error]]
    return history_entry(item, status_str="error", completed=False, messages=msgs)

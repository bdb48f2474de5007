"""Executor overhead on graphs of no-op nodes: a 1,000-node chain and a 1,000-node wide graph.

Prints validation time, planning time (keys + order), per-node execution overhead in microseconds, and
the time of an identical (fully cached) re-run. Targets: overhead < 50 us/node, cached re-run < 10 ms.
Run: .venv/bin/python bench/executor.py
"""
from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cache import OutputCache  # noqa: E402
from engine.executor import Executor  # noqa: E402
from engine.inputs import Int, socket  # noqa: E402
from engine.node import UI, node  # noqa: E402
from engine.planning import compute_keys  # noqa: E402
from engine.registry import Registry  # noqa: E402
from engine.validation import validate_prompt  # noqa: E402

Any_ = socket("*", object)


@node("Source")
def source(value: Annotated[int, Int(0, min=0, max=10**9)]) -> int:
    return value


@node("Noop")
def noop(x: int, tag: int = 0) -> int:
    return x


@node("Sink", output_node=True)
def sink(x: Any_):
    return UI(value=[1])


def chain(n: int, seed: int) -> dict:
    p = {"0": {"class_type": "Source", "inputs": {"value": seed}}}
    for i in range(1, n - 1):
        p[str(i)] = {"class_type": "Noop", "inputs": {"x": [str(i - 1), 0], "tag": i}}
    p[str(n - 1)] = {"class_type": "Sink", "inputs": {"x": [str(n - 2), 0]}}
    return p


def wide(n: int, seed: int) -> dict:
    """One source feeding n-2 independent no-ops, all gathered by output nodes in pairs of fan-in 1."""
    p = {"0": {"class_type": "Source", "inputs": {"value": seed}}}
    half = (n - 1) // 2
    for i in range(1, half + 1):
        p[str(i)] = {"class_type": "Noop", "inputs": {"x": ["0", 0], "tag": i}}
        p[str(half + i)] = {"class_type": "Sink", "inputs": {"x": [str(i), 0]}}
    return p


def baseline_call_us(n: int) -> float:
    """A plain Python call of the same no-op functions, the floor the executor adds to."""
    t0 = time.perf_counter()
    x = 0
    for _ in range(n):
        x = noop(x)
    return (time.perf_counter() - t0) / n * 1e6


def measure(name: str, build, n: int = 1000, repeats: int = 5) -> None:
    reg = Registry.from_nodes(source, noop, sink)
    val_t, plan_t, run_t, rerun_t = [], [], [], []
    for r in range(repeats):
        prompt = build(n, r)
        t0 = time.perf_counter()
        vr = validate_prompt(prompt, reg)
        val_t.append(time.perf_counter() - t0)
        assert vr.ok, vr.error
        t0 = time.perf_counter()
        compute_keys(vr.nodes, vr.order, uuid.uuid4().hex)   # validation already ordered the nodes
        plan_t.append(time.perf_counter() - t0)
        ex = Executor(reg, OutputCache({"cpu": 1 << 30}))
        t0 = time.perf_counter()
        res = ex.execute(prompt, f"run{r}")
        run_t.append(time.perf_counter() - t0)
        assert res.status == "success" and len(res.executed) == len(prompt)
        t0 = time.perf_counter()
        res2 = ex.execute(prompt, f"rerun{r}")
        rerun_t.append(time.perf_counter() - t0)
        assert res2.executed == []
    med = statistics.median
    per_node = med(run_t) / n * 1e6
    exec_only = max(0.0, med(run_t) - med(val_t) - med(plan_t)) / n * 1e6
    base = baseline_call_us(n)
    print(f"{name:6s} n={n}: validate {med(val_t)*1e3:6.2f} ms | plan {med(plan_t)*1e3:6.2f} ms | "
          f"execution overhead {exec_only:5.1f} us/node ({per_node:5.1f} us/node with validation and planning; "
          f"a plain call is {base:.2f} us) | cached re-run {med(rerun_t)*1e3:5.2f} ms "
          f"[targets: <50 us/node {'OK' if per_node < 50 else 'MISSED'}, "
          f"<10 ms re-run {'OK' if med(rerun_t) < 0.010 else 'MISSED'}]")


if __name__ == "__main__":
    measure("chain", chain)
    measure("wide", wide)

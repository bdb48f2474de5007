"""Scale-out on Ray: throughput of 1 and 2 local CPU workers, and the per-prompt dispatch overhead.

1. Throughput: 20 small txt2img prompts (tiny random-weight SD 1.x checkpoints, 64x64) alternating between
   two checkpoints, queued at once, on the Ray backend with 1 and then 2 CPU workers; each run starts
   after a warm-up that loads the checkpoints, as a long-running server would be. Prints prompts/s and
   the 2-worker/1-worker ratio (target >= 1.8x on a machine with the cores: each worker needs its own).
   The same prompts are also run on 1 and 2 plain processes (one Executor each, one thread each, as a Ray
   CPU worker gets, each process given one checkpoint as affinity routing does), without Ray or the
   queue: that ratio is what this machine allows two workers, so the Ray ratio is printed against it too.
   Both with no websocket client (headless API use: workers stream no per-step events) and with one
   watching client (every progress and executing event streams back; no step previews). Each timing is
   the best of --rounds runs (3): on a 2-core machine whatever else runs only ever adds time, and a single
   run of ~2 s moved the ratio by +-0.1 between runs.
2. Dispatch overhead: a trivial prompt (constant -> add -> show), run one at a time, through the embedded
   worker thread and through the Ray backend; the difference per prompt is what Ray dispatch costs
   (claim, key computation, actor call, event stream, files).

The queue is driven through the store, as the HTTP routes do, without the HTTP layer.
Run: PYTHONPATH=. .venv/bin/python bench/scale.py [--prompts 20] [--steps 20] [--rounds 3] [--trivial 30]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from engine.config import RuntimeConfig  # noqa: E402
from engine.executor import Executor  # noqa: E402
from engine.registry import Registry  # noqa: E402
from engine.store import Store  # noqa: E402
from server.ws import Hub  # noqa: E402

MB = 1024 * 1024
CKPTS = ("bench-a.safetensors", "bench-b.safetensors")


def txt2img(ckpt: str, seed: int, steps: int) -> dict:
    prompt = json.loads((ROOT / "workflows" / "txt2img_api.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = ckpt
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"].update(seed=seed, steps=steps)
    return prompt


def trivial(value: int) -> dict:
    return {"1": {"class_type": "TestConst", "inputs": {"value": value}},
            "2": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": 10}},
            "3": {"class_type": "TestShow", "inputs": {"value": ["2", 0]}}}


def hub(watched: bool = False) -> Hub:
    """No event loop: events reaching the hub are dropped. `watched`: one websocket client is connected
    (it takes no step previews), so workers stream every progress and executing event, as for the editor."""
    h = Hub({}, status=lambda: {}, previews_for_all=False)
    if watched:
        h.clients["bench-watcher"] = SimpleNamespace(wants_metadata=False)  # type: ignore[assignment]
    return h


def run_all(store: SignalledStore, worker, prompts: list[dict]) -> float:
    """Queue `prompts` at once; seconds until the last is in history (all must succeed)."""
    ids = []
    start = time.perf_counter()
    for prompt in prompts:
        pid = str(uuid.uuid4())
        store.enqueue(store.next_number(), pid, prompt, {}, _outputs(prompt))
        ids.append(pid)
    worker.notify()
    wait_done(store, ids)
    return time.perf_counter() - start


def run_each(store: SignalledStore, worker, prompts: list[dict]) -> list[float]:
    times = []
    for prompt in prompts:
        pid = str(uuid.uuid4())
        start = time.perf_counter()
        store.enqueue(store.next_number(), pid, prompt, {}, _outputs(prompt))
        worker.notify()
        wait_done(store, [pid])
        times.append(time.perf_counter() - start)
    return times


def _outputs(prompt: dict) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] in ("SaveImage", "TestShow")]


class SignalledStore(Store):
    """The store, telling waiters when a prompt reaches history: the bench waits on that state instead of
    polling SQLite, which would take CPU from the workers it measures (the head shares their cores)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.finished: set[str] = set()
        self.done = threading.Condition()

    def finish(self, prompt_id: str, entry: dict) -> None:
        super().finish(prompt_id, entry)
        with self.done:
            self.finished.add(prompt_id)
            self.done.notify_all()


def wait_done(store: SignalledStore, ids: list[str], timeout: float = 1800.0) -> None:
    with store.done:
        if not store.done.wait_for(lambda: store.finished.issuperset(ids), timeout=timeout):
            raise SystemExit(f"{len(set(ids) - store.finished)} prompt(s) did not finish")
    for pid in ids:
        entry = store.history_item(pid)
        if entry is None or entry["status"]["status_str"] != "success":
            raise SystemExit(f"prompt failed: {entry and entry['status']['messages'][-1]}")


def _plain_worker(data_dir: str, prompts: list[dict], go, results) -> None:
    """One plain process: its own Executor, one thread, warmed on its checkpoints, timed from `go`."""
    import torch

    import nodes
    torch.set_num_threads(1)
    config = RuntimeConfig(data_dir=Path(data_dir))
    registry, _ = nodes.build_registry(config, plugins=False)
    executor = Executor(registry, config=config)
    for ckpt in sorted({p["4"]["inputs"]["ckpt_name"] for p in prompts}):
        executor.execute(txt2img(ckpt, 20_000, 1), str(uuid.uuid4()))
    results.put("ready")
    go.wait()
    start = time.perf_counter()
    for prompt in prompts:
        executor.execute(prompt, str(uuid.uuid4()))
    results.put(time.perf_counter() - start)


def plain_processes(data_dir: Path, shares: list[list[dict]]) -> float:
    """Seconds for len(shares) plain processes to run their shares at once (the slowest one's time)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_plain_worker, args=(str(data_dir), share, go, results)) for share in shares]
    for proc in procs:
        proc.start()
    for _ in procs:
        if results.get(timeout=1800) != "ready":
            raise SystemExit("a plain worker failed to warm up")
    go.set()
    took = max(float(results.get(timeout=1800)) for _ in procs)
    for proc in procs:
        proc.join()
    return took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trivial", type=int, default=30)
    args = ap.parse_args()

    import ray

    import nodes
    from nodes.models.tiny import write_tiny_checkpoint
    from server.ray_backend import RayBackend, RayCluster, WorkerSpec, start_local_ray
    from server.worker import Worker
    from tests.server import plugin_nodes

    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    tmp = Path(tempfile.mkdtemp(prefix="sdflow-scale-", dir="/tmp"))
    try:
        config = RuntimeConfig(data_dir=tmp / "data")
        config.ensure_dirs()
        for seed, name in enumerate(CKPTS):
            write_tiny_checkpoint(config.models_dir / "checkpoints" / name, "sd1", seed=seed)
        registry, _ = nodes.build_registry(config, plugins=False)
        # the machine's own ceiling: the same prompts on 1 and 2 plain processes, no Ray, no queue
        batch = [txt2img(CKPTS[i % 2], i, args.steps) for i in range(args.prompts)]
        shares = [[p for p in batch if p["4"]["inputs"]["ckpt_name"] == c] for c in CKPTS]
        one = min(plain_processes(config.data_dir, [batch]) for _ in range(args.rounds))
        two = min(plain_processes(config.data_dir, shares) for _ in range(args.rounds))
        ceiling = one / two
        print(f"machine: {cores} cores ({usable} usable); plain processes (no Ray): 1 in {one:.2f}s, 2 in "
              f"{two:.2f}s = {ceiling:.2f}x, what this machine allows two workers")
        start_local_ray(num_cpus=max(2, usable), temp_dir=str(tmp / "ray"), object_store_memory=200 * MB,
                        data_dir=tmp)
        spec = WorkerSpec.from_config(config, builtin_nodes=True)

        print(f"Ray {ray.__version__}")
        rates: dict[tuple[bool, int], float] = {}
        for watched in (False, True):
            who = "a watching client" if watched else "no client watching (headless API use)"
            for workers in (1, 2):
                store = SignalledStore(tmp / f"scale-{workers}-{watched}.db")
                cluster = RayCluster(spec, workers=workers)
                backend = RayBackend(store, None, hub(watched), cluster=cluster, config=config, registry=registry)
                backend.start()
                # warm-up: every worker loads both checkpoints once (a long-running server has them loaded)
                run_all(store, backend, [txt2img(c, 10_000 + i, 1) for i in range(workers) for c in CKPTS])
                took = min(run_all(store, backend, [txt2img(CKPTS[i % 2], r * args.prompts + i, args.steps)
                                                    for i in range(args.prompts)]) for r in range(args.rounds))
                rates[watched, workers] = args.prompts / took
                print(f"{who}, {workers} worker(s): {args.prompts} prompts in {took:.2f}s (best of {args.rounds}) = "
                      f"{rates[watched, workers]:.2f} prompts/s")
                backend.stop()
                store.close()
            ray_ratio = rates[watched, 2] / rates[watched, 1]
            print(f"throughput ratio 2/1 workers, {who}: {ray_ratio:.2f}x (target >= 1.8x with >= 2 free cores; "
                  f"this machine has {usable} usable core(s)); {ray_ratio / ceiling:.0%} of the plain-process ceiling")

        # dispatch overhead: trivial prompts one at a time, embedded vs Ray (1 worker)
        test_registry = Registry.from_nodes(plugin_nodes)
        store = SignalledStore(tmp / "overhead-embedded.db")
        worker = Worker(store, Executor(test_registry, config=config), hub())
        worker.start()
        run_each(store, worker, [trivial(-1 - i) for i in range(3)])     # warm-up
        embedded = run_each(store, worker, [trivial(i) for i in range(args.trivial)])
        worker.stop()
        store.close()

        store = SignalledStore(tmp / "overhead-ray.db")
        spec_test = WorkerSpec.from_config(config, builtin_nodes=False, node_modules=["tests.server.plugin_nodes"])
        cluster = RayCluster(spec_test, workers=1)
        backend = RayBackend(store, None, hub(), cluster=cluster, config=config, registry=test_registry)
        backend.start()
        run_each(store, backend, [trivial(-1 - i) for i in range(3)])
        remote = run_each(store, backend, [trivial(i) for i in range(args.trivial)])
        backend.stop()
        store.close()
        e_ms, r_ms = statistics.median(embedded) * 1000, statistics.median(remote) * 1000
        print(f"trivial prompt, median of {args.trivial}: embedded {e_ms:.1f} ms, Ray {r_ms:.1f} ms; "
              f"dispatch overhead {r_ms - e_ms:.1f} ms per prompt")
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

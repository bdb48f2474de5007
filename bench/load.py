"""Load test: N websocket clients, M queued prompts of tiny test nodes, against a real sdflow server.

    .venv/bin/python bench/load.py --clients 20 --prompts 500
    .venv/bin/python bench/load.py --url http://127.0.0.1:8188 ...   # an already running server that has
                                                                     # the tests.server.plugin_nodes nodes

Without --url it starts `sdflow serve --no-builtin-nodes --nodes-module tests.server.plugin_nodes` on a free
port with a temporary data dir. It prints submit and end-to-end latency percentiles and throughput, and
checks that nothing is lost: every prompt completes exactly once on its owner's socket, no socket sees
another client's per-node events, every prompt is in /history with the right output, and the queue ends
empty. Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
PER_NODE = {"execution_start", "execution_cached", "executing", "executed", "execution_success", "execution_error"}


def prompt_for(i: int, steps: int) -> dict:
    p: dict = {"1": {"class_type": "TestConst", "inputs": {"value": i}}}
    src = ["1", 0]
    if steps:
        p["2"] = {"class_type": "TestSlow", "inputs": {"value": src, "steps": steps, "delay": 0.0}}
        src = ["2", 0]
    p["3"] = {"class_type": "TestAdd", "inputs": {"a": src, "b": 1}}
    p["4"] = {"class_type": "TestShow", "inputs": {"value": ["3", 0]}}
    return p


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, SDFLOW_TEST_INPUT_DIR=str(data_dir / "input"),
               SDFLOW_TEST_OUTPUT_DIR=str(data_dir / "output"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port), "--data-dir",
                             str(data_dir), "--no-builtin-nodes", "--nodes-module", "tests.server.plugin_nodes"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


async def wait_up(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen | None) -> None:
    for _ in range(300):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            async with session.get(url + "/prompt") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("server did not come up")


class Client:
    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.done: Counter[str] = Counter()
        self.done_at: dict[str, float] = {}
        self.foreign: list[str] = []
        self.mine: set[str] = set()
        self.frames = 0
        self.binary = 0

    async def listen(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            self.frames += 1
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.binary += 1
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            m = json.loads(msg.data)
            pid = m["data"].get("prompt_id") if isinstance(m.get("data"), dict) else None
            if m["type"] in PER_NODE and pid is not None and pid not in self.mine:
                self.foreign.append(pid)
            if m["type"] == "executing" and m["data"].get("node") is None and pid:
                self.done[pid] += 1
                self.done_at.setdefault(pid, time.perf_counter())


async def run(args: argparse.Namespace) -> int:
    proc = None
    tmp = None
    url = args.url
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="sdflow-load-")
        proc, url = start_server(Path(tmp.name) / "data")
    failures: list[str] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            await wait_up(session, url, proc)
            clients = [Client(f"load-{k}") for k in range(args.clients)]
            sockets = []
            for c in clients:
                ws = await session.ws_connect(f"{url}/ws?clientId={c.cid}", max_msg_size=0)
                sockets.append(ws)
            listeners = [asyncio.create_task(c.listen(ws)) for c, ws in zip(clients, sockets)]
            # distinct values so nothing is served from the cache
            base = int(time.time()) % 100000 * 1000
            owner: dict[str, Client] = {}
            expected: dict[str, str] = {}
            submitted_at: dict[str, float] = {}
            submit_lat: list[float] = []
            sem = asyncio.Semaphore(args.concurrency)

            async def submit(i: int) -> None:
                c = clients[i % len(clients)]
                value = base + i
                # a client-chosen prompt_id: the owner must know it before its first event can arrive
                pid = f"load-{uuid.uuid4()}"
                c.mine.add(pid)
                async with sem:
                    t0 = time.perf_counter()
                    async with session.post(url + "/prompt", json={"prompt": prompt_for(value, args.steps),
                                                                   "client_id": c.cid, "prompt_id": pid}) as r:
                        body = await r.json()
                    t1 = time.perf_counter()
                if r.status != 200 or body.get("prompt_id") != pid:
                    failures.append(f"submit {i}: HTTP {r.status} {body}")
                    return
                owner[pid] = c
                expected[pid] = str(value + 1)
                submitted_at[pid] = t0
                submit_lat.append(t1 - t0)

            start = time.perf_counter()
            await asyncio.gather(*(submit(i) for i in range(args.prompts)))
            submit_end = time.perf_counter()
            deadline = time.perf_counter() + args.timeout
            while time.perf_counter() < deadline:
                if all(owner[p].done[p] >= 1 for p in owner):
                    break
                await asyncio.sleep(0.02)
            end = max((c.done_at[p] for p in owner for c in [owner[p]] if p in c.done_at), default=time.perf_counter())
            await asyncio.sleep(0.3)   # let late duplicates (if any) arrive before checking
            for ws in sockets:
                await ws.close()
            await asyncio.gather(*listeners, return_exceptions=True)

            latencies = [owner[p].done_at[p] - submitted_at[p] for p in owner if p in owner[p].done_at]
            missing = [p for p in owner if owner[p].done[p] == 0]
            dupes = [p for p in owner if owner[p].done[p] > 1]
            foreign = [(c.cid, p) for c in clients for p in c.foreign]
            async with session.get(url + "/history") as r:
                hist = await r.json()
            async with session.get(url + "/queue") as r:
                queue = await r.json()
            not_in_history = [p for p in owner if p not in hist]
            wrong = [p for p in owner if p in hist and (hist[p]["status"]["status_str"] != "success"
                                                        or hist[p]["outputs"].get("4") != {"text": [expected[p]]})]
            if missing:
                failures.append(f"{len(missing)} prompt(s) never completed on their owner's socket")
            if dupes:
                failures.append(f"{len(dupes)} prompt(s) completed more than once")
            if foreign:
                failures.append(f"{len(foreign)} per-node event(s) reached a socket that does not own the prompt")
            if not_in_history:
                failures.append(f"{len(not_in_history)} prompt(s) missing from /history")
            if wrong:
                failures.append(f"{len(wrong)} prompt(s) with a wrong status or output")
            if queue["queue_pending"] or queue["queue_running"]:
                failures.append("the queue is not empty at the end")

            total = end - start
            n = len(latencies)
            print(f"server: {url}   clients: {args.clients}   prompts: {args.prompts}   steps/prompt: {args.steps}")
            print(f"submitted {len(owner)} in {submit_end - start:.2f}s "
                  f"({len(owner) / max(submit_end - start, 1e-9):.0f}/s); "
                  f"submit latency ms p50 {pct(submit_lat, 50) * 1e3:.1f} p90 {pct(submit_lat, 90) * 1e3:.1f} "
                  f"p99 {pct(submit_lat, 99) * 1e3:.1f} max {max(submit_lat, default=0) * 1e3:.1f}")
            print(f"completed {n} in {total:.2f}s: throughput {n / max(total, 1e-9):.1f} prompts/s")
            print(f"end-to-end latency s  p50 {pct(latencies, 50):.3f} p90 {pct(latencies, 90):.3f} "
                  f"p99 {pct(latencies, 99):.3f} max {max(latencies, default=0):.3f}")
            frames = sum(c.frames for c in clients)
            print(f"websocket frames received: {frames} ({sum(c.binary for c in clients)} binary previews)")
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if tmp is not None:
                tmp.cleanup()
    if failures:
        print("LOST / WRONG:\n  " + "\n  ".join(failures))
        return 1
    print("OK: nothing lost")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10, help="websocket clients (N)")
    p.add_argument("--prompts", type=int, default=200, help="queued prompts (M)")
    p.add_argument("--steps", type=int, default=2, help="progress steps (and previews) per prompt")
    p.add_argument("--concurrency", type=int, default=16, help="parallel POST /prompt requests")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for all completions")
    p.add_argument("--url", help="use a running server instead of starting one")
    args = p.parse_args()
    if args.clients < 1 or args.prompts < 1:
        p.error("--clients and --prompts must be >= 1")
    sys.path.insert(0, str(ROOT))
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())

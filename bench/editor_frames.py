"""Frame times of the editor with a large graph.

Starts `sdflow serve` on a free 127.0.0.1 port, opens the editor in headless Chromium (Debian's
/usr/bin/chromium), builds a graph of N nodes (default 500) from the server's node types with links
between them, pans across it for a number of frames at three zoom levels (the last shows the whole
graph), and prints frame-time statistics:

- draw: the time litegraph takes to render one frame (performance.now around canvas.draw)
- frame: the interval between animation frames while panning (what a user sees as smoothness)

Exits non-zero if the page logged any console error or uncaught exception.

    python bench/editor_frames.py [--nodes 500] [--frames 240]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
CHROMIUM = "/usr/bin/chromium"

BUILD_GRAPH = """
(n) => {
  const G = sdflow.graph, L = sdflow.LiteGraph;
  G.clear();
  // Node types with at least one input or output socket, from the server's schema.
  const types = Object.keys(sdflow.app.objectInfo).filter(t => L.registered_node_types[t]);
  const cols = Math.ceil(Math.sqrt(n));
  const nodes = [];
  for (let i = 0; i < n; i++) {
    const node = L.createNode(types[i % types.length]);
    node.pos = [(i % cols) * 420, Math.floor(i / cols) * 360];
    G.add(node, true);
    nodes.push(node);
  }
  G.updateExecutionOrder();
  // Link each node's first input to the nearest earlier node that has a matching output.
  let links = 0;
  for (let i = 1; i < nodes.length; i++) {
    const dst = nodes[i];
    for (let s = 0; s < dst.inputs.length && s < 3; s++) {
      const t = dst.inputs[s].type;
      for (let j = i - 1; j >= Math.max(0, i - 40); j--) {
        const k = nodes[j].outputs.findIndex(o => o.type === t);
        if (k >= 0) { if (nodes[j].connect(k, dst, s)) links++; break; }
      }
    }
  }
  sdflow.canvas.setDirty(true, true);
  return {nodes: G.nodes.length, links};
}
"""

PAN = """
async ([frames, scale]) => {
  const c = sdflow.canvas;
  c.ds.scale = scale;
  c.ds.offset = [0, 0];
  const draws = [], intervals = [];
  let last = performance.now();
  await new Promise(resolve => {
    let f = 0;
    const step = (now) => {
      intervals.push(now - last);
      last = now;
      // Pan diagonally across the graph.
      c.ds.offset = [-f * 18, -f * 12];
      const t0 = performance.now();
      c.draw(true, true);
      draws.push(performance.now() - t0);
      if (++f < frames) requestAnimationFrame(step); else resolve();
    };
    requestAnimationFrame(step);
  });
  return {draws, intervals: intervals.slice(1), visible: c.visible_nodes.length};
}
"""


def stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"mean": sum(s) / len(s), "p50": pick(0.5), "p95": pick(0.95), "max": s[-1]}


def ensure_built() -> None:
    dist = WEB / "dist"
    if (dist / "index.html").exists() and (dist / "app.js").exists():
        return
    npm = shutil.which("npm") or sys.exit("npm is needed to build the editor")
    if not (WEB / "node_modules").exists():
        subprocess.run([npm, "ci"], cwd=WEB, check=True)
    subprocess.run([npm, "run", "build"], cwd=WEB, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--frames", type=int, default=240)
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit("Debian's chromium is needed: apt-get install -y chromium")
    ensure_built()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="sdflow-bench-"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port), "--data-dir",
                             str(tmp / "data"), "--models-dir", str(tmp / "models")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    errors: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "api/object_info", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    sys.exit(f"server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 950})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.goto(url)
            page.wait_for_function("window.sdflow && document.body.classList.contains('ready')", timeout=60000)
            t0 = time.perf_counter()
            built = page.evaluate(BUILD_GRAPH, args.nodes)
            build_ms = (time.perf_counter() - t0) * 1000
            # Round-trip through the workflow format, as loading a saved 500-node file does.
            t0 = time.perf_counter()
            page.evaluate("() => { const wf = sdflow.serialize(); sdflow.load(wf, 'bench'); }")
            load_ms = (time.perf_counter() - t0) * 1000
            print(f"graph: {built['nodes']} nodes, {built['links']} links; built in {build_ms:.0f} ms, "
                  f"serialize+load {load_ms:.0f} ms")
            for scale in (1.0, 0.35, 0.12):   # 0.12: the whole 500-node graph on screen
                r = page.evaluate(PAN, [args.frames, scale])
                d, f = stats(r["draws"]), stats(r["intervals"])
                print(f"zoom {scale:>4}: ~{r['visible']:>3} nodes visible | draw mean {d['mean']:.2f} ms "
                      f"p95 {d['p95']:.2f} ms max {d['max']:.2f} ms | frame mean {f['mean']:.2f} ms "
                      f"p95 {f['p95']:.2f} ms = {1000 / f['mean']:.0f} fps")
            page.screenshot(path=str(tmp / "bench.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
    if errors:
        print("console errors:\n" + "\n".join(errors[:20]), file=sys.stderr)
        return 1
    print(json.dumps({"console_errors": 0}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Dashboard costs: how long a round takes to reach the page, and what browsers cost the node.

One real node (digits, 1 local epoch, alone) in a temporary directory, and headless
Chromium (/usr/bin/chromium) driven by Playwright:

- event-to-page delay: the page is instrumented (an init script) to note the wall-clock
  time, performance.timeOrigin + performance.now(), at which each WebSocket message
  arrives and at which #round's data-round changes. For each round the delay runs from
  the ``ts`` of the node's ``round_completed`` event (Unix time, the same clock) to the DOM
  update, split into node -> message arrival and arrival -> DOM, plus DOM -> next frame.
- CPU cost: the node process's CPU seconds (psutil) over a window with no browser and
  over one with N pages (one Chromium) open on the dashboard, both while the node trains
  and both while it is stopped (POST /api/stop). The node's CPU % (of one core) and the
  difference per page; Chromium's own CPU for scale. The node runs with --rounds 100000 so
  it trains through every window.

Run: .venv/bin/python scripts/bench_dashboard.py [--window 30] [--pages 5] [--events 60]
(part of scripts/bench). Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.cluster import Cluster, NodeProc  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu"]
NODE_ARGS = ("--dataset", "digits", "--rounds", "100000", "--local-epochs", "1",
             "--min-peers", "0")

#: Runs in the page before its own scripts: notes message arrivals and #round changes.
INSTRUMENT = """
(() => {
  const now = () => performance.timeOrigin + performance.now();
  const bench = { msgs: [], dom: [], counts: {} };
  window.__bench = bench;
  const Original = window.WebSocket;
  window.WebSocket = class extends Original {
    constructor(...args) {
      super(...args);
      // Added before the page's own listener, so it runs first.
      this.addEventListener("message", (event) => {
        const t = now();
        let msg;
        try { msg = JSON.parse(event.data); } catch { return; }
        bench.counts[msg.type] = (bench.counts[msg.type] || 0) + 1;
        if (msg.type === "round_completed") {
          bench.msgs.push({ round: msg.data.round, ts: msg.ts, t });
        }
      });
    }
  };
  document.addEventListener("DOMContentLoaded", () => {
    const el = document.getElementById("round");
    let shown = Number(el.dataset.round);
    new MutationObserver(() => {
      const round = Number(el.dataset.round);
      if (round === shown) return;  // re-set to the same value by a status update
      shown = round;
      const rec = { round, t: now(), frame: null };
      bench.dom.push(rec);
      requestAnimationFrame(() => { rec.frame = now(); });
    }).observe(el, { attributes: true, attributeFilter: ["data-round"] });
  });
})();
"""


def post(node: NodeProc, path: str, token: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{node.web_port}{path}", data=b"",
                                 method="POST", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def wait_for(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def summary(values: list[float]) -> str:
    return (f"median {statistics.median(values):7.2f} ms, p95 {percentile(values, 95):7.2f} ms,"
            f" max {max(values):7.2f} ms")


def chromium_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "chrom" in (p.name() or "").lower()]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure_window(node: NodeProc, seconds: float) -> dict[str, float]:
    """The node's CPU % of one core, Chromium's, and the rounds per second over a window."""
    proc = psutil.Process(node.proc.pid)
    browsers = chromium_processes()
    round0, cpu0, chrome0 = node.status()["round"], proc.cpu_times(), cpu_seconds(browsers)
    t0 = time.monotonic()
    time.sleep(seconds)
    cpu1, chrome1 = proc.cpu_times(), cpu_seconds(browsers)
    wall = time.monotonic() - t0
    round1 = node.status()["round"]
    used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {"node": 100 * used / wall, "chromium": 100 * (chrome1 - chrome0) / wall,
            "rounds_per_s": (round1 - round0) / wall}


def event_delays(browser, node: NodeProc, url: str, events: int) -> None:  # noqa: ANN001
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script(INSTRUMENT)
    page.goto(url)
    page.wait_for_function("() => document.getElementById('conn').dataset.state === 'live'")
    clock_skew = page.evaluate("() => performance.timeOrigin + performance.now() - Date.now()")
    first = page.evaluate("() => window.__bench.msgs.length")
    page.wait_for_function("n => window.__bench.msgs.length >= n", arg=first + events + 1,
                           timeout=max(120_000, events * 5_000))
    time.sleep(0.5)  # let the last DOM update and frame land
    data = page.evaluate("() => window.__bench")
    page.close()

    msgs = [m for m in data["msgs"][first:] if isinstance(m.get("round"), int)]
    dom = data["dom"]
    to_arrival, to_dom, total, to_frame = [], [], [], []
    for m in msgs:
        shown = next((d for d in dom if d["round"] >= m["round"]), None)
        if shown is None:
            continue
        node_ms = m["ts"] * 1000
        to_arrival.append(m["t"] - node_ms)
        to_dom.append(shown["t"] - m["t"])
        total.append(shown["t"] - node_ms)
        if shown.get("frame"):
            to_frame.append(shown["frame"] - shown["t"])
    print(f"event-to-page delay, {len(total)} rounds (round_completed ts on the node ->"
          " #round updated in the page), 1 page, node training:")
    print(f"  total                 {summary(total)}")
    print(f"  node -> message       {summary(to_arrival)}")
    print(f"  message -> DOM        {summary(to_dom)}")
    if to_frame:
        print(f"  DOM -> next frame     {summary(to_frame)}")
    print(f"  (page clock vs Date.now(): {clock_skew:+.2f} ms; messages seen: {data['counts']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds per CPU window")
    parser.add_argument("--pages", type=int, default=5, help="browser pages for the CPU test")
    parser.add_argument("--events", type=int, default=60, help="rounds for the delay test")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"bench_dashboard: {CHROMIUM} is missing (scripts/system-deps installs it)")
        return 0
    from playwright.sync_api import sync_playwright

    print("load average at the start: {:.2f} {:.2f} {:.2f} ({} CPUs)".format(
        *os.getloadavg(), os.cpu_count()))
    with tempfile.TemporaryDirectory(prefix="fl-bench-dashboard-") as d, \
            Cluster(Path(d)) as cluster:
        node = cluster.start("bench", *NODE_ARGS)
        token = (node.state_dir / "api.token").read_text().strip()
        url = f"http://127.0.0.1:{node.web_port}/#token={token}"
        wait_for(lambda: node.status()["round"] >= 3, 120, "the node to train")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                event_delays(browser, node, url, args.events)
                print()
                cpu_costs(browser, node, url, token, args.window, args.pages)
            finally:
                browser.close()
    print("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


def cpu_costs(browser, node: NodeProc, url: str, token: str, window: float,  # noqa: ANN001
              n_pages: int) -> None:
    results: dict[tuple[str, int], dict[str, float]] = {}
    results[("training", 0)] = measure_window(node, window)
    pages = []
    for _ in range(n_pages):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        pages.append(page)
    for page in pages:
        page.wait_for_function("() => document.getElementById('conn').dataset.state === 'live'")
    time.sleep(3)  # past the connect burst (history and config loads): steady state only
    results[("training", n_pages)] = measure_window(node, window)
    post(node, "/api/stop", token)
    wait_for(lambda: node.status()["state"] == "stopped", 60, "the node to stop")
    time.sleep(3)
    results[("stopped", n_pages)] = measure_window(node, window)
    for page in pages:
        page.close()
    time.sleep(3)
    results[("stopped", 0)] = measure_window(node, window)

    print(f"node CPU (% of one core) over {window:.0f} s windows, one Chromium,"
          f" {n_pages} pages on the dashboard:")
    for state in ("training", "stopped"):
        idle, busy = results[(state, 0)], results[(state, n_pages)]
        per_page = (busy["node"] - idle["node"]) / n_pages
        rates = ""
        if state == "training" and idle["rounds_per_s"] and busy["rounds_per_s"]:
            rates = (f"; {idle['rounds_per_s']:.1f} -> {busy['rounds_per_s']:.1f} rounds/s,"
                     f" {10 * idle['node'] / idle['rounds_per_s']:.0f} ->"
                     f" {10 * busy['node'] / busy['rounds_per_s']:.0f} CPU ms per round")
        print(f"  {state:8s}: no browser {idle['node']:6.1f} %, {n_pages} pages"
              f" {busy['node']:6.1f} %, difference {per_page:+.2f} % per page{rates}"
              f" (Chromium itself: {busy['chromium']:.1f} %)")
    print("  (2-core machine: while training, Chromium competes with the node for the CPU,"
          " so the stopped figures isolate the serving cost)")


if __name__ == "__main__":
    sys.exit(main())

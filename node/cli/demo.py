"""``fl-node demo``: several real node processes on 127.0.0.1, watched until they finish."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from node.common.endpoint import read_endpoint

DEMO_DEFAULTS: dict[str, Any] = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "rounds": 5}


def wait_endpoint(state_dir: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0
                  ) -> dict[str, Any]:
    """Wait until a started node has written its endpoint file; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node in {state_dir} exited with {proc.returncode}")
        with contextlib.suppress(OSError, ValueError):
            data = read_endpoint(state_dir)
            if data.get("pid") == proc.pid:
                return data
        time.sleep(0.1)
    raise TimeoutError(f"node in {state_dir} did not start within {timeout:.0f} s")


def get_json(port: int, path: str, timeout: float = 2.0) -> Any:
    """GET a JSON document from a node's web port on 127.0.0.1."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return json.load(resp)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM every process, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait()


def node_command(i: int, n: int, state_dir: Path, peers: list[str], opts: dict[str, Any]
                 ) -> list[str]:
    """The `fl-node start` command line of demo node ``i`` of ``n``."""
    cmd = [sys.executable, "-m", "node.cli.main", "start", "--name", f"node-{i + 1}",
           "--state-dir", str(state_dir), "--host", "127.0.0.1", "--port", "0",
           "--web-port", "0", "--num-partitions", str(n), "--partition-index", str(i),
           "--wait-peers", str(n - 1), "--log-file", str(state_dir / "node.log"),
           "--no-mdns"]
    for peer in peers:
        cmd += ["--peer", peer]
    for key, value in opts.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def run_demo(args: argparse.Namespace) -> int:
    """Start ``args.nodes`` nodes, print progress, then a per-round table."""
    n = args.nodes
    if n < 1:
        print("fl-node demo: --nodes must be >= 1", file=sys.stderr)
        return 2
    opts = _demo_options(args)
    base = Path(args.base_dir) if args.base_dir else Path(tempfile.mkdtemp(prefix="fl-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    print(f"fl-node demo: {n} nodes on 127.0.0.1, {opts['dataset']}, {opts['partition']}"
          f" partitions, {opts['rounds']} rounds (state in {base})", flush=True)
    interrupted = False
    try:
        endpoints = _start_nodes(n, base, opts, procs)
        statuses = _follow(endpoints, procs, int(opts["rounds"]))
        if statuses is None:
            print("fl-node demo: a node exited early; see its node.log", file=sys.stderr)
            return 1
        return _report(endpoints, statuses)
    except KeyboardInterrupt:
        interrupted = True
        print("\nfl-node demo: interrupted, stopping nodes", file=sys.stderr)
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            stop_processes(procs)
        if not args.base_dir:
            shutil.rmtree(base, ignore_errors=True)
        if interrupted:
            print("fl-node demo: stopped", file=sys.stderr)


def _demo_options(args: argparse.Namespace) -> dict[str, Any]:
    """The nodes' options: the flags given, else the demo's defaults."""
    keys = ("dataset", "data_dir", "download", "model", "partition", "alpha", "seed", "rounds",
            "local_epochs", "batch_size", "lr", "round_timeout", "log_level")
    opts: dict[str, Any] = {k: getattr(args, k, None) for k in keys}
    for k, v in DEMO_DEFAULTS.items():
        if opts.get(k) is None:
            opts[k] = v
    opts["log_level"] = opts.get("log_level") or "WARNING"
    return opts


def _start_nodes(n: int, base: Path, opts: dict[str, Any],
                 procs: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    """Start the nodes one by one, each with the earlier ones as peers; their endpoints."""
    endpoints: list[dict[str, Any]] = []
    # The demo's nodes admit each other by a federation secret made for this run.
    env = dict(os.environ, PYTHONUNBUFFERED="1", FL_NODE_FEDERATION_SECRET=secrets.token_hex(16))
    for i in range(n):
        sd = base / f"node-{i + 1}"
        sd.mkdir(parents=True, exist_ok=True)
        peers = [f"127.0.0.1:{e['peer_port']}" for e in endpoints]
        proc = subprocess.Popen(node_command(i, n, sd, peers, opts), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        endpoints.append(wait_endpoint(sd, proc))
        print(f"  node-{i + 1} {endpoints[-1]['node_id']} peer port"
              f" {endpoints[-1]['peer_port']}, web http://127.0.0.1:"
              f"{endpoints[-1]['web_port']}/api/status", flush=True)
    return endpoints


def _follow(endpoints: list[dict[str, Any]], procs: list[subprocess.Popen[bytes]],
            rounds: int) -> list[dict[str, Any]] | None:
    """Print each round as it completes until every node evaluated the last one; the
    nodes' final statuses (None if a node exited early)."""
    seen = 0
    while True:
        statuses = []
        for e in endpoints:
            with contextlib.suppress(OSError, ValueError):
                statuses.append(get_json(e["web_port"], "/api/status"))
        if len(statuses) < len(endpoints) and any(p.poll() is not None for p in procs):
            return None
        done = min((s["round"] for s in statuses), default=0)
        if seen < done:
            with contextlib.suppress(OSError, ValueError):
                records = get_json(endpoints[0]["web_port"], "/api/metrics")["rounds"]
                for rec in records[seen:done]:
                    print(f"  round {rec['round']}/{rounds} done: accuracy"
                          f" {rec['accuracy']:.3f}, aggregator {rec['aggregator']}",
                          flush=True)
                seen = max(seen, min(done, len(records)))
        if len(statuses) == len(endpoints) and all(s["evaluated_round"] >= rounds
                                                   for s in statuses):
            return statuses
        time.sleep(0.25)


def _report(endpoints: list[dict[str, Any]], statuses: list[dict[str, Any]]) -> int:
    """Print the per-round table and whether every node holds one model (0 if so)."""
    history = get_json(endpoints[0]["web_port"], "/api/metrics")["rounds"]
    names = {e["node_id"]: f"node-{i + 1}" for i, e in enumerate(endpoints)}
    hashes = {s["model_hash"] for s in statuses}
    print()
    print(f"{'round':>5}  {'accuracy':>8}  {'loss':>7}  {'aggregator':<10}  {'time s':>6}")
    for r in history:
        print(f"{r['round']:>5}  {r['accuracy']:>8.4f}  {r['loss']:>7.4f}  "
              f"{names.get(r['aggregator'], r['aggregator'][:10]):<10}  "
              f"{r['round_seconds']:>6.2f}")
    print(f"\nall {len(endpoints)} nodes hold model {next(iter(hashes))[:16]}"
          if len(hashes) == 1 else f"\nnodes disagree on the model: {sorted(hashes)}")
    return 0 if len(hashes) == 1 else 1

"""fl-node benchmarks. Run with scripts/bench; prints the figures quoted in README.md.

1. Codec: encode+sign and verify+decode of a 10-million-parameter float32 update.
2. The 3-node demo on digits: round wall time split into training and protocol overhead,
   and bytes sent per round per node against the raw model size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.cli.demo import get_json, node_command, stop_processes, wait_endpoint  # noqa: E402
from node.common.weights import to_tensors  # noqa: E402
from protocol.envelope import decode, encode  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.messages import Update  # noqa: E402


def bench_codec(params: int, reps: int) -> None:
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal(params, dtype=np.float32)}
    update = Update(1, 0, bytes(32), 100, 0.5, 1.0, to_tensors(weights))
    ident = Identity.generate()
    raw = params * 4
    enc, dec = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        frame = encode(ident, update, seq=i + 1, ts_ms=time.time_ns() // 1_000_000,
                       federation="bench")
        t1 = time.perf_counter()
        env = decode(frame, max_size=raw + (1 << 20))
        t2 = time.perf_counter()
        assert env.message.weights[0].nbytes == raw
        enc.append(raw / (t1 - t0) / 1e9)
        dec.append(raw / (t2 - t1) / 1e9)
    print(f"codec, {params / 1e6:.0f}M float32 parameters ({raw / 1e6:.0f} MB), {reps} runs:")
    print(f"  encode+sign   best {max(enc):.2f} GB/s  median {statistics.median(enc):.2f} GB/s")
    print(f"  verify+decode best {max(dec):.2f} GB/s  median {statistics.median(dec):.2f} GB/s")
    print(f"  frame overhead {len(frame) - raw} bytes ({(len(frame) - raw) / raw:.6%})")


def bench_demo(nodes: int, rounds: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="fl-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    endpoints = []
    env = dict(os.environ, FL_NODE_FEDERATION_SECRET="benchmark federation secret")
    opts = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "rounds": rounds,
            "log_level": "WARNING"}
    try:
        for i in range(nodes):
            sd = base / f"node-{i + 1}"
            sd.mkdir()
            peers = [f"127.0.0.1:{e['peer_port']}" for e in endpoints]
            procs.append(subprocess.Popen(node_command(i, nodes, sd, peers, opts),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=env))
            endpoints.append(wait_endpoint(sd, procs[-1]))
        while True:
            statuses = [get_json(e["web_port"], "/api/status") for e in endpoints]
            if all(s["evaluated_round"] >= rounds for s in statuses):
                break
            time.sleep(0.2)
        histories = [get_json(e["web_port"], "/api/metrics")["rounds"] for e in endpoints]
    finally:
        stop_processes(procs)
        shutil.rmtree(base, ignore_errors=True)
    raw = statuses[0]["model_raw_bytes"]
    walls, trains, overheads = [], [], []
    for r in range(rounds):
        recs = [h[r] for h in histories]
        wall = max(x["committed_at"] for x in recs) - min(x["started_at"] for x in recs)
        train = max(x["train_seconds"] for x in recs)
        walls.append(wall)
        trains.append(train)
        overheads.append(wall - train)
    update_sizes = [x["update_bytes"] for h in histories for x in h if x["update_bytes"]]
    model_sizes = [x["model_bytes"] for h in histories for x in h if x["model_bytes"]]
    sent = [s["traffic"]["bytes_sent"] / rounds for s in statuses]
    print(f"\n{nodes}-node demo on digits, {rounds} rounds, final accuracy"
          f" {statuses[0]['accuracy']:.4f}:")
    print(f"  round wall time  mean {statistics.mean(walls):.3f} s (median"
          f" {statistics.median(walls):.3f} s)")
    print(f"  training (slowest member) mean {statistics.mean(trains):.3f} s")
    print(f"  protocol overhead mean {statistics.mean(overheads):.3f} s ="
          f" {statistics.mean(overheads) / statistics.mean(walls):.1%} of the round"
          f" (median {statistics.median([o / w for o, w in zip(overheads, walls, strict=True)]):.1%})")
    print(f"  raw model size {raw} bytes; update frame {max(update_sizes)} bytes"
          f" (+{max(update_sizes) / raw - 1:.2%}); model frame {max(model_sizes)} bytes"
          f" (+{max(model_sizes) / raw - 1:.2%})")
    print("  bytes sent per round per node (updates, models, heartbeats, handshakes): "
          + ", ".join(f"{b / raw:.2f}x raw" for b in sent)
          + f"; a member sends 1 update, the aggregator {nodes - 1} models")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    bench_codec(args.params, args.reps)
    if not args.skip_demo:
        bench_demo(args.nodes, args.rounds)


if __name__ == "__main__":
    main()

"""Failure costs: time from an aggregator's crash to its round's completion, and the cost
of a checkpoint per round against the round time.

Run: .venv/bin/python scripts/bench_failover.py [--runs N]   (part of scripts/bench)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.common.weights import to_tensors  # noqa: E402
from node.runtime.checkpoints import CheckpointStore  # noqa: E402
from protocol.election import elect  # noqa: E402
from protocol.envelope import encode  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.messages import Model  # noqa: E402
from protocol.tensors import weights_digest  # noqa: E402
from tests.e2e.cluster import Cluster  # noqa: E402

COMMON = ["--dataset", "digits", "--num-partitions", "3", "--wait-peers", "2",
          "--local-epochs", "6", "--rounds", "100"]


def one_failover(base: Path, victim_round: int = 3) -> tuple[float, float]:
    """(seconds from the kill to the round's completion on both survivors, a normal round's
    wall time for comparison)."""
    with Cluster(base) as cluster:
        a = cluster.start("alpha", *COMMON, "--partition-index", "0")
        b = cluster.start("bravo", *COMMON, "--partition-index", "1", peers=[a])
        c = cluster.start("charlie", *COMMON, "--partition-index", "2", peers=[a, b])
        nodes = [a, b, c]
        keys = {n.identity.public_key: n for n in nodes}
        victim = keys[elect("default", victim_round, keys)]
        cluster.wait(lambda: (s := victim.status())["current_round"] == victim_round
                     and s["state"] in ("training", "collecting"), 120, "the victim mid-round")
        victim.kill()
        t0 = time.monotonic()
        survivors = [n for n in nodes if n is not victim]
        cluster.wait(lambda: all(n.status()["round"] >= victim_round for n in survivors), 120,
                     "the round completed without it")
        failover = time.monotonic() - t0
        normal = statistics.median(r["round_seconds"] for r in survivors[0].metrics()[1:3])
    return failover, normal


def checkpoint_cost(params: int, reps: int = 5) -> float:
    """Median seconds to write one checkpoint of a ``params``-parameter float32 model."""
    ident = Identity.generate()
    tensors = to_tensors({"w": np.random.default_rng(0).standard_normal(params,
                                                                        dtype=np.float32)})
    digest = weights_digest(tensors)
    model = Model(1, 0, ident.public_key, (ident.public_key,), 10, digest, tensors)
    frame = bytes(encode(ident, model, seq=1, ts_ms=0, federation="bench"))
    times = []
    with tempfile.TemporaryDirectory() as d:
        store = CheckpointStore(d)
        for r in range(reps):
            t0 = time.perf_counter()
            store.save(r + 1, digest, frame)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="fl-bench-failover-") as d:
            results.append(one_failover(Path(d)))
    fail = [f for f, _ in results]
    normal = [n for _, n in results]
    print(f"aggregator killed mid-round (3 nodes, digits, 6 local epochs), {args.runs}"
          " runs:")
    print(f"  kill -> round completed by the survivors: median {statistics.median(fail):.2f} s"
          f" (min {min(fail):.2f}, max {max(fail):.2f}); a normal round takes"
          f" {statistics.median(normal):.2f} s")
    digits = checkpoint_cost(39_000)
    big = checkpoint_cost(10_000_000)
    print("checkpoint per round (atomic write + fsync, on the checkpointer thread):")
    print(f"  digits CNN (153 KB): {digits * 1000:.1f} ms = {digits / statistics.median(normal):.1%}"
          " of a round, off the critical path")
    print(f"  10M float32 parameters (40 MB): {big * 1000:.0f} ms")


if __name__ == "__main__":
    main()

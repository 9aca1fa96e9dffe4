"""Time from start to a full mesh for three namespace hosts (mDNS + federation secret).

Needs root and scripts/system-deps (it builds network namespaces like tests/system).
Run: scripts/bench --mesh, or .venv/bin/python scripts/bench_mesh.py [--runs N].
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.system.fleet import start_node, wait  # noqa: E402
from tests.system.netns import Hosts, require_root_and_tools  # noqa: E402


def one_run(base: Path) -> tuple[float, float]:
    """(seconds until every node has a trusted link to both others, seconds until the
    first status answer), both from the moment the processes were started."""
    with Hosts(("a", "b", "c")) as hosts:
        t0 = time.monotonic()
        nodes = [start_node(hosts, h, base, "--num-partitions", "3", "--partition-index",
                            str(i), "--wait-peers", "5", "--start-timeout", "600")
                 for i, h in enumerate("abc")]
        wait(lambda: all(n.status() for n in nodes), 120, "nodes up", nodes)
        t_up = time.monotonic() - t0

        def meshed() -> bool:
            for n in nodes:
                peers = n.status()["peers"]
                if sum(p["state"] == "connected" and p["trusted"] for p in peers) < 2:
                    return False
            return True

        wait(meshed, 120, "a full mesh", nodes)
        return time.monotonic() - t0, t_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    require_root_and_tools()
    mesh, up = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="fl-bench-mesh-") as d:
            m, u = one_run(Path(d))
            mesh.append(m)
            up.append(u)
    print(f"full mesh of 3 namespace hosts by mDNS + federation secret, {args.runs} runs:")
    print(f"  from process start: median {statistics.median(mesh):.2f} s"
          f" (min {min(mesh):.2f}, max {max(mesh):.2f})")
    print(f"  of which process start-up until the API answers (Python + torch import):"
          f" median {statistics.median(up):.2f} s")
    print(f"  discovery + handshakes after start-up: median"
          f" {statistics.median([m - u for m, u in zip(mesh, up, strict=True)]):.2f} s")


if __name__ == "__main__":
    main()

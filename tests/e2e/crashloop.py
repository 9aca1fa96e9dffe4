"""kill -9 a node at random moments, again and again, and check what it comes back with.

Used by tests/e2e/test_crash.py (50 cycles) and scripts/crash_loop (200 by default).
A long-running *witness* node trains with the victim: it would refuse the victim's
frames as replays if the victim's sequence numbers ever went backwards after a restart.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import Cluster

ARGS = ("--dataset", "synthetic", "--model", "linear", "--rounds", "1000000",
        "--local-epochs", "1", "--min-peers", "0", "--round-timeout", "10")


@dataclass
class CrashReport:
    """What the cycles showed."""

    cycles: int = 0
    #: (round seen before the kill, checkpointed round seen before the kill, resumed from)
    resumed: list[tuple[int, int]] = field(default_factory=list)
    durable: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    witness_rejections: dict[str, int] = field(default_factory=dict)


def crash_cycles(base: Path, cycles: int, seed: int = 0,
                 on_cycle: object = None) -> CrashReport:
    rng = random.Random(seed)
    report = CrashReport()
    with Cluster(base) as cluster:
        witness = cluster.start("witness", *ARGS)
        victim = None
        for cycle in range(cycles):
            victim = cluster.start("victim", *ARGS, peers=[witness])
            status = _wait_status(cluster, victim)
            if cycle > 0:
                _check(report, cycle, status["resumed_from"])
            time.sleep(rng.uniform(0.0, 1.2))
            try:
                before = victim.status()
            except OSError:
                before = status
            victim.kill()
            seen = before["round"]
            report.durable.append(before["checkpoint_round"])
            cluster.nodes.remove(victim)
            report.resumed.append((seen, -1))
            report.cycles += 1
            if on_cycle:
                on_cycle(cycle, seen)  # type: ignore[operator]
        # one last start: it must come back from a good checkpoint
        victim = cluster.start("victim", *ARGS, peers=[witness])
        status = _wait_status(cluster, victim)
        _check(report, cycles, status["resumed_from"])
        cluster.wait(lambda: victim.status()["round"] > status["resumed_from"], 60,
                     "the victim trains again")
        if "is unusable" in victim.log:
            report.problems.append("a checkpoint was unusable after a kill -9:\n" + victim.log)
        report.witness_rejections = witness.status()["traffic"]["rejected_reasons"]
    return report


def _check(report: CrashReport, cycle: int, got: int) -> None:
    """A restart must resume from at least the round the node reported as checkpointed."""
    seen, _ = report.resumed[-1]
    report.resumed[-1] = (seen, got)
    if got < report.durable[-1]:
        report.problems.append(f"cycle {cycle}: checkpointed round {report.durable[-1]} was"
                               f" reported before the kill, resumed from {got}")


def _wait_status(cluster: Cluster, node) -> dict:  # noqa: ANN001
    box: dict = {}

    def ready() -> bool:
        box["s"] = node.status()
        return True

    cluster.wait(ready, 60, "the victim answers")
    return box["s"]

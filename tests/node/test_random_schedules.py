"""Randomized schedules (crashes, restarts, hangs, partitions, delays) over 10-30 simulated
nodes with a majority quorum: the invariants of tests/node/schedules.py hold for every
seed; a failure names its seed."""

from __future__ import annotations

import pytest

from .schedules import check_invariants, run_schedule


def _run(seeds: range) -> int:
    """Check every seed; return how many schedules sent some node offline."""
    offline = 0
    for seed in seeds:
        sim = run_schedule(seed)
        check_invariants(sim, seed, sim.nodes[0].core.machine.rounds_total)
        offline += any(n.offline_steps for n in sim.nodes)
    return offline


def test_fifty_random_schedules_keep_the_invariants():
    # partitions cut a minority off often enough that offline averaging is exercised
    assert _run(range(50)) >= 5


@pytest.mark.slow
def test_five_hundred_random_schedules_keep_the_invariants():
    assert _run(range(50, 550)) >= 50

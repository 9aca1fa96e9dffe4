"""Randomized schedules (crashes, restarts, hangs, partitions, delays) over 10-30 simulated
nodes with a majority quorum: the invariants of tests/node/schedules.py hold for every
seed; a failure names its seed."""

from __future__ import annotations

import pytest

from .schedules import check_invariants, run_schedule, split_rounds

#: Schedules in which a cut-off aggregator's model reached a minority (the documented
#: limit of quorum without consensus) may be at most this share of all.
MAX_MINORITY_SPLITS = 0.01


def _run(seeds: range) -> tuple[int, int]:
    """Check every seed; return how many schedules sent some node offline, and in how
    many a second model for a round reached a minority."""
    offline = splits = 0
    for seed in seeds:
        sim = run_schedule(seed)
        check_invariants(sim, seed, sim.nodes[0].core.machine.rounds_total)
        offline += any(n.offline_steps for n in sim.nodes)
        splits += split_rounds(sim) > 0
    return offline, splits


def test_fifty_random_schedules_keep_the_invariants():
    offline, splits = _run(range(50))
    # partitions cut a minority off often enough that offline averaging is exercised
    assert offline >= 5
    assert splits == 0


@pytest.mark.slow
def test_five_hundred_random_schedules_keep_the_invariants():
    offline, splits = _run(range(50, 550))
    assert offline >= 50
    assert splits <= MAX_MINORITY_SPLITS * 500, f"{splits} of 500 schedules split a round"

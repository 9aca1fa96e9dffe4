"""Randomized schedules (crashes, restarts, hangs, delays) over 10-30 simulated nodes:
the invariants of tests/node/schedules.py hold for every seed; a failure names its seed."""

from __future__ import annotations

import pytest

from .schedules import check_invariants, run_schedule


def _run(seeds: range) -> None:
    for seed in seeds:
        sim = run_schedule(seed)
        check_invariants(sim, seed, sim.nodes[0].core.machine.rounds_total)


def test_fifty_random_schedules_keep_the_invariants():
    _run(range(50))


@pytest.mark.slow
def test_five_hundred_random_schedules_keep_the_invariants():
    _run(range(50, 550))

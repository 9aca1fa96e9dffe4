"""Randomized schedules (crashes, restarts, hangs, partitions, delays, joins) over 10-30
simulated nodes with a majority quorum: the invariants of tests/node/schedules.py hold for
every seed; a failure names its seed."""

from __future__ import annotations

from collections import Counter

import pytest

from .schedules import check_invariants, check_joins, run_schedule, split_rounds, stranded

#: Schedules in which a cut-off aggregator's model reached a minority (the documented
#: limit of quorum without consensus) may be at most this share of all.
MAX_MINORITY_SPLITS = 0.01
#: Schedules that leave a node stranded behind (docs/protocol.md 15) may be at most this
#: share of all.
MAX_STRANDED = 0.01


def _run(seeds: range) -> Counter[str]:
    """Check every seed; count the schedules that sent some node offline, sent compressed
    updates, stopped a node on its budget, in which a second model for a round reached a
    minority, in which a node joined (and those whose join had no other disturbance
    around it), and that left a node stranded."""
    seen: Counter[str] = Counter()
    for seed in seeds:
        sim = run_schedule(seed)
        check_invariants(sim, seed, sim.nodes[0].core.machine.rounds_total)
        seen["offline"] += any(n.offline_steps for n in sim.nodes)
        seen["compressed"] += sim.nodes[0].executor.codec.name != "none"
        seen["budget"] += any(n.executor.stopped_reason for n in sim.nodes)
        seen["splits"] += split_rounds(sim) > 0
        seen["joins"] += bool(sim.journal.joins)
        seen["quiet joins"] += check_joins(sim, seed)
        seen["stranded"] += bool(stranded(sim))
    return seen


def test_fifty_random_schedules_keep_the_invariants():
    seen = _run(range(50))
    # partitions cut a minority off often enough that offline averaging is exercised,
    # and the shared executor's compression and budget stops are exercised too; a
    # node joins in a third of the schedules or more
    assert seen["offline"] >= 5 and seen["compressed"] >= 10 and seen["budget"] >= 3, seen
    assert seen["joins"] >= 15, seen
    assert seen["splits"] == 0 and seen["stranded"] == 0, seen


@pytest.mark.slow
def test_five_hundred_random_schedules_keep_the_invariants():
    seen = _run(range(50, 550))
    assert seen["offline"] >= 50 and seen["compressed"] >= 100 and seen["budget"] >= 30, seen
    assert seen["joins"] >= 200 - 15, seen  # with the first fifty: at least 200 of 550
    splits = seen["splits"]
    assert splits <= MAX_MINORITY_SPLITS * 500, f"{splits} of 500 schedules split a round"
    assert seen["stranded"] <= MAX_STRANDED * 500, seen

"""Randomized schedules (crashes, restarts, hangs, partitions, delays, joins) over 10-30
simulated nodes with a majority quorum: the invariants of tests/node/schedules.py hold for
every seed; a failure names its seed."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

from .schedules import check_invariants, check_joins, run_schedule, split_rounds, stranded

#: Schedules in which a cut-off aggregator's model reached a minority (the documented
#: limit of quorum without consensus) may be at most this share of all.
MAX_MINORITY_SPLITS = 0.01
#: Schedules that leave a node stranded behind (docs/protocol.md 15) may be at most this
#: share of all.
MAX_STRANDED = 0.01


def _check(seed: int) -> Counter[str]:
    """Check one seed; count whether the schedule sent some node offline, sent compressed
    updates, stopped a node on its budget, let a second model for a round reach a
    minority, had a node join (and whether that join had no other disturbance around it),
    and left a node stranded."""
    sim = run_schedule(seed)
    check_invariants(sim, seed, sim.nodes[0].core.machine.rounds_total)
    return Counter({
        "offline": any(n.offline_steps for n in sim.nodes),
        "compressed": sim.nodes[0].executor.codec.name != "none",
        "budget": any(n.executor.stopped_reason for n in sim.nodes),
        "splits": split_rounds(sim) > 0,
        "joins": bool(sim.journal.joins),
        "quiet joins": check_joins(sim, seed),
        "stranded": bool(stranded(sim)),
    })


def _run(seeds: range) -> Counter[str]:
    """Check every seed (``_check``), on every core: the schedules are independent and
    each is seeded, so the counts do not depend on how they are shared out."""
    seen: Counter[str] = Counter()
    workers = min(len(seeds), os.cpu_count() or 1)
    if workers < 2:
        for seed in seeds:
            seen.update(_check(seed))
        return seen
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for counts in pool.map(_check, seeds, chunksize=max(1, len(seeds) // (4 * workers))):
            seen.update(counts)
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

"""A node joining a running federation at any moment never stalls a round (issue 12,
point 7; docs/protocol.md 9.1, 9.2, 9.4), in memory through the daemon's executor: three
members train, a fourth joins with one or two of them as its --peer, at a moment of a
round drawn by the parametrization; membership beyond its links comes from gossiped
announcements and progress from heartbeats, as in the daemon."""

from __future__ import annotations

import functools

import pytest

from node.runtime.sim import Simulation
from protocol.rounds import RoundTimeouts

ROUNDS = 12
#: A deadline that fires shows in these notes (an aggregator's collect deadline, a
#: member's model deadline, a node's wait while it sits a round out).
DEADLINE_NOTES = ("deadline", "join_timeout")


def federation_with_a_joiner(seed: int, join_at: float, peers: tuple[int, ...]) -> Simulation:
    sim = Simulation(4, rounds=ROUNDS, seed=seed, wait_peers=2, quorum=2, late=1,
                     timeouts=RoundTimeouts(collect=60.0, model=90.0, start=10.0),
                     train_time=(0.5, 1.5), heartbeat_interval=1.0, announce_interval=2.0)
    for a in range(3):
        for b in range(a + 1, 3):
            sim.connect(a, b)
    sim.start(full_mesh=False)
    sim.at(join_at, functools.partial(sim.join, 3, list(peers)))
    sim.run(2_000, stop=lambda: sim.all_done(ROUNDS) and not sim.late)
    return sim


@pytest.mark.parametrize("peers", [(0,), (1, 2)])
@pytest.mark.parametrize("join_at", [0.3, 1.1, 2.0, 3.3, 5.1, 7.7, 10.2])
@pytest.mark.parametrize("seed", [0, 1, 11, 25])
def test_a_node_joining_at_any_moment_stalls_no_round(seed, join_at, peers):
    sim = federation_with_a_joiner(seed, join_at, peers)
    assert sim.all_done(ROUNDS)
    waits = [(n.index, round(t, 1), k, d) for n in sim.nodes for t, k, d in n.notes
             if k in DEADLINE_NOTES or "deadline" in d]
    assert waits == []
    # no round waited: each took at most a few simulated seconds of training
    joiner = sim.nodes[3]
    committed = sorted(t for t, k, _ in sim.nodes[0].notes if k == "done") or [sim.now]
    assert committed[0] < 2.0 * ROUNDS + join_at
    # one model per round everywhere; the joiner applied the federation's models and
    # contributed an update to rounds after it joined
    for r, digest in joiner.commits.items():
        assert {n.commits[r] for n in sim.nodes[:3]} == {digest}
    assert max(joiner.commits) == ROUNDS
    with_joiner = [d for n in sim.nodes for _, k, d in n.notes
                   if k == "aggregate" and ": 4 updates" in d]
    assert with_joiner, "the joiner never contributed"

"""Many nodes in one process over the in-memory network with a fake clock (node.runtime.sim).

These run the real NodeCore (keys, signed envelopes, replay guard, round machine); only
sockets, threads and the clock are simulated, so whole federations run in milliseconds.
"""

from __future__ import annotations

import time

import pytest

from node.runtime.sim import Simulation
from protocol.rounds import Phase, RoundTimeouts


def assert_one_model_per_round(sim: Simulation, rounds: int) -> None:
    for r in range(1, rounds + 1):
        digests = {n.commits.get(r) for n in sim.alive()}
        assert len(digests) == 1 and None not in digests, f"round {r}: {digests}"


def aggregator_of(sim: Simulation, r: int) -> int:
    return next(n.index for n in sim.nodes if r in n.aggregated)


def test_ten_nodes_agree_on_every_round_and_the_role_rotates():
    sim = Simulation(10, rounds=20, seed=1)
    sim.start()
    sim.run(10_000, stop=lambda: sim.all_done(20))
    assert sim.all_done(20)
    assert_one_model_per_round(sim, 20)
    aggregators = [aggregator_of(sim, r) for r in range(1, 21)]
    assert len(set(aggregators)) >= 4
    assert all(n.core.machine.phase is Phase.DONE for n in sim.nodes)
    assert not any(n.rejected for n in sim.nodes)


def test_fifty_nodes_through_a_hundred_rounds_in_seconds():
    start = time.perf_counter()
    # A full mesh needs no relayed membership, so announcements (N^2 frames per interval)
    # are left out here to keep the run about rounds; tests below cover them.
    sim = Simulation(50, rounds=100, seed=3, train_time=(1.0, 1.5), announce_interval=1e6)
    sim.start()
    sim.run(100_000, stop=lambda: sim.all_done(100))
    assert sim.all_done(100)
    assert_one_model_per_round(sim, 100)
    # Not a timing assertion on the machine: a generous bound that only a hang would break.
    assert time.perf_counter() - start < 300


def test_every_model_has_every_member_contributing():
    sim = Simulation(6, rounds=5, seed=4)
    sim.start()
    sim.run(10_000, stop=lambda: sim.all_done(5))

    for r in range(1, 6):
        agg = sim.nodes[aggregator_of(sim, r)]
        assert r in agg.aggregated
    # the aggregators' notes say each aggregation had all 6 updates
    counts = [d for n in sim.nodes for _, k, d in n.notes if k == "aggregate"]
    assert counts and all(": 6 updates (all updates in)" in d for d in counts)


@pytest.mark.parametrize("seed", range(8))
def test_aggregator_crash_mid_round_survivors_elect_another(seed):
    sim = Simulation(5, rounds=6, seed=seed)
    sim.start()
    sim.run(10_000, stop=lambda: sim.all_done(2))
    # kill round 3's aggregator at a seeded moment of the round: while it trains, while it
    # collects updates, or just as the last update reaches it
    victim = sim.by_key[sim.nodes[0].core.machine.elect()]
    sim.run(sim.now + sim.rng.uniform(0.0, 3.0),
            stop=lambda: victim.core.machine.phase is Phase.AGGREGATING)
    assert victim.core.machine.current == 3
    sim.crash(victim.index)
    sim.run(10_000, stop=lambda: sim.all_done(6))
    assert sim.all_done(6)
    assert_one_model_per_round(sim, 6)
    assert 3 not in victim.aggregated
    assert aggregator_of(sim, 3) != victim.index


def test_a_hung_aggregator_is_replaced_after_the_model_deadline():
    timeouts = RoundTimeouts(collect=20.0, model=30.0, start=10.0)
    sim = Simulation(4, rounds=4, seed=5, timeouts=timeouts)
    sim.start()
    sim.run(10_000, stop=lambda: sim.all_done(1))
    # the node every member will elect for round 2 hangs before it can aggregate
    victim = sim.by_key[sim.nodes[0].core.machine.elect()]
    hung_at = sim.now
    sim.silence(victim.index)  # links stay up: only the deadline can reveal it
    sim.run(10_000, stop=lambda: sim.all_done(4))
    assert sim.all_done(4)
    assert_one_model_per_round(sim, 4)
    survivors = sim.alive()
    failed = [t for n in survivors for t, k, _ in n.notes if k == "aggregator_failed"]
    assert failed and min(failed) >= hung_at + timeouts.model - 5


def test_a_late_joiner_catches_up_from_the_latest_model():
    sim = Simulation(4, rounds=6, seed=6, wait_peers=2)
    # nodes 0-2 form the federation; node 3 arrives after round 3
    for a in range(3):
        for b in range(a + 1, 3):
            sim.connect(a, b)
    for node in sim.nodes:
        node.core.machine.start(sim.now)
        sim._drain(node)
    sim.run(10_000, stop=lambda: all(n.core.machine.completed >= 3 for n in sim.nodes[:3]))
    late = sim.nodes[3]
    assert late.core.machine.completed == 0
    for a in range(3):
        sim.connect(a, 3)
    sim.run(10_000, stop=lambda: sim.all_done(6))
    assert sim.all_done(6)
    # the late node jumped straight to the federation's model, then trained with the others
    first = min(late.commits)
    assert first >= 3
    for r in range(first, 7):
        assert late.commits[r] == sim.nodes[0].commits[r]


def test_tampered_and_replayed_frames_are_rejected_and_the_run_goes_on():
    sim = Simulation(3, rounds=3, seed=7)
    sim.start()
    a, b = sim.nodes[0], sim.nodes[1]
    hb = bytes(a.core.heartbeat("training"))
    sim._deliver(a, b, hb)
    sim._deliver(a, b, hb)  # the same frame again: a replay
    tampered = bytearray(hb)
    tampered[-70] ^= 0x01  # a byte of the payload
    sim._deliver(a, b, bytes(tampered))
    sim.run(10_000, stop=lambda: sim.all_done(3))
    assert sim.all_done(3)
    assert any("replayed" in r for r in b.rejected)
    assert any("signature" in r for r in b.rejected)

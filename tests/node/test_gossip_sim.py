"""Membership and gossip over partial meshes, in memory (node.runtime.sim): relayed members,
routed updates, forward-once de-duplication, and trust."""

from __future__ import annotations

import pytest

from node.runtime.sim import Simulation
from protocol.gossip import frame_id
from protocol.identity import Identity
from protocol.messages import Heartbeat, Relay

from .test_sim import assert_one_model_per_round


def line(n: int, **kw) -> Simulation:
    sim = Simulation(n, **kw)
    for i in range(n - 1):
        sim.connect(i, i + 1)
    sim.start(full_mesh=False)
    return sim


@pytest.mark.parametrize("seed", range(4))
def test_a_line_a_b_c_trains_to_one_model_every_round(seed):
    sim = line(3, rounds=5, seed=seed)
    sim.run(10_000, stop=lambda: sim.all_done(5))
    assert sim.all_done(5)
    assert_one_model_per_round(sim, 5)
    a, c = sim.nodes[0], sim.nodes[2]
    # a and c never linked, yet each knows the other as a relayed member
    assert c.key not in a.core.links and a.key not in c.core.links
    assert a.core.known[c.key].member or a.core.known[c.key].last_announce > 0
    # every node contributed to every round: updates found the aggregator through b
    for r in range(1, 6):
        agg = next(n for n in sim.nodes if r in n.aggregated)
        notes = [d for _, k, d in agg.notes if k == "aggregate" and d.startswith(f"round {r}:")]
        assert notes and "3 updates" in notes[-1], notes


def test_a_longer_line_of_six_completes():
    sim = line(6, rounds=4, seed=11)
    sim.run(10_000, stop=lambda: sim.all_done(4))
    assert sim.all_done(4)
    assert_one_model_per_round(sim, 4)
    assert sum(n.core.counters.relayed for n in sim.nodes) > 0


def test_relayed_members_show_as_relayed_and_then_gone():
    sim = line(3, rounds=50, seed=2, announce_interval=1.0)
    sim.run(30)
    a, c = sim.nodes[0], sim.nodes[2]
    assert a.core.peers.peer_state(c.key, sim.now) == "relayed"
    sim.crash(2)
    sim.run(sim.now + 10)
    assert a.core.peers.peer_state(c.key, sim.now) == "gone"
    assert c.key not in a.core.machine.peers


def test_a_flood_of_duplicates_is_processed_and_forwarded_once():
    sim = line(4, rounds=50, seed=5)
    sim.run(5)
    a, b, c = sim.nodes[0], sim.nodes[1], sim.nodes[2]
    inner = bytes(a.core.frame(Heartbeat(0, "training", 1, 0)))  # any signed frame
    dups_before = b.core.counters.duplicates
    for _ in range(20):
        relay = bytes(a.core.frame(Relay(ttl=5, to=b"", frame=inner)))
        sim._deliver(a, b, relay)
    sim.run(sim.now + 1)
    # b refuses the heartbeat inside once (heartbeats are never relayed) and drops the
    # other 19 copies as duplicates; none of them goes any further
    assert b.rejected.count("heartbeats are not relayed") == 1
    assert b.core.counters.duplicates - dups_before == 19
    assert frame_id(inner) not in c.core.seen and frame_id(inner) not in c.core.forwarded


def test_a_frame_replayed_by_another_peer_is_dropped():
    sim = line(3, rounds=50, seed=6)
    sim.run(5)
    a, b, c = sim.nodes
    hb = bytes(a.core.heartbeat("training"))
    sim._deliver(a, b, hb)
    sim.run(sim.now + 1)
    # c replays a's frame to b inside a relay: b has handled it, so it goes nowhere
    sim._deliver(c, b, bytes(c.core.frame(Relay(ttl=3, to=b"", frame=hb))))
    sim.run(sim.now + 1)
    assert b.core.counters.duplicates >= 1 or any("replayed" in r or "not relayed" in r
                                                    for r in b.rejected)


def test_a_node_without_the_federation_secret_is_never_admitted():
    sim = Simulation(3, rounds=3, seed=8)
    outsider = sim.nodes[2]
    outsider.core.trust.federation_key = b"\x00" * 32  # it guessed wrong
    sim.start()
    sim.run(10_000, stop=lambda: all(n.core.machine.completed >= 3 for n in sim.nodes[:2]))
    a, b = sim.nodes[:2]
    assert a.core.machine.completed == 3 and b.core.machine.completed == 3
    assert outsider.key not in a.core.links and not a.core.known[outsider.key].trusted
    # it got no model traffic at all: it trained alone, every model it holds is its own
    assert set(outsider.commits) == set(outsider.aggregated)
    assert all(outsider.commits[r] != a.commits[r] for r in outsider.commits)


def test_a_pinned_or_paired_key_is_trusted_without_a_secret():
    sim = Simulation(2, rounds=2, seed=9)
    for n in sim.nodes:
        n.core.trust.federation_key = None
    a, b = sim.nodes
    a.core.trust.pinned.add(b.key)
    b.core.trust.pinned_ids.add(Identity.from_seed(b"\x00" * 32).node_id)  # someone else
    sim.start()
    assert b.key not in a.core.links  # b does not trust a, so there is no link
    b.core.trust.pinned.add(a.key)
    sim.connect(0, 1)
    sim.run(10_000, stop=lambda: sim.all_done(2))
    assert sim.all_done(2)
    assert a.core.known[b.key].trust == "pinned"

"""A 2+2 partition in memory: both sides keep training; after healing, one model again
within two rounds."""

from __future__ import annotations

import pytest

from node.runtime.sim import Simulation

CROSS = [(0, 2), (0, 3), (1, 2), (1, 3)]


def three_rounds_in(seed: int, **options: int) -> Simulation:
    """4 nodes, each past round 3, on one network."""
    sim = Simulation(4, rounds=40, seed=seed, announce_interval=1e6, heartbeat_interval=1.0,
                     **options)
    sim.start()
    sim.run(10_000, stop=lambda: sim.all_done(3))
    return sim


def split(sim: Simulation, *, heal: bool = False) -> None:
    """Cut every link between {0, 1} and {2, 3} (or, with ``heal``, mend them)."""
    for a, b in CROSS:
        (sim.connect if heal else sim.disconnect)(a, b)


@pytest.mark.parametrize("seed", range(6))
def test_both_sides_train_through_a_partition_and_reconverge(seed):
    sim = three_rounds_in(seed, wait_peers=1)
    split(sim)
    split_at = [n.core.machine.completed for n in sim.nodes]
    sim.run(sim.now + 60)
    during = [n.core.machine.completed for n in sim.nodes]
    assert all(d >= s + 3 for s, d in zip(split_at, during, strict=True)), (split_at, during)  # both sides
    split(sim, heal=True)
    healed = max(n.core.machine.completed for n in sim.nodes)
    sim.run(sim.now + 10_000, stop=lambda: all(n.core.machine.completed >= healed + 2
                                               for n in sim.nodes))
    digests = {n.core.machine.model_digest for n in sim.nodes}
    rounds = {n.core.machine.completed for n in sim.nodes}
    # within two rounds of healing every node holds the same model (at the same round) ...
    target = healed + 2
    at_target = {n.commits.get(target) for n in sim.nodes}
    assert len(at_target) == 1 and None not in at_target, (rounds, len(digests))
    # ... and no node ever applied two models for one round (sim.Commit asserts it)


@pytest.mark.parametrize("seed", range(6))
def test_with_a_majority_quorum_both_sides_go_offline_and_the_heal_merges_them(seed):
    sim = three_rounds_in(seed, quorum=3)
    split(sim)
    split_at = [n.core.machine.completed for n in sim.nodes]
    steps = [n.offline_steps for n in sim.nodes]
    sim.run(sim.now + 60)
    # neither side has 3 members: no global round, but every node kept training offline
    assert all(n.core.machine.offline for n in sim.nodes)
    assert [n.core.machine.completed for n in sim.nodes] == split_at
    assert all(n.offline_steps >= s + 3 for n, s in zip(sim.nodes, steps, strict=True))
    split(sim, heal=True)
    healed = max(split_at)
    sim.run(sim.now + 10_000, stop=lambda: sim.all_done(healed + 2))
    assert sim.all_done(healed + 2)
    # one model per round across all nodes, the whole run through
    for r in range(1, healed + 3):
        assert len({n.commits[r] for n in sim.nodes if r in n.commits}) == 1, r
    # the first round after healing merged updates from both sides
    merged = [n for n in sim.nodes if healed + 1 in n.aggregated]
    assert len(merged) == 1
    notes = [d for t, k, d in merged[0].notes if k == "aggregate" and f"round {healed + 1}" in d]
    assert notes and int(notes[-1].split(": ")[1].split()[0]) >= 3

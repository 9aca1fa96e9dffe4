"""The aggregator crashes at each phase of a round: before collecting (while training),
while aggregating, and after sending the model to only some peers. The run finishes and
every node holds the same model for each round."""

from __future__ import annotations

import pytest

from node.runtime.sim import Simulation
from protocol.rounds import Phase

from .test_sim import assert_one_model_per_round

ROUNDS = 5
VICTIM_ROUND = 3


def _setup(seed: int) -> tuple[Simulation, object]:
    # heartbeats on, as in the daemon: they carry progress, so a node still waiting for a
    # round's model is served it by a neighbour that has it (anti-entropy)
    sim = Simulation(6, rounds=ROUNDS, seed=seed, announce_interval=1e6, heartbeat_interval=1.0)
    sim.start()
    sim.run(10_000, stop=lambda: sim.all_done(VICTIM_ROUND - 1))
    victim = sim.by_key[sim.nodes[0].core.machine.elect()]
    assert victim.core.machine.current == VICTIM_ROUND
    return sim, victim


def _finish(sim: Simulation, victim) -> None:  # noqa: ANN001
    sim.run(sim.now + 10_000, stop=lambda: sim.all_done(ROUNDS))
    assert sim.all_done(ROUNDS)
    assert_one_model_per_round(sim, ROUNDS)
    assert not victim.alive


@pytest.mark.parametrize("seed", range(5))
def test_crash_before_collecting(seed):
    sim, victim = _setup(seed)
    sim.crash(victim.index)  # still training its own update
    _finish(sim, victim)
    assert VICTIM_ROUND not in victim.aggregated


@pytest.mark.parametrize("seed", range(5))
def test_crash_while_aggregating(seed):
    sim, victim = _setup(seed)
    sim.run(sim.now + 10_000, stop=lambda: victim.core.machine.phase is Phase.AGGREGATING)
    assert victim.core.machine.phase is Phase.AGGREGATING
    sim.crash(victim.index)
    _finish(sim, victim)
    assert VICTIM_ROUND not in victim.aggregated


@pytest.mark.parametrize(("seed", "reached"), [(s, r) for s in range(5) for r in (1, 2, 4)])
def test_crash_after_sending_the_model_to_only_some(seed, reached):
    sim, victim = _setup(seed)
    victim.crash_after_sending = reached
    _finish(sim, victim)
    # the model the victim got out is the model of that round everywhere
    assert VICTIM_ROUND in victim.aggregated
    assert all(n.commits[VICTIM_ROUND] == victim.aggregated[VICTIM_ROUND] for n in sim.alive())

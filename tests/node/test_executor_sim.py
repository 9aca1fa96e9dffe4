"""The simulation drives the daemon's own executor (node.runtime.executor): what happens
in the executor (checkpoint writes, compression, budget stops, job failures) is seen by
simulated nodes, so the randomized schedules exercise the code the daemon runs."""

from __future__ import annotations

import errno

from node.runtime.executor import Executor
from node.runtime.sim import Simulation
from protocol.messages import Delta
from protocol.rounds import Phase


def test_a_fault_in_the_checkpoint_store_is_seen_by_a_simulated_node():
    sim = Simulation(4, rounds=8, seed=3)
    victim = sim.nodes[1]
    victim.store.fault = OSError(errno.ENOSPC, "No space left on device")
    sim.start()
    sim.run(10_000, stop=lambda: all(n.core.machine.completed >= 3 for n in sim.nodes))
    problem = victim.health.problems["checkpoints"]
    assert "No space left" in problem.reason and problem.count >= 3
    assert victim.store.rounds == {} and victim.executor.checkpoint_round == 0
    assert all(n.health.state == "ok" for n in sim.nodes if n is not victim)
    victim.store.fault = None  # space returns: the next checkpoint is written
    sim.run(10_000, stop=lambda: sim.all_done(8))
    assert sim.all_done(8)
    assert victim.health.state == "ok"
    assert max(victim.store.rounds) == 8 and victim.executor.checkpoint_round == 8


def test_a_restarted_simulated_node_resumes_from_what_its_store_holds():
    sim = Simulation(3, rounds=10, seed=4)
    sim.start()
    sim.run(10_000, stop=lambda: sim.nodes[2].core.machine.completed >= 3)
    node = sim.nodes[2]
    node.store.fault = OSError(errno.ENOSPC, "No space left on device")
    held = max(node.store.rounds)
    sim.run(10_000, stop=lambda: node.core.machine.completed >= held + 2)
    sim.crash(2)
    sim.restart(2)
    # the checkpoints written before the disk filled up are what it resumes from
    assert sim.nodes[2].core.machine.completed == held
    sim.nodes[2].store.fault = None
    sim.run(10_000, stop=lambda: sim.all_done(10))
    assert sim.all_done(10)
    assert len({n.core.machine.model_digest for n in sim.nodes}) == 1


def test_compressed_updates_travel_through_the_shared_executor(monkeypatch):
    sent: list[type] = []
    real = Executor._compressed

    def spy(self, update):
        out = real(self, update)
        sent.append(type(out))
        return out

    monkeypatch.setattr(Executor, "_compressed", spy)
    sim = Simulation(4, rounds=4, seed=5, compress="int8")
    sim.start()
    sim.run(10_000, stop=lambda: sim.all_done(4))
    assert sim.all_done(4)
    assert Delta in sent  # int8 deltas went to the aggregators
    assert len({n.core.machine.model_digest for n in sim.nodes}) == 1
    assert not any(n.rejected for n in sim.nodes)


def test_a_spent_budget_stops_a_simulated_node_and_the_others_carry_on():
    sim = Simulation(4, rounds=6, seed=6, wait_peers=3)
    sim.nodes[0].learner.budget = 2
    sim.start()
    sim.run(10_000, stop=lambda: all(n.core.machine.completed >= 6 for n in sim.nodes[1:]))
    stopped = sim.nodes[0]
    assert stopped.core.machine.phase is Phase.STOPPED
    assert "budget" in (stopped.executor.stopped_reason or "")
    assert stopped.learner.trained == 2
    assert any(k == "training_refused" for _, k, _ in stopped.notes)
    assert all(n.core.machine.completed == 6 for n in sim.nodes[1:])


def test_evaluations_are_recorded_by_the_executor_for_every_committed_round():
    sim = Simulation(3, rounds=5, seed=8)
    sim.start()
    sim.run(10_000, stop=lambda: sim.all_done(5))
    sim.run(sim.now + 1)  # evaluations run when the worker is idle
    for node in sim.nodes:
        rows = node.executor.round_log.rows  # type: ignore[attr-defined]
        assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
        assert node.executor.evaluated_round == 5 and node.executor.accuracy is not None

"""Randomized schedules for the in-memory simulation: crashes, restarts, hangs,
partitions and delays.

``run_schedule(seed)`` builds a federation of 10-30 nodes with a majority quorum, disturbs
it at random moments and returns the finished Simulation; ``check_invariants`` raises
AssertionError naming the seed when one of the invariants breaks:

* no node applies two different global models for one round (SimEvents asserts it),
* at most one global model is accepted by a quorum of nodes for each round; a second
  model for a round may only reach a minority (docs/architecture.md, "Quorum, not
  consensus": an aggregator cut off right after publishing), and the run counts how
  often that happens (test_random_schedules bounds the rate),
* no exception escapes a node (the simulation would raise),
* at the end, every live node holds one and the same model, at the final round.
"""

from __future__ import annotations

import random

from node.runtime.sim import Simulation
from protocol.rounds import RoundTimeouts

IDLE_TIMEOUT = 10.0  # the transport closes links that carried nothing for this long


def run_schedule(seed: int) -> Simulation:
    rng = random.Random(seed)
    n = rng.randint(10, 30)
    rounds = rng.randint(3, 6)
    quorum = n // 2 + 1
    # What the executor does is drawn from its own stream, so the faults stay those of
    # the seed: compressed updates in a third of the schedules, and in a fifth one node
    # whose privacy budget runs out before the last round.
    work = random.Random(f"{seed}/executor")
    sim = Simulation(n, rounds=rounds, seed=seed, latency=(0.001, rng.choice([0.02, 0.2, 1.0])),
                     train_time=(0.5, rng.choice([1.0, 3.0, 8.0])),
                     timeouts=RoundTimeouts(collect=20.0, model=30.0, start=5.0, floor=3.0),
                     announce_interval=1e6, wait_peers=0, quorum=quorum,
                     compress=work.choice(["none", "none", "fp16", "int8"]))
    if work.random() < 0.2:
        sim.nodes[work.randrange(n)].learner.budget = rounds - 1
    sim.start()
    crashed: list[int] = []
    hung: set[int] = set()
    horizon = 0.0
    for _ in range(rng.randint(1, 6)):
        horizon += rng.uniform(0.5, 15.0)
        sim.run(horizon)
        alive = [x.index for x in sim.nodes if x.alive]
        action = rng.random()
        if action < 0.35 and len(alive) > 2:
            victim = rng.choice(alive)
            sim.crash(victim)
            crashed.append(victim)
        elif action < 0.45 and n - len(hung) - 1 > quorum:
            victim = rng.choice(alive)  # hung for good: links up, nothing sent
            sim.silence(victim, idle_timeout=IDLE_TIMEOUT)
            hung.add(victim)
        elif action < 0.65:
            side = set(rng.sample(range(n), rng.randint(1, n - 1)))
            sim.partition(side)
        elif action < 0.75:
            sim.heal()
        elif crashed:
            sim.restart(crashed.pop(rng.randrange(len(crashed))))
    sim.heal()
    for i in crashed:  # everyone crashed comes back before the end
        sim.restart(i)
    sim.heal()
    # From here on the nodes report their progress as the daemon does all along (off
    # before, to keep 550 schedules fast): a node that deferred a catch-up model gets it
    # again once others vouch for its round.
    sim.start_heartbeats(10.0)
    sim.run(horizon + 5000, stop=lambda: sim.all_done(rounds))
    return sim


def check_invariants(sim: Simulation, seed: int, rounds: int) -> None:
    where = f"(seed {seed}: reproduce with run_schedule({seed}))"
    # a node whose budget ran out stopped taking part: the others finish without it
    spent = [x for x in sim.alive() if x.executor.stopped_reason is not None]
    assert all("budget" in (x.executor.stopped_reason or "") for x in spent), where
    alive = [x for x in sim.alive() if x not in spent]
    assert all(x.core.machine.completed == rounds for x in alive), (
        f"not all live nodes finished: {[x.core.machine.completed for x in alive]} {where}")
    finals = {x.core.machine.model_digest for x in alive}
    assert len(finals) == 1, f"live nodes hold {len(finals)} different models {where}"
    quorum = sim.nodes[0].core.machine.quorum
    for r, holders in applied(sim).items():
        majority = [d for d, nodes in holders.items() if len(nodes) >= quorum]
        assert len(majority) <= 1, f"round {r}: two models each reached a quorum {where}"
        if len(holders) > 1:
            assert majority, f"round {r}: split with no model reaching a quorum {where}"


def applied(sim: Simulation) -> dict[int, dict[bytes, set[int]]]:
    """Round -> model digest -> the nodes that applied it."""
    by_round: dict[int, dict[bytes, set[int]]] = {}
    for node in sim.nodes:
        for r, digest in node.commits.items():
            by_round.setdefault(r, {}).setdefault(digest, set()).add(node.index)
    return by_round


def split_rounds(sim: Simulation) -> int:
    """Rounds for which different nodes applied different models."""
    return sum(len(d) > 1 for d in applied(sim).values())

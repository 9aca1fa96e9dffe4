"""Randomized schedules for the in-memory simulation: crashes, restarts, hangs,
partitions, delays and joins.

``run_schedule(seed)`` builds a federation of 10-30 nodes with a majority quorum, disturbs
it at random moments (in ``JOIN_SHARE`` of the schedules one more node joins while it
runs) and returns the finished Simulation; ``check_invariants`` raises AssertionError
naming the seed when one of the invariants breaks:

* no node applies two different global models for one round (SimEvents asserts it),
* at most one global model is accepted by a quorum of nodes for each round; a second
  model for a round may only reach a minority (docs/architecture.md, "Quorum, not
  consensus": an aggregator cut off right after publishing), and the run counts how
  often that happens (test_random_schedules bounds the rate),
* no exception escapes a node (the simulation would raise),
* joining never stalls a round (``check_joins``),
* at the end, every live node holds one and the same model, at the final round, but for
  nodes ``stranded`` by a documented limit (test_random_schedules bounds how often).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from node.runtime.sim import SimNode, Simulation
from protocol.identity import node_id_from_key
from protocol.rounds import Phase, RoundTimeouts

IDLE_TIMEOUT = 10.0  # the transport closes links that carried nothing for this long
#: Share of the schedules in which a node joins the running federation.
JOIN_SHARE = 0.45
#: How often (simulated seconds) a schedule looks whether its joiner's moment has come.
POLL_S = 0.25
#: Longer than any deadline of the schedules (model: 30 s) plus the idle timeout: a
#: deadline that fires this long after the last disturbance was not caused by it.
QUIET_S = 45.0


@dataclass
class Journal:
    """What a schedule did to its federation and when (simulated seconds): disturbances
    (crash, hang, partition, heal, restart: only those that changed something) and joins,
    in order. ``check_joins`` reads it."""

    disturbances: list[tuple[float, str]] = field(default_factory=list)
    joins: list[float] = field(default_factory=list)
    #: Deadlines that fired: (time, node, note, why it waited in vain or "").
    expiries: list[tuple[float, int, str, str]] = field(default_factory=list)
    #: Whether a committed model has aggregated the joiner's update (then it is a member
    #: like the others).
    established: bool = False
    #: False while a joiner's links are still to come (``_join_when``).
    settled: bool = True


class ScheduleRun(Simulation):
    """The simulation of one schedule, with its journal and its joiner (if any)."""

    journal: Journal
    joiner: int | None


def run_schedule(seed: int) -> ScheduleRun:
    rng = random.Random(seed)
    n = rng.randint(10, 30)
    rounds = rng.randint(3, 6)
    # What the executor does is drawn from its own stream, so the faults stay those of
    # the seed: compressed updates in a third of the schedules, and in a fifth one node
    # whose privacy budget runs out before the last round.
    work = random.Random(f"{seed}/executor")
    # Joins too: in JOIN_SHARE of the schedules one more node (not counted in n, never a
    # victim) joins the running federation once some node has completed a drawn round.
    joins = random.Random(f"{seed}/join")
    late = int(joins.random() < JOIN_SHARE)
    quorum = (n + late) // 2 + 1  # a majority of all, the joiner included
    sim = ScheduleRun(n + late, rounds=rounds, seed=seed,
                      latency=(0.001, rng.choice([0.02, 0.2, 1.0])),
                      train_time=(0.5, rng.choice([1.0, 3.0, 8.0])),
                      timeouts=RoundTimeouts(collect=20.0, model=30.0, start=5.0, floor=3.0),
                      announce_interval=1e6, wait_peers=0, quorum=quorum,
                      compress=work.choice(["none", "none", "fp16", "int8"]), late=late)
    sim.journal, sim.joiner = Journal(settled=not late), n if late else None
    _watch_deadlines(sim)
    if work.random() < 0.2:
        sim.nodes[work.randrange(n)].learner.budget = rounds - 1
    sim.start()
    if late:
        _join_when(sim, n, after_round=joins.randrange(rounds), delay=joins.uniform(0.0, 5.0),
                   pick=joins)
    crashed: list[int] = []
    hung: set[int] = set()
    horizon = 0.0
    for _ in range(rng.randint(1, 6)):
        horizon += rng.uniform(0.5, 15.0)
        sim.run(horizon)
        alive = [x.index for x in sim.nodes[:n] if x.alive]
        action = rng.random()
        if action < 0.35 and len(alive) > 2:
            victim = rng.choice(alive)
            sim.crash(victim)
            crashed.append(victim)
            _disturbed(sim, "crash")
        elif action < 0.45 and n - len(hung) - 1 > quorum:
            victim = rng.choice(alive)  # hung for good: links up, nothing sent
            sim.silence(victim, idle_timeout=IDLE_TIMEOUT)
            hung.add(victim)
            _disturbed(sim, "hang")
        elif action < 0.65:
            side = set(rng.sample(range(n), rng.randint(1, n - 1)))
            if late and joins.random() < 0.5:
                side.add(n)  # the joiner (once joined) is on either side
            _topology(sim, "partition", functools.partial(sim.partition, side))
        elif action < 0.75:
            _topology(sim, "heal", sim.heal)
        elif crashed:
            sim.restart(crashed.pop(rng.randrange(len(crashed))))
            _disturbed(sim, "restart")
    _topology(sim, "heal", sim.heal)
    for i in crashed:  # everyone crashed comes back before the end
        sim.restart(i)
        _disturbed(sim, "restart")
    _topology(sim, "heal", sim.heal)
    # From here on the nodes report their progress as the daemon does all along (off
    # before, to keep 550 schedules fast): a node that deferred a catch-up model gets it
    # again once others vouch for its round.
    sim.start_heartbeats(10.0)
    sim.run(horizon + 5000, stop=lambda: _over(sim, rounds))
    return sim


def _over(sim: ScheduleRun, rounds: int) -> bool:
    """Every live node is done, or stranded once nothing can link it to more members."""
    if sim.late or not sim.journal.settled:
        return False
    left = [x for x in sim.alive() if x.core.machine.completed < rounds
            and x.executor.stopped_reason is None]
    if any(x.core.machine.phase is not Phase.OFFLINE for x in left):
        return False  # (cheap first: this runs after every event)
    return not left or set(map(id, left)) <= set(map(id, stranded(sim)))



def _disturbed(sim: ScheduleRun, kind: str) -> None:
    sim.journal.disturbances.append((sim.now, kind))


def _topology(sim: ScheduleRun, kind: str, change: Callable[[], None]) -> None:
    """Make a link change; journal it if it cut or made a link."""
    before = set(sim.links)
    change()
    if sim.links != before:
        _disturbed(sim, kind)


def _join_when(sim: ScheduleRun, i: int, *, after_round: int, delay: float,
               pick: random.Random) -> None:
    """Join node ``i`` ``delay`` seconds after some node completed ``after_round``, linked
    to a live node drawn with ``pick`` and to some of the nodes linked to it (on its side
    of any partition), then, after a few more seconds, to the rest of that side.
    Membership in the schedules comes from links alone (no announcements), so meanwhile
    the others do not know the joiner: members see different members, as in a real
    federation while gossip spreads the joiner's announcements."""

    def join() -> None:
        alive = [x.index for x in sim.nodes if x.alive]
        first = pick.choice(alive)
        side = [j for j in alive if frozenset((first, j)) in sim.links]
        sim.join(i, [first, *pick.sample(side, pick.randint(0, len(side)))])
        sim.journal.joins.append(sim.now)
        sim.at(pick.uniform(1.0, 10.0), lambda: spread(first))

    def spread(first: int) -> None:
        for j in range(len(sim.nodes)):
            if j != i and frozenset((first, j)) in sim.links:
                sim.connect(i, j)
        sim.journal.settled = True

    def poll() -> None:
        if max(x.core.machine.completed for x in sim.nodes) >= after_round:
            sim.at(delay, join)
        else:
            sim.at(POLL_S, poll)

    poll()


def check_invariants(sim: ScheduleRun, seed: int, rounds: int) -> None:
    where = f"(seed {seed}: reproduce with run_schedule({seed}))"
    check_joins(sim, seed)
    # a node whose budget ran out stopped taking part: the others finish without it
    spent = [x for x in sim.alive() if x.executor.stopped_reason is not None]
    assert all("budget" in (x.executor.stopped_reason or "") for x in spent), where
    alive = [x for x in sim.alive() if x not in spent and x not in stranded(sim)]
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


def stranded(sim: Simulation) -> list[SimNode]:
    """Live nodes left behind for good by a documented limit (docs/protocol.md 15): below
    quorum, having missed more than one round, when fewer than a quorum of live members
    hold the final model; no model can then be taken (9.7 step 4 wants quorum - 1
    members other than its aggregator to vouch for a jump) and no round can be run."""
    rounds = sim.nodes[0].core.machine.rounds_total
    quorum = sim.nodes[0].core.machine.quorum
    holders = [x for x in sim.alive() if x.core.machine.completed == rounds]
    if len(holders) >= quorum:
        return []
    return [x for x in sim.alive() if x.core.machine.phase is Phase.OFFLINE
            and x.core.machine.completed < rounds - 1
            and len(x.core.machine.live()) < quorum]


def _watch_deadlines(sim: ScheduleRun) -> None:
    """Journal every deadline that fires, and whether it waited in vain (``_in_vain``),
    read from the nodes' machines at that moment."""
    for index, node in enumerate(sim.nodes):
        note = node.events.note  # kept across restarts: the node's event log

        def watch(kind: str, detail: str, index: int = index, note=note) -> None:  # noqa: ANN001
            note(kind, detail)
            if kind == "join_timeout" or (kind in ("aggregate", "aggregator_failed")
                                          and "deadline" in detail):
                sim.journal.expiries.append((sim.now, index, f"{kind}: {detail}",
                                             _in_vain(sim, index, kind, detail)))

        node.events.note = watch  # type: ignore[method-assign]


def _in_vain(sim: ScheduleRun, index: int, kind: str, detail: str) -> str:
    """Why a deadline waited in vain, read from the machines at that moment: "" if it
    did not (an aggregator's collect deadline cutting off a straggler still training,
    which is what the adaptive deadline is for), else each awaited node (the failed
    aggregator of a model deadline, the missing participants of a collect deadline) led
    by a category: ``joiner`` (until a model aggregated its update: the joiner, unless
    it elected an aggregator that some other node of the round elected too; or a node
    that elected the joiner), ``sat_out``
    (a node sitting the round out), ``join_timeout`` (a node sat out until the model
    deadline), ``other`` (dead, offline, behind, stepped down, elected another)."""
    if kind == "join_timeout":
        return f"join_timeout: n{index}"
    m = sim.nodes[index].core.machine
    if kind == "aggregator_failed" and "published nothing" in detail:
        ids = {node_id_from_key(x.key): x for x in sim.nodes}
        awaited = [ids[detail[detail.rindex("(") + 1:-1]]]
    else:
        missing = m.participants() - m.excluded - set(m.updates.get(m.current, {}))
        awaited = [sim.by_key[k] for k in missing]
    if sim.joiner is not None and not sim.journal.established:
        # a joiner whose update a committed model aggregated is a member like any other
        key = sim.nodes[sim.joiner].key
        sim.journal.established = any(key in (x.core.machine.contributors or ())
                                      for x in sim.nodes)
    joiner = None if sim.journal.established else sim.joiner
    # whom the nodes of this round other than the joiner elected: a joiner that chose
    # one of these followed the others (whatever made them disagree), it did not stray
    chosen = {x.core.machine.aggregator for x in sim.nodes if x.alive and x.index != joiner
              and x.core.machine.current == m.current} - {None}
    causes = []
    for other in awaited:
        om = other.core.machine
        if other.alive and om.current == m.current and (
                om.phase is Phase.TRAINING
                or om.phase is Phase.WAITING_MODEL and om.aggregator == m.self_key):
            continue  # a straggler, or its update is on its way
        elected = om.aggregator and sim.by_key[om.aggregator]
        stray = (elected is not None and elected.index == joiner
                 or other.index == joiner and om.aggregator not in chosen)
        category = ("joiner" if stray else "sat_out" if om.phase is Phase.JOINING
                    else "other")
        causes.append(f"{category}: n{other.index} {'alive' if other.alive else 'dead'}"
                      f" {om.phase.value} round {om.current} aggregator"
                      f" {elected and elected.index}")
    return "; ".join(causes)


def check_joins(sim: ScheduleRun, seed: int) -> int:
    """Joining never stalls a round: no deadline waits in vain for the joiner, for a
    node that elected it, or for a node sitting a round out (``_in_vain``), unless a
    disturbance (crash, hang, partition, heal, restart; not a join) came less than
    ``QUIET_S`` before: ``QUIET_S`` is longer than any deadline plus the idle timeout, so
    what fires later was not caused by it. AssertionError naming the seed otherwise.
    (A joiner's own wait while it sits out, ``join_timeout``, stalls no round: here,
    without heartbeats or gossip, a model may reach it only when it takes part again.)
    Returns how many joins had no other disturbance ``QUIET_S`` before and after them."""
    where = f"(seed {seed}: reproduce with run_schedule({seed}))"
    times = [t for t, _ in sim.journal.disturbances]

    def disturbed(start: float, end: float) -> bool:
        return any(start <= t <= end for t in times)

    stalls = [e for e in sim.journal.expiries
              if any(f"{c}:" in e[3] for c in ("joiner", "sat_out"))
              and not disturbed(e[0] - QUIET_S, e[0])]
    assert not stalls, f"deadlines waited in vain (joins at {sim.journal.joins}): {stalls} {where}"
    return sum(not disturbed(j - QUIET_S, j + QUIET_S) for j in sim.journal.joins)


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

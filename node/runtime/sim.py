"""Many nodes in one process: an in-memory network with a fake clock.

Each simulated node runs the daemon's own code: a real ``NodeCore`` (real keys, signed
envelopes, replay guard, round machine) and the real ``Executor`` (job order, guards,
compression, checkpoints, evaluation records, budget stops). Only I/O is replaced: sockets
by an event queue in simulated seconds, the worker thread by running each blocking call at
once and resuming its job after a simulated duration, the disk by an in-memory checkpoint
store (node.runtime.simparts), and training by a deterministic vector update. So a
50-node, 100-round run takes seconds and behaves the same way every time for a seed.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from node.common.compress import parse_codec
from node.common.health import Health
from node.common.state import SequenceCounter
from node.common.weights import to_tensors
from node.peers.core import NodeCore
from node.peers.handshake import socketless_hellos
from node.runtime.executor import Executor
from node.runtime.jobs import QueuedJob, advance, run_now
from node.runtime.simparts import MemoryCheckpoints, MemoryLog, SimEvents, VectorLearner
from node.trust.policy import TrustPolicy
from protocol.errors import ProtocolError
from protocol.gossip import federation_key
from protocol.identity import Identity, node_id_from_key
from protocol.rounds import PublishModel, RoundMachine, RoundTimeouts

FEDERATION = "sim"
#: Simulated seconds a blocking call of each kind takes (training: ``train_time``).
COSTS = {"aggregate": 0.01}


@dataclass(frozen=True)
class SimParams:
    """What every node of one simulation shares."""

    rounds: int
    timeouts: RoundTimeouts
    fanout: int
    fed_key: bytes
    seed: int
    wait_peers: int
    quorum: int
    compress: str


@dataclass
class SimNode:
    """One simulated node: its core, executor, learner, disk and what it saw."""

    index: int
    core: NodeCore
    executor: Executor
    learner: VectorLearner
    store: MemoryCheckpoints
    events: SimEvents
    health: Health
    alive: bool = True
    busy: bool = False
    aggregated: dict[int, bytes] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    epoch: int = 0  # bumped on crash so stale scheduled work is dropped
    #: When set, the node's next published model reaches only this many links, then the
    #: node crashes (an aggregator dying halfway through sending the model).
    crash_after_sending: int | None = None

    @property
    def key(self) -> bytes:
        return self.core.key

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.executor.weights

    @property
    def commits(self) -> dict[int, bytes]:
        """Round -> digest of every model this node applied (restarts included)."""
        return self.events.commits

    @property
    def notes(self) -> list[tuple[float, str, str]]:
        return self.events.notes

    @property
    def offline_steps(self) -> int:
        return self.core.machine.offline_steps


class Simulation:
    """An event-driven network of ``SimNode``s with latency, crashes and link cuts."""

    def __init__(
        self,
        n: int,
        *,
        rounds: int = 5,
        seed: int = 0,
        latency: tuple[float, float] = (0.005, 0.05),
        train_time: tuple[float, float] = (1.0, 3.0),
        timeouts: RoundTimeouts = RoundTimeouts(collect=30.0, model=45.0, start=10.0),
        wait_peers: int | None = None,
        quorum: int = 1,
        fanout: int = 4,
        announce_interval: float = 2.0,
        secret: bytes = b"simulated federation secret",
        heartbeat_interval: float | None = None,
        compress: str = "none",
        budget: int | None = None,
        late: int = 0,
    ) -> None:
        """``late``: the last ``late`` of the ``n`` nodes are left out at the start (not
        alive, not linked) until ``join`` brings each in."""
        self.announce_interval = announce_interval
        #: Heartbeats on every link (progress and anti-entropy, as the daemon sends them);
        #: off by default to keep large simulations cheap.
        self.heartbeat_interval = heartbeat_interval
        #: Every frame put on a link: (time, from index, to index, size).
        self.traffic: list[tuple[float, int, int, int]] = []
        self.rng = random.Random(seed)
        self.now = 0.0
        self.latency = latency
        self.train_time = train_time
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self.cut: set[frozenset[int]] = set()
        self.links: set[frozenset[int]] = set()
        self.nodes: list[SimNode] = []
        self._params = SimParams(rounds=rounds, timeouts=timeouts, fanout=fanout,
                                 fed_key=federation_key(secret, FEDERATION), seed=seed,
                                 wait_peers=n - 1 if wait_peers is None else wait_peers,
                                 quorum=quorum, compress=compress)
        for i in range(n):
            ident = Identity.from_seed(hashlib.sha256(f"{seed}/{i}".encode()).digest())
            self.nodes.append(self._node(i, ident, SequenceCounter(None),
                                         VectorLearner(i, budget=budget), MemoryCheckpoints(),
                                         SimEvents(lambda: self.now)))
        self.by_key = {node.key: node for node in self.nodes}
        for node in self.nodes[n - late:]:
            node.alive = False  # not started yet: ``join`` starts it
        self.late = {node.index for node in self.nodes[n - late:]}

    def _node(self, i: int, ident: Identity, seq: SequenceCounter, learner: VectorLearner,
              store: MemoryCheckpoints, events: SimEvents) -> SimNode:
        """A node as ``build_node`` makes one, restored from its (memory) disk."""
        p = self._params
        genesis = learner.initial_weights()
        machine = RoundMachine(
            self_key=ident.public_key, federation=FEDERATION, rounds_total=p.rounds,
            genesis=to_tensors(genesis), wait_peers=p.wait_peers, quorum=p.quorum,
            timeouts=p.timeouts)
        core = NodeCore(identity=ident, name=f"n{i}", federation=FEDERATION, port=0,
                        machine=machine, seq=seq, trust=TrustPolicy(federation_key=p.fed_key),
                        wall_ms=lambda: int(1_700_000_000_000 + self.now * 1000),
                        fanout=p.fanout, rng=random.Random(f"{p.seed}/{i}/{self.now}"),
                        member_timeout=3 * self.announce_interval)
        health = Health()
        core.peers.on_strike = lambda key, reason, cut: events.note(
            "member_cut_off" if cut else "member_refused", f"{node_id_from_key(key)}: {reason}")
        executor = Executor(core=core, learner=learner, checkpoints=store, round_log=MemoryLog(),
                            events=events, health=health, now=lambda: self.now,
                            wall=lambda: 1_700_000_000.0 + self.now,
                            codec=parse_codec(p.compress), genesis=genesis)
        executor.resume(store, max_size=core.max_message_size)
        return SimNode(i, core, executor, learner, store, events, health)

    def restart(self, i: int, peers: list[int] | None = None) -> None:
        """Bring a crashed node back as a restart would: same key, sequence counter and
        disk (its checkpoints), no links until they reconnect."""
        old = self.nodes[i]
        assert not old.alive, "crash it first"
        node = self._node(i, old.core.identity, old.core.seq, old.learner, old.store,
                          old.events)
        node.aggregated, node.rejected, node.epoch = old.aggregated, old.rejected, old.epoch + 1
        self.nodes[i] = node
        self.by_key[node.key] = node
        self._bring_up(node, peers)

    def join(self, i: int, peers: list[int] | None = None) -> None:
        """Start node ``i``, left out so far (``late``), linked to ``peers`` (default:
        every live node): a new member joining the running federation."""
        node = self.nodes[i]
        assert i in self.late and not node.alive, "only a late node joins, once"
        self.late.discard(i)
        node.alive = True
        self._bring_up(node, peers)

    def _bring_up(self, node: SimNode, peers: list[int] | None) -> None:
        for j in (peers if peers is not None else range(len(self.nodes))):
            if j != node.index and self.nodes[j].alive:
                self.connect(node.index, j)
        node.core.machine.start(self.now)
        self._drain(node)
        self.at(self.rng.uniform(0, self.announce_interval),
                lambda: self._announce_loop(node, node.epoch))
        if self.heartbeat_interval:
            self.at(self.rng.uniform(0, self.heartbeat_interval),
                    functools.partial(self._heartbeat_loop, node, node.epoch))

    def start_heartbeats(self, interval: float) -> None:
        """Start heartbeats on every link from now on (progress reports and anti-entropy,
        as the daemon sends them all along)."""
        started = self.heartbeat_interval is not None
        self.heartbeat_interval = interval
        if not started:
            for node in self.alive():
                self.at(self.rng.uniform(0, interval),
                        functools.partial(self._heartbeat_loop, node, node.epoch))

    # -- scheduling -------------------------------------------------------------------

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` ``delay`` simulated seconds from now."""
        heapq.heappush(self._queue, (self.now + delay, next(self._counter), fn))

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Process events up to simulated time ``until`` (or until ``stop()`` is true)."""
        while self._queue and self._queue[0][0] <= until:
            t, _, fn = heapq.heappop(self._queue)
            self.now = max(self.now, t)
            fn()
            if stop is not None and stop():
                return
        self.now = max(self.now, until)

    # -- topology ---------------------------------------------------------------------

    def start(self, full_mesh: bool = True) -> None:
        """Connect every pair (handshake included) and start every node."""
        if full_mesh:
            for a in range(len(self.nodes)):
                for b in range(a + 1, len(self.nodes)):
                    self.connect(a, b)
        for node in self.alive():
            node.core.machine.start(self.now)
            self._drain(node)
            self.at(self.rng.uniform(0, self.announce_interval),
                    functools.partial(self._announce_loop, node, node.epoch))
            if self.heartbeat_interval:
                self.at(self.rng.uniform(0, self.heartbeat_interval),
                        functools.partial(self._heartbeat_loop, node, node.epoch))

    def _heartbeat_loop(self, node: SimNode, epoch: int) -> None:
        """Each node sends a heartbeat on each of its links once per interval."""
        if not node.alive or node.epoch != epoch or not self.heartbeat_interval:
            return
        frame = bytes(node.core.heartbeat(node.core.machine.phase.value))
        for peer in self._linked(node):
            self._deliver(node, peer, frame)
        self.at(self.heartbeat_interval, lambda: self._heartbeat_loop(node, epoch))

    def _announce_loop(self, node: SimNode, epoch: int) -> None:
        """Each node announces itself and expires silent members once per interval."""
        if not node.alive or node.epoch != epoch:
            return
        node.core.announce(node.core.machine.phase.value)
        node.core.tick(self.now)
        self._drain(node)
        self.at(self.announce_interval, lambda: self._announce_loop(node, epoch))

    def connect(self, a: int, b: int) -> None:
        """Bring a link up with a real two-way hello exchange."""
        na, nb = self.nodes[a], self.nodes[b]
        if not (na.alive and nb.alive) or frozenset((a, b)) in self.links:
            return
        # the real hellos, with federation proofs bound to the link's ephemeral keys (the
        # simulation has no sockets, so no channel encrypts them)
        (_, msg_2, ends_a), (_, msg_3, ends_b) = socketless_hellos(na.core.handshake,
                                                                   nb.core.handshake)
        trust_b = na.core.handshake.admit(nb.key, msg_2, ends_a.ours)
        trust_a = nb.core.handshake.admit(na.key, msg_3, ends_b.ours)
        if trust_a is None or trust_b is None:
            na.core.peers.note_untrusted(nb.key, msg_2.name, f"sim:{b}", self.now)
            nb.core.peers.note_untrusted(na.key, msg_3.name, f"sim:{a}", self.now)
            return
        self.links.add(frozenset((a, b)))
        na.core.link_up(nb.key, msg_2, f"sim:{b}", trust_b, self.now)
        nb.core.link_up(na.key, msg_3, f"sim:{a}", trust_a, self.now)
        self._drain(na)
        self._drain(nb)

    def disconnect(self, a: int, b: int) -> None:
        """Take a link down; both ends notice at once (as with a closed TCP connection)."""
        if frozenset((a, b)) not in self.links:
            return
        self.links.discard(frozenset((a, b)))
        for x, y in ((a, b), (b, a)):
            node = self.nodes[x]
            if node.alive:
                node.core.link_down(self.nodes[y].key, self.now)
                self._drain(node)

    def crash(self, i: int) -> None:
        """Kill node ``i``: its links drop and its pending work is lost."""
        node = self.nodes[i]
        for link in [link for link in self.links if i in link]:
            (other,) = link - {i}
            self.disconnect(i, other)
        node.alive = False
        node.epoch += 1

    def silence(self, i: int, idle_timeout: float | None = None) -> None:
        """Node ``i`` stops doing anything but keeps its links up (a hung process).

        With ``idle_timeout``, its peers close their links to it after that many seconds
        of silence, as the daemon's transport does."""
        self.nodes[i].alive = False
        self.nodes[i].epoch += 1
        if idle_timeout is not None:

            def close_links() -> None:
                for j in range(len(self.nodes)):
                    if j != i:
                        self.disconnect(i, j)

            self.at(idle_timeout, close_links)

    def partition(self, side: set[int]) -> None:
        """Cut every link between ``side`` and the other nodes."""
        for link in [link for link in self.links if len(link & side) == 1]:
            self.disconnect(*link)

    def heal(self) -> None:
        """Link every pair of live nodes again."""
        for a in range(len(self.nodes)):
            for b in range(a + 1, len(self.nodes)):
                self.connect(a, b)

    # -- the driver: the executor's jobs, frames and deadlines ------------------------

    def _deliver(self, src: SimNode, dst: SimNode, frame: bytes | bytearray) -> None:
        if frozenset((src.index, dst.index)) not in self.links:
            return
        frame = bytes(frame)
        self.traffic.append((self.now, src.index, dst.index, len(frame)))
        epoch = dst.epoch

        def arrive() -> None:
            if not dst.alive or dst.epoch != epoch:
                return
            if frozenset((src.index, dst.index)) not in self.links:
                return
            try:
                dst.core.handle(src.key, frame, self.now)
            except ProtocolError as exc:
                dst.rejected.append(exc.reason)
            self._drain(dst)

        self.at(self.rng.uniform(*self.latency), arrive)

    def _linked(self, node: SimNode) -> list[SimNode]:
        return [self.nodes[j] for link in self.links if node.index in link
                for j in link if j != node.index]

    def _drain(self, node: SimNode) -> None:
        """As the daemon after every input: carry out the machine's actions, put frames
        on links, write checkpoints, start the next job, re-arm the deadline."""
        machine = node.core.machine
        node.executor.drain()
        for key in node.core.peers.take_drops():
            self.disconnect(node.index, self.by_key[key].index)
        for key, frame in node.core.take_sends():
            self._deliver(node, self.by_key[key], frame)
        if node.executor.checkpoints_pending():
            run_now(node.executor.write_checkpoints())
        self._pump(node)
        deadline = machine.next_deadline()
        if deadline is not None:
            epoch = node.epoch

            def fire() -> None:
                if node.alive and node.epoch == epoch:
                    machine.tick(self.now)
                    self._drain(node)

            self.at(max(0.0, deadline - self.now), fire)

    def _pump(self, node: SimNode) -> None:
        """Start the executor's next job unless one is running (one worker per node)."""
        if node.busy or not node.alive:
            return
        queued = node.executor.next_job()
        if queued is not None:
            node.busy = True
            self._advance(node, queued, node.epoch, first=True)

    def _advance(self, node: SimNode, queued: QueuedJob, epoch: int, result: object = None,
                 error: Exception | None = None, first: bool = False) -> None:
        """Resume a job; run its next blocking call now and come back after its cost."""
        if not node.alive or node.epoch != epoch:
            return
        try:
            call = advance(queued.job, result, error, first=first)
        except Exception as exc:  # noqa: BLE001 (the executor's failure policy decides)
            node.executor.job_failed(queued, exc)
            self._job_done(node, queued)
            return
        if call is None:
            node.executor.job_succeeded(queued)
            self._job_done(node, queued)
            return
        try:
            value, failure = call.fn(*call.args), None
        except Exception as exc:  # noqa: BLE001 (thrown into the job, as the daemon does)
            value, failure = None, exc
        cost = self.rng.uniform(*self.train_time) if call.kind == "train" else COSTS.get(
            call.kind, 0.0)
        self.at(cost, lambda: self._advance(node, queued, epoch, value, failure))

    def _job_done(self, node: SimNode, queued: QueuedJob) -> None:
        node.busy = False
        if isinstance(queued.action, PublishModel):
            model = queued.action.model
            node.aggregated[model.round] = model.digest
            if node.crash_after_sending is not None:
                sends = node.core.take_sends()
                for key, f in sends[: node.crash_after_sending]:
                    self._deliver(node, self.by_key[key], f)
                node.crash_after_sending = None
                # what was written to the sockets still arrives; then the node is gone
                node.epoch += 1  # it does nothing more meanwhile
                self.at(self.latency[1] * 1.01, lambda: self.crash(node.index))
                return
        self._drain(node)

    # -- views ------------------------------------------------------------------------

    def alive(self) -> list[SimNode]:
        """Nodes that have not crashed."""
        return [n for n in self.nodes if n.alive]

    def all_done(self, rounds: int) -> bool:
        """True when every live node that takes part has committed ``rounds`` rounds (a
        node stopped by its privacy budget no longer does)."""
        return all(n.core.machine.completed >= rounds for n in self.alive()
                   if n.executor.stopped_reason is None)

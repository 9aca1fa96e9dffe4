"""Many nodes in one process: an in-memory network with a fake clock.

Each simulated node is a real ``NodeCore`` (real keys, signed envelopes, replay guard,
round machine); only the sockets, threads and wall clock are replaced, by an event queue
in simulated seconds. Training is a deterministic vector update, so a 50-node, 100-round
run takes seconds and behaves the same way every time for a given seed.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.envelope import decode
from protocol.gossip import federation_key
from protocol.messages import Model
from protocol.rounds import (
    Aggregate,
    Average,
    Commit,
    Note,
    PublishModel,
    RoundMachine,
    RoundTimeouts,
    SendUpdate,
    ShareModel,
    StartTraining,
)
from protocol.tensors import weights_digest

from node.peers.core import NodeCore, TrustPolicy
from node.runtime.state import SequenceCounter
from node.runtime.weights import from_tensors, to_tensors

FEDERATION = "sim"


class VectorLearner:
    """A stand-in learner: each node pulls the model towards its own target vector."""

    def __init__(self, index: int, size: int = 8, num_examples: int = 100) -> None:
        rng = np.random.default_rng(index)
        self.target = rng.normal(size=size).astype(np.float32)
        self.size = size
        self.num_examples = num_examples

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {"w": np.zeros(self.size, np.float32), "b": np.zeros(2, np.float32)}

    def train(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        w = weights["w"] + 0.5 * (self.target - weights["w"])
        return {"w": w.astype(np.float32), "b": (weights["b"] + 1).astype(np.float32)}

    @staticmethod
    def aggregate(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
        total = sum(n for _, n in updates)
        return {
            k: (sum(w[k].astype(np.float64) * n for w, n in updates) / total).astype(np.float32)
            for k in updates[0][0]
        }


@dataclass
class SimNode:
    """One simulated node: its core, learner, current weights and what it committed."""

    index: int
    core: NodeCore
    learner: VectorLearner
    weights: dict[str, np.ndarray]
    alive: bool = True
    commits: dict[int, bytes] = field(default_factory=dict)
    aggregated: dict[int, bytes] = field(default_factory=dict)
    notes: list[tuple[float, str, str]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    offline_steps: int = 0
    epoch: int = 0  # bumped on crash so stale scheduled work is dropped
    #: When set, the node's next published model reaches only this many links, then the
    #: node crashes (an aggregator dying halfway through sending the model).
    crash_after_sending: int | None = None

    @property
    def key(self) -> bytes:
        return self.core.key


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
    ) -> None:
        self.announce_interval = announce_interval
        #: Heartbeats on every link (progress and anti-entropy, as the daemon sends them);
        #: off by default to keep large simulations cheap.
        self.heartbeat_interval = heartbeat_interval
        fed_key = federation_key(secret, FEDERATION)
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
        self._params = dict(rounds=rounds, timeouts=timeouts, fanout=fanout, fed_key=fed_key,
                            wait_peers=n - 1 if wait_peers is None else wait_peers, seed=seed,
                            quorum=quorum)
        for i in range(n):
            ident = Identity.from_seed(hashlib.sha256(f"{seed}/{i}".encode()).digest())
            learner = VectorLearner(i)
            genesis = learner.initial_weights()
            core = self._core(i, ident, SequenceCounter(None), genesis)
            self.nodes.append(SimNode(i, core, learner, genesis))
        self.by_key = {node.key: node for node in self.nodes}

    def _core(self, i: int, ident: Identity, seq: SequenceCounter,
              genesis: dict[str, np.ndarray], completed: int = 0,
              digest: bytes | None = None) -> NodeCore:
        p = self._params
        machine = RoundMachine(
            self_key=ident.public_key, federation=FEDERATION, rounds_total=p["rounds"],
            genesis=to_tensors(genesis), wait_peers=p["wait_peers"], quorum=p["quorum"],
            timeouts=p["timeouts"], completed=completed, model_digest=digest,
        )
        return NodeCore(identity=ident, name=f"n{i}", federation=FEDERATION, port=0,
                        machine=machine, seq=seq, trust=TrustPolicy(federation_key=p["fed_key"]),
                        wall_ms=lambda: int(1_700_000_000_000 + self.now * 1000),
                        fanout=p["fanout"], rng=random.Random(f"{p['seed']}/{i}/{self.now}"),
                        member_timeout=3 * self.announce_interval)

    def restart(self, i: int, peers: list[int] | None = None) -> None:
        """Bring a crashed node back as a restart would: same key and sequence counter
        (both on disk), the last checkpointed model, no links until they reconnect."""
        old = self.nodes[i]
        assert not old.alive, "crash it first"
        frame = old.core.latest_model_frame
        completed, digest, weights = 0, None, old.learner.initial_weights()
        if frame is not None:
            model = decode(frame).message
            assert isinstance(model, Model)
            completed, digest = model.round, model.digest
            weights = {k: np.array(v) for k, v in from_tensors(model.weights).items()}
        core = self._core(i, old.core.identity, old.core.seq, old.learner.initial_weights(),
                          completed, digest)
        core.latest_model_frame = frame
        node = SimNode(i, core, old.learner, weights, commits=old.commits,
                       aggregated=old.aggregated, notes=old.notes, rejected=old.rejected,
                       epoch=old.epoch + 1)
        self.nodes[i] = node
        self.by_key[node.key] = node
        for j in (peers if peers is not None else range(len(self.nodes))):
            if j != i and self.nodes[j].alive:
                self.connect(i, j)
        core.machine.start(self.now)
        self._drain(node)
        self.at(self.rng.uniform(0, self.announce_interval),
                lambda: self._announce_loop(node, node.epoch))

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
        for node in self.nodes:
            node.core.machine.start(self.now)
            self._drain(node)
            self.at(self.rng.uniform(0, self.announce_interval),
                    lambda node=node: self._announce_loop(node, node.epoch))
            if self.heartbeat_interval:
                self.at(self.rng.uniform(0, self.heartbeat_interval),
                        lambda node=node: self._heartbeat_loop(node, node.epoch))

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
        # the real three-hello handshake, with federation proofs bound to the challenges
        nonce_a, nonce_b = na.core.new_nonce(), nb.core.new_nonce()
        env_1, msg_1 = nb.core.accept_hello(bytes(na.core.hello(nonce_a)), None)
        env_2, msg_2 = na.core.accept_hello(bytes(nb.core.hello(nonce_b, echo=msg_1.nonce)),
                                            nonce_a)
        env_3, msg_3 = nb.core.accept_hello(bytes(na.core.hello(na.core.new_nonce(),
                                                                echo=msg_2.nonce)), nonce_b)
        trust_b = na.core.admit(nb.key, msg_2, nonce_a)
        trust_a = nb.core.admit(na.key, msg_3, nonce_b)
        if trust_a is None or trust_b is None:
            na.core.note_untrusted(nb.key, msg_2.name, f"sim:{b}", self.now)
            nb.core.note_untrusted(na.key, msg_3.name, f"sim:{a}", self.now)
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
            self.at(idle_timeout, lambda: [self.disconnect(i, j) for j in range(len(self.nodes))
                                           if j != i])

    def partition(self, side: set[int]) -> None:
        """Cut every link between ``side`` and the other nodes."""
        for link in [link for link in self.links if len(link & side) == 1]:
            self.disconnect(*link)

    def heal(self) -> None:
        """Link every pair of live nodes again."""
        for a in range(len(self.nodes)):
            for b in range(a + 1, len(self.nodes)):
                self.connect(a, b)

    # -- the driver -------------------------------------------------------------------

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
        machine = node.core.machine
        while actions := machine.take_actions():
            for action in actions:
                self._execute(node, action)
        for key, frame in node.core.take_sends():
            self._deliver(node, self.by_key[key], frame)
        deadline = machine.next_deadline()
        if deadline is not None:
            epoch = node.epoch

            def fire() -> None:
                if node.alive and node.epoch == epoch:
                    machine.tick(self.now)
                    self._drain(node)

            self.at(max(0.0, deadline - self.now), fire)

    def _execute(self, node: SimNode, action: object) -> None:
        machine = node.core.machine
        epoch = node.epoch
        if isinstance(action, StartTraining):
            base = node.weights

            def trained(r: int = action.round) -> None:
                if node.alive and node.epoch == epoch:
                    w = node.learner.train(base)
                    machine.training_done(r, to_tensors(w), node.learner.num_examples,
                                          0.0, 1.0, self.now)
                    self._drain(node)

            self.at(self.rng.uniform(*self.train_time), trained)
        elif isinstance(action, SendUpdate):
            node.core.send_to(action.to, node.core.frame(action.update))
        elif isinstance(action, ShareModel):
            frame = node.core.frame(action.share)
            for key in action.to:
                node.core.send_to(key, frame)
        elif isinstance(action, Average):
            shares = [(from_tensors(m.weights), m.num_examples) for m in action.models.values()]
            node.weights = node.learner.aggregate(shares)
            node.offline_steps += 1
            machine.average_done(action.round, action.step,
                                 weights_digest(to_tensors(node.weights)), self.now)
        elif isinstance(action, Aggregate):
            ups = [(from_tensors(u.weights), u.num_examples) for u in action.updates.values()]
            merged = node.learner.aggregate(ups)
            n = sum(c for _, c in ups)

            def aggregated(r: int = action.round, a: int = action.attempt) -> None:
                if node.alive and node.epoch == epoch:
                    machine.aggregation_done(r, a, to_tensors(merged), action.updates, n,
                                             self.now)
                    self._drain(node)

            self.at(0.01, aggregated)
        elif isinstance(action, PublishModel):
            frame = node.core.publish(action.model)
            node.aggregated[action.model.round] = action.model.digest
            node.core.spread_model(frame)
            if node.crash_after_sending is not None:
                sends = node.core.take_sends()
                for key, f in sends[: node.crash_after_sending]:
                    self._deliver(node, self.by_key[key], f)
                node.crash_after_sending = None
                # what was written to the sockets still arrives; then the node is gone
                node.epoch += 1  # it does nothing more meanwhile
                self.at(self.latency[1] * 1.01, lambda: self.crash(node.index))
        elif isinstance(action, Commit):
            node.weights = {k: np.array(v) for k, v in from_tensors(action.model.weights).items()}
            assert action.model.round not in node.commits, "two models applied for one round"
            node.commits[action.model.round] = action.model.digest
        elif isinstance(action, Note):
            node.notes.append((self.now, action.kind, action.detail))

    # -- views ------------------------------------------------------------------------

    def alive(self) -> list[SimNode]:
        """Nodes that have not crashed."""
        return [n for n in self.nodes if n.alive]

    def all_done(self, rounds: int) -> bool:
        """True when every live node has committed ``rounds`` rounds."""
        return all(n.core.machine.completed >= rounds for n in self.alive())

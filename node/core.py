"""The sans-IO heart of a node: identity, envelopes, replay protection and the round machine.

``NodeCore`` turns frames from a link into round-machine inputs and messages into signed
frames. It does no I/O itself; the asyncio daemon (node.daemon) and the in-memory
simulation (node.sim) both drive the same core, so what the simulation tests is what runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.envelope import DEFAULT_MAX_MESSAGE_SIZE, Envelope, ReplayGuard, decode, encode
from protocol.errors import ProtocolError
from protocol.identity import Identity, node_id_from_key
from protocol.messages import NONCE_LEN, Heartbeat, Hello, Message, Model, Update
from protocol.rounds import RoundMachine

from .state import SequenceCounter

log = logging.getLogger(__name__)


@dataclass
class PeerStats:
    """What this node knows about one member key."""

    name: str
    address: str = ""
    rounds: int = 0
    state: str = "unknown"
    last_seen: float = 0.0
    rtt_ms: float | None = None
    rejected: int = 0
    messages: int = 0


@dataclass
class Counters:
    """Traffic totals, for status and benchmarks."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)


class NodeCore:
    """Envelope handling and round logic for one node, without I/O."""

    def __init__(
        self,
        *,
        identity: Identity,
        name: str,
        federation: str,
        port: int,
        machine: RoundMachine,
        seq: SequenceCounter,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.identity = identity
        self.name = name
        self.federation = federation
        self.port = port
        self.machine = machine
        self.seq = seq
        self.max_message_size = max_message_size
        self.wall_ms = wall_ms
        self.replay = ReplayGuard()
        self.known: dict[bytes, PeerStats] = {}
        self.counters = Counters()
        #: The signed frame of the global model we hold, re-served to peers that are behind.
        self.latest_model_frame: bytes | None = None

    @property
    def key(self) -> bytes:
        """Our public key."""
        return self.identity.public_key

    # -- outgoing ---------------------------------------------------------------------

    def frame(self, message: Message) -> bytearray:
        """Sign ``message`` with the next sequence number."""
        return encode(self.identity, message, seq=self.seq.next(), ts_ms=self.wall_ms(),
                      federation=self.federation)

    def publish(self, model: Model) -> bytes:
        """Sign our global model; it becomes the frame we re-serve for catch-up."""
        frame = bytes(self.frame(model))
        self.latest_model_frame = frame
        return frame

    def hello(self, nonce: bytes, echo: bytes = b"") -> bytearray:
        """Our handshake message: ``nonce`` challenges the peer, ``echo`` answers it."""
        return self.frame(Hello(
            name=self.name, nonce=nonce, echo=echo, port=self.port,
            genesis=self.machine.genesis_digest, round=self.machine.completed,
        ))

    def heartbeat(self, state: str, echo_ts: int = 0) -> bytearray:
        """A heartbeat carrying our progress and a timestamp for RTT."""
        return self.frame(Heartbeat(round=self.machine.completed, state=state,
                                    ping_ts=self.wall_ms(), echo_ts=echo_ts))

    @staticmethod
    def new_nonce() -> bytes:
        """A fresh handshake challenge."""
        return os.urandom(NONCE_LEN)

    # -- incoming ---------------------------------------------------------------------

    def decode(self, frame: bytes | bytearray | memoryview) -> Envelope:
        """Decode and verify one frame (ProtocolError if bad).

        Touches no state, so the daemon may run it on a worker thread for large frames;
        freshness is checked by ``dispatch`` on the event loop.
        """
        env = decode(frame, max_size=self.max_message_size)
        if env.federation != self.federation:
            raise ProtocolError(f"federation {env.federation!r:.40} is not ours")
        if env.sender == self.key:
            raise ProtocolError("a message signed with our own key")
        return env

    def check_fresh(self, env: Envelope) -> None:
        """Replay and timestamp checks (ProtocolError if the frame is not fresh)."""
        if not isinstance(env.message, Model):
            # Models are idempotent by round (at most one per round, only rounds above
            # ours), so a signed model may be relayed or re-served for catch-up at any time.
            self.replay.check(env, self.wall_ms())

    def accept_hello(self, frame: bytes, our_nonce: bytes | None) -> tuple[Envelope, Hello]:
        """Check a peer's hello; when we challenged it, it must echo ``our_nonce``."""
        env = self.decode(frame)
        self.check_fresh(env)
        msg = env.message
        if not isinstance(msg, Hello):
            raise ProtocolError(f"expected hello, got {env.type}")
        if our_nonce is not None and msg.echo != our_nonce:
            raise ProtocolError("hello does not answer our challenge")
        if msg.genesis != self.machine.genesis_digest:
            raise ProtocolError("peer trains another model (genesis hash differs:"
                                " check --dataset, --model and --seed)")
        return env, msg

    def peer_joined(self, key: bytes, hello: Hello, address: str, now: float) -> None:
        """Record a member whose handshake completed and tell the machine."""
        stats = self.known.setdefault(key, PeerStats(name=hello.name))
        stats.name, stats.address, stats.rounds = hello.name, address, hello.round
        stats.state, stats.last_seen = "connected", now
        self.machine.peer_up(key, now, round=hello.round)

    def peer_left(self, key: bytes, now: float) -> None:
        """A member's link went down."""
        if key in self.known:
            self.known[key].state = "gone"
        self.machine.peer_down(key, now)

    def handle(self, link_key: bytes, frame: bytes | bytearray | memoryview,
               now: float) -> Envelope:
        """Decode and dispatch one frame received on the link of ``link_key``."""
        return self.dispatch(link_key, self.decode(frame), frame, now)

    def dispatch(self, link_key: bytes, env: Envelope, frame: bytes | bytearray | memoryview,
                 now: float) -> Envelope:
        """Feed a decoded frame from the link of ``link_key`` to the round machine.

        Raises ProtocolError for anything a peer got wrong; the caller logs it and lowers
        the peer's score. The machine's actions are left in ``machine.outbox``.
        """
        self.counters.bytes_received += len(frame)
        self.counters.messages_received += 1
        self.check_fresh(env)
        msg = env.message
        if link_key not in self.known:
            raise ProtocolError("message on a link without a handshake")
        if not isinstance(msg, Model) and env.sender != link_key:
            raise ProtocolError("direct message signed by another key than the link's")
        # A model keeps its aggregator's signature when a member re-serves it (catch-up),
        # so its signer need not be linked to us, or even still be alive.
        stats = self.known.get(env.sender)
        if stats is not None:
            stats.last_seen = now
            stats.messages += 1
        if isinstance(msg, Heartbeat):
            assert stats is not None
            stats.rounds, stats.state = msg.round, msg.state
            if msg.echo_ts:
                stats.rtt_ms = max(0.0, float(self.wall_ms() - msg.echo_ts))
            self.machine.peer_status(env.sender, now, round=msg.round, state=msg.state)
        elif isinstance(msg, Update):
            self.machine.on_update(env.sender, msg, now)
        elif isinstance(msg, Model):
            before = self.machine.completed
            self.machine.on_model(env.sender, msg, now)
            if self.machine.completed == msg.round and self.machine.completed != before:
                self.latest_model_frame = bytes(frame)
        elif isinstance(msg, Hello):
            raise ProtocolError("hello after the handshake")
        return env

    def reject(self, key: bytes | None, reason: str) -> None:
        """Count a rejected frame against its link's peer."""
        self.counters.rejected += 1
        short = reason.split(" (")[0][:60]
        self.counters.rejected_reasons[short] = self.counters.rejected_reasons.get(short, 0) + 1
        if key is not None and key in self.known:
            self.known[key].rejected += 1

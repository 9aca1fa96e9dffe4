"""The sans-IO heart of a node: identity, trust, envelopes, membership, gossip and rounds.

``NodeCore`` turns frames from links into round-machine inputs, and the machine's
messages into frames for links (``take_sends``). It does no I/O itself: the asyncio
daemon (node.runtime.supervisor) and the in-memory simulation (node.runtime.sim) drive
the same core, so what the simulation tests is what runs.

Trust (node.trust.policy): only trusted keys become members; nothing else is accepted
from or sent to anyone else. What members send is checked first (node.peers.checks).

Membership (node.peers.membership): direct links, plus members learnt from signed,
gossiped ``announce`` messages (reached through relays). Gossip: broadcasts travel as ``relay`` frames that
every node forwards at most once (seen-cache), to at most ``fanout`` peers, while the
hop budget (``ttl``) lasts; updates for an aggregator without a direct link are routed
through a neighbour that announces a link to it, or gossiped towards it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from node.common.compress import decode_delta
from node.common.state import SequenceCounter
from node.peers.checks import check_finite, has_evidence
from node.peers.handshake import Handshake
from node.peers.membership import PeerTable
from node.peers.peerstats import Counters, PeerStats
from node.trust.policy import TrustPolicy
from protocol.envelope import DEFAULT_MAX_MESSAGE_SIZE, Envelope, ReplayGuard, decode, encode
from protocol.errors import ProtocolError
from protocol.gossip import (
    DEFAULT_FANOUT,
    DEFAULT_TTL,
    SeenCache,
    choose_fanout,
    frame_id,
)
from protocol.identity import Identity, node_id_from_key
from protocol.messages import (
    Announce,
    Delta,
    Genesis,
    GenesisRequest,
    Heartbeat,
    Hello,
    Message,
    Model,
    Relay,
    Share,
    Update,
)
from protocol.rounds import RoundMachine
from protocol.tensors import Tensor

log = logging.getLogger(__name__)

#: A peer that still reports being behind is served our model again after this long.
RESERVE_S = 5.0
#: A member gets the genesis model at most this often (it is a whole model).
GENESIS_INTERVAL_S = 60.0
#: Bytes a relay adds around the frame it carries (envelope fields, ttl, to, headers).
RELAY_OVERHEAD = 1024


class NodeCore:
    """Trust, envelopes, membership, gossip and round logic for one node, without I/O."""

    def __init__(
        self,
        *,
        identity: Identity,
        name: str,
        federation: str,
        port: int,
        machine: RoundMachine,
        seq: SequenceCounter,
        trust: TrustPolicy | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        fanout: int = DEFAULT_FANOUT,
        ttl: int = DEFAULT_TTL,
        member_timeout: float = 6.0,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.name = name
        self.federation = federation
        self.port = port
        self.machine = machine
        self.seq = seq
        self.trust = trust or TrustPolicy()
        self.max_message_size = max_message_size
        self.wall_ms = wall_ms
        self.fanout = fanout
        self.ttl = ttl
        self.rng = rng or random.Random()
        self.replay = ReplayGuard()
        #: Frames processed, and frames forwarded (a model first received directly may
        #: still need forwarding when its relayed copy arrives).
        self.seen = SeenCache()
        self.forwarded = SeenCache()
        #: Who we know of, who is linked, who is a member (node.peers.membership).
        self.peers = PeerTable(machine, self.trust, member_timeout)
        self.known: dict[bytes, PeerStats] = self.peers.known
        self.links: set[bytes] = self.peers.links
        self.addresses: tuple[str, ...] = ()
        self.counters = Counters()
        self._sends: list[tuple[bytes, bytes | bytearray]] = []
        #: The genesis model's tensors, served to a member that asks (a node that cannot
        #: build it itself); None: not served.
        self.genesis: list[Tensor] | None = None
        #: The signed frame of the global model we hold, re-served to peers that are behind.
        self.latest_model_frame: bytes | None = None
        #: Its aggregator: when that one goes down, we re-serve its model to our links
        #: (it may have died having sent it to only some of us).
        self.latest_model_aggregator: bytes | None = None
        #: The hellos inside a link's channel, and admission (node.peers.handshake).
        self.handshake = Handshake(self)
        self._credential = self.trust.credential(federation, identity.public_key)

    @property
    def key(self) -> bytes:
        """Our public key."""
        return self.identity.public_key

    def take_sends(self) -> list[tuple[bytes, bytes | bytearray]]:
        """Frames to put on links: (link key, frame), in order."""
        out, self._sends = self._sends, []
        return out

    def _send(self, link: bytes, frame: bytes | bytearray) -> None:
        self._sends.append((link, frame))

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

    def heartbeat(self, state: str, echo_ts: int = 0) -> bytearray:
        """A heartbeat carrying our progress and a timestamp for RTT."""
        return self.frame(Heartbeat(round=self.machine.completed, state=state,
                                    ping_ts=self.wall_ms(), echo_ts=echo_ts))

    def announce(self, state: str) -> None:
        """Gossip our announcement (addresses, links, progress) to the mesh."""
        frame = self.frame(Announce(
            name=self.name, addresses=self.addresses, links=tuple(sorted(self.links)),
            round=self.machine.completed, state=state, credential=self._credential,
        ))
        self.broadcast(frame)

    def broadcast(self, frame: bytes | bytearray) -> None:
        """Gossip a frame we signed to up to ``fanout`` linked members."""
        self.seen.add(frame_id(frame))
        self.forwarded.add(frame_id(frame))
        wrapped = self.frame(Relay(ttl=self.ttl, to=b"", frame=bytes(frame)))
        for link in choose_fanout(self.rng, self.links, self.fanout):
            self._send(link, wrapped)

    def spread_model(self, frame: bytes | bytearray) -> None:
        """Deliver a global model we signed to every member.

        Directly linked members get it on their link (they are waiting for it); members
        reached only through relays get it by gossip, which is only started when there are
        such members, so a full mesh never pays for duplicate copies of a large model.
        """
        self.seen.add(frame_id(frame))
        for link in sorted(self.links):
            self._send(link, frame)
        if any(st.member and k not in self.links for k, st in self.known.items()):
            self.broadcast(frame)

    def send_to(self, to: bytes, frame: bytes | bytearray) -> bool:
        """Deliver a frame to ``to``: on its link, else relayed. False if no route."""
        if to in self.links:
            self._send(to, frame)
            return True
        if not self.links:
            return False
        self.seen.add(frame_id(frame))
        self.forwarded.add(frame_id(frame))
        wrapped = self.frame(Relay(ttl=self.ttl, to=to, frame=bytes(frame)))
        for link in self._towards(to, exclude=()):
            self._send(link, wrapped)
        return True

    def _towards(self, to: bytes, exclude: tuple[bytes, ...]) -> list[bytes]:
        """Links to forward a routed frame on: the destination itself, else neighbours
        that announce a link to it, else a gossip fan-out."""
        if to in self.links:
            return [to]
        via = [k for k in self.links if k not in exclude and to in self.known.get(
            k, PeerStats("")).links]
        if via:
            return choose_fanout(self.rng, via, self.fanout)
        return choose_fanout(self.rng, self.links, self.fanout, exclude=exclude)

    def serve_model(self, link: bytes, now: float | None = None, again: bool = False) -> None:
        """Re-serve the global model we hold to a linked peer that is behind, once per
        round; ``again`` (the peer still reports being behind), once more every
        ``RESERVE_S``: it may have deferred the model until others vouched for its round
        (node.peers.checks). The aggregator's signed frame travels in a relay to it."""
        st = self.known.get(link)
        frame = self.latest_model_frame
        if frame is None or st is None:
            return
        if st.served_round >= self.machine.completed and not (
                again and now is not None and now - st.served_at >= RESERVE_S):
            return
        st.served_round = self.machine.completed
        st.served_at = now if now is not None else st.served_at
        self._send(link, self.frame(Relay(ttl=0, to=link, frame=frame)))

    def _serve_genesis(self, sender: bytes, link: bytes | None, now: float) -> None:
        """Answer a linked member's genesis_request, at most once a minute per member."""
        st = self.known.get(sender)
        if link is None or st is None or not st.member:
            raise ProtocolError("genesis_request not from a linked member")
        if self.genesis is None:
            raise ProtocolError("this node does not serve the genesis model")
        if now - st.genesis_at < GENESIS_INTERVAL_S:
            raise ProtocolError("genesis_request again within a minute")
        st.genesis_at = now
        self._send(link, self.frame(Genesis(self.genesis)))

    # -- trust and links --------------------------------------------------------------

    def decode(self, frame: bytes | bytearray | memoryview, *, carried: bool = False
               ) -> Envelope:
        """Decode and verify one frame (ProtocolError if bad).

        Touches no state, so the daemon may run it on a worker thread for large frames;
        freshness is checked by ``dispatch`` on the event loop.
        """
        # A relay wraps a frame of up to the cap, so the outer frame may be a little larger.
        limit = self.max_message_size + (0 if carried else RELAY_OVERHEAD)
        env = decode(frame, max_size=limit)
        if env.federation != self.federation:
            raise ProtocolError(f"federation {env.federation!r:.40} is not ours")
        # Our own model may come back to us for catch-up (after a restart we lost it).
        if env.sender == self.key and not (carried and isinstance(env.message, Model)):
            raise ProtocolError("a message signed with our own key")
        return env

    def check_fresh(self, env: Envelope) -> None:
        """Replay and timestamp checks (ProtocolError if the frame is not fresh)."""
        if not isinstance(env.message, Model):
            # Models are idempotent by round (at most one per round, only rounds above
            # ours), so a signed model may be relayed or re-served for catch-up at any time.
            self.replay.check(env, self.wall_ms())

    def link_up(self, key: bytes, hello: Hello, address: str, trust: str, now: float) -> None:
        """A trusted peer's link is up (handshake and admission done)."""
        self.peers.up(key, hello.name, hello.round, address, trust, now)
        # A peer that is behind gets the signed global model we hold (catch-up).
        if hello.round < self.machine.completed:
            self.serve_model(key, now)

    def link_down(self, key: bytes, now: float) -> None:
        """A peer's link went down (it may stay a member through relays)."""
        self.peers.down(key, now)
        if key == self.latest_model_aggregator:
            # The aggregator of the model we hold is gone: if it died sending it, the
            # peers it did not reach get it from us (once per round and link).
            self.latest_model_aggregator = None
            for link in sorted(self.links):
                self.serve_model(link, now)

    def tick(self, now: float) -> None:
        """Expire relayed members whose announcements stopped."""
        self.peers.expire(now)

    # -- incoming ---------------------------------------------------------------------

    def handle(self, link_key: bytes, frame: bytes | bytearray | memoryview,
               now: float) -> Envelope:
        """Decode and dispatch one frame received on the link of ``link_key``."""
        return self.dispatch(link_key, self.decode(frame), frame, now)

    def dispatch(self, link_key: bytes, env: Envelope, frame: bytes | bytearray | memoryview,
                 now: float) -> Envelope:
        """Feed a decoded frame from the link of ``link_key`` to the node.

        Raises ProtocolError for anything a peer got wrong; the caller logs it and lowers
        the peer's score. The machine's actions are left in ``machine.outbox`` and frames
        to send in ``take_sends()``.
        """
        self.counters.bytes_received += len(frame)
        self.counters.messages_received += 1
        if link_key not in self.links:
            raise ProtocolError("message on a link that is not an admitted member's")
        if env.sender != link_key:
            raise ProtocolError("direct message signed by another key than the link's")
        self.check_fresh(env)
        st = self.known[link_key]
        st.last_seen = now
        st.messages += 1
        msg = env.message
        if isinstance(msg, Relay):
            self._on_relay(link_key, msg, now)
        else:
            if isinstance(msg, Model):
                self.seen.add(frame_id(frame))  # a relayed copy arriving later is a duplicate
            self._deliver(env, bytes(frame) if isinstance(msg, Model) else frame, now,
                          link=link_key)
        return env

    def _deliver(self, env: Envelope, frame: bytes | bytearray | memoryview, now: float,
                 link: bytes | None) -> None:
        """Act on a message from ``env.sender`` (direct when ``link`` is its link)."""
        msg = env.message
        st = self.known.get(env.sender)
        if isinstance(msg, Heartbeat):
            if link is None or st is None:
                raise ProtocolError("heartbeats are not relayed")
            st.rounds, st.state = msg.round, msg.state
            if msg.echo_ts:
                st.rtt_ms = max(0.0, float(self.wall_ms() - msg.echo_ts))
            self.machine.peer_status(env.sender, now, round=msg.round, state=msg.state)
            # Anti-entropy: a neighbour that is behind gets our model, once per round.
            if msg.round < self.machine.completed:
                self.serve_model(env.sender, now, again=True)
        elif isinstance(msg, Announce):
            self._on_announce(env.sender, msg, now)
        elif isinstance(msg, Update | Delta):
            if st is None or not st.member:
                raise ProtocolError(f"update from {node_id_from_key(env.sender)},"
                                    " not a member")
            self._checked(env.sender, now, lambda: decode_delta(msg, self.machine.spec)
                          if isinstance(msg, Delta) else check_finite(msg.weights, "update"))
            if msg.round <= self.machine.completed:
                # Late: that round is over here. Its sender missed the model (say the
                # aggregator died after sending it to only some): hand it over.
                self._serve_late(env.sender)
            self.machine.on_update(env.sender, msg, now)
        elif isinstance(msg, Share):
            if st is None or not st.member:
                raise ProtocolError(f"share from {node_id_from_key(env.sender)}, not a member")
            self._checked(env.sender, now, lambda: check_finite(msg.weights, "share"))
            self.machine.on_share(env.sender, msg, now)
        elif isinstance(msg, Model):
            self._on_model(env.sender, msg, frame, now)
        elif isinstance(msg, GenesisRequest):
            self._serve_genesis(env.sender, link, now)
        elif isinstance(msg, Hello):
            raise ProtocolError("hello after the handshake")
        elif isinstance(msg, Relay):
            raise ProtocolError("a relay inside a relay")
        else:
            raise ProtocolError(f"{env.type} is not accepted on a peer link")

    def _on_model(self, sender: bytes, msg: Model, frame: bytes | bytearray | memoryview,
                  now: float) -> None:
        st = self.known.get(sender)
        # A model keeps its aggregator's signature when a member re-serves or relays
        # it, so its signer need not be linked to us, known, or even still alive. It
        # always reaches us over a trusted member's link, and any member could publish
        # a model under its own key anyway, so the relayer's trust is what counts.
        if st is not None:
            st.last_seen = now
        if msg.round > self.machine.completed:
            self._checked(sender, now, lambda: check_finite(msg.weights, "model"))
            if not has_evidence(self.machine, msg):
                # A catch-up model nobody else vouches for (yet): members that hold the
                # federation's model serve it again while we report being behind.
                self.seen.discard(frame_id(frame))
                log.debug("model of round %d deferred: no evidence yet that the"
                          " federation reached it", msg.round)
                return
        before = self.machine.completed
        self.machine.on_model(sender, msg, now)
        if self.machine.completed == msg.round and self.machine.completed != before:
            self.latest_model_frame = bytes(frame)
            self.latest_model_aggregator = msg.aggregator
        elif msg.round > self.machine.completed:
            # Deferred (we were below quorum): taken when it is served again.
            self.seen.discard(frame_id(frame))

    def _checked(self, sender: bytes, now: float, check: Callable[[], object]) -> None:
        """Run ``check`` on what ``sender`` signed; a failure is a strike against it
        (``PeerTable.refuse``) and a ProtocolError."""
        try:
            check()
        except ProtocolError as exc:
            if sender != self.key:
                self.peers.refuse(sender, exc.reason, now)
            raise

    def _serve_late(self, key: bytes) -> None:
        """A late update proves its sender lacks our model (it may have deferred it while
        below quorum): serve it again, whatever was served before. A member sends at most
        one update per aggregator it tries, so this is bounded by its deadlines."""
        st = self.known.get(key)
        if st is None:
            return
        st.served_round = -1
        if key in self.links:
            self.serve_model(key)
            return
        frame = self.latest_model_frame
        if frame is not None:
            st.served_round = self.machine.completed
            self.send_to(key, frame)

    def _on_announce(self, sender: bytes, msg: Announce, now: float) -> None:
        trust = self.trust.by_credential(self.federation, sender, msg.credential)
        if trust is None or self.peers.banned(sender):
            # Someone our neighbour trusts and we do not (pairing is pairwise): not an
            # error of the neighbour's, so nothing is counted against its link.
            self.peers.note_untrusted(sender, msg.name, msg.addresses[0] if msg.addresses else "",
                                now)
            return
        st = self.peers.stats(sender, msg.name)
        st.name, st.addresses, st.links = msg.name, msg.addresses, msg.links
        st.rounds, st.state = msg.round, msg.state
        st.last_announce, st.last_seen = now, now
        if not st.trusted:
            st.trusted, st.trust = True, trust
        if sender not in self.links and not st.address and msg.addresses:
            st.address = msg.addresses[0]
        self.peers.set_member(sender, self.peers.reachable(sender, now), now)
        if st.member:
            self.machine.peer_status(sender, now, round=msg.round, state=msg.state)
            if sender in self.links and msg.round < self.machine.completed:
                self.serve_model(sender, now, again=True)  # anti-entropy, as for heartbeats

    def _on_relay(self, link: bytes, relay: Relay, now: float) -> None:
        inner = relay.frame
        fid = frame_id(inner)
        if relay.to not in (b"", self.key) and fid in self.forwarded:
            self.counters.duplicates += 1
            return  # a routed frame for another node, already passed on
        fresh = fid not in self.seen
        if not fresh and (fid in self.forwarded or relay.to == self.key or relay.ttl == 0):
            self.counters.duplicates += 1
            return  # already handled: never processed or forwarded twice
        # Verify what we carry before acting on it or passing it on: garbage stops here.
        env = self.decode(inner, carried=True)
        if fresh and relay.to in (b"", self.key):
            self.seen.add(fid)
            try:
                self.check_fresh(env)
                self._deliver(env, inner, now, link=None)
            except ProtocolError:
                self.forwarded.add(fid)  # what we refuse, we never pass on
                raise
        if relay.to != self.key and relay.ttl > 0 and self.forwarded.add(frame_id(inner)):
            self.counters.relayed += 1
            wrapped = self.frame(Relay(ttl=relay.ttl - 1, to=relay.to, frame=inner))
            exclude = (link, env.sender)
            if relay.to:
                targets = self._towards(relay.to, exclude=exclude)
            else:
                targets = choose_fanout(self.rng, self.links, self.fanout, exclude=exclude)
            for target in targets:
                self._send(target, wrapped)

    def reject(self, key: bytes | None, reason: str) -> None:
        """Count a rejected frame (by kind: bounded) against its link's peer."""
        self.counters.count_reject(reason, node_id_from_key(key) if key else None,
                                   self.wall_ms() / 1000)
        if key is not None and key in self.known:
            self.known[key].rejected += 1

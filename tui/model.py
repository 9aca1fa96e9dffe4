"""What the dashboard knows about a node, built from the node's messages (no I/O, no widgets).

The node's messages follow the control-plane contract (``GET /api/status``, the WebSocket
events); a :class:`DataSource` also sends ``{"type": "connection", ...}`` when the link
to the node comes and goes. :class:`Dashboard` folds them, one at a time, into frozen
values that widgets display. Every parser tolerates missing keys, extra keys and values of
the wrong type: a field it cannot read is shown as unknown rather than breaking the screen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


def _text(value: object, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _round_of(data: Mapping[str, Any]) -> str:
    number = _count(data.get("round"))
    return "?" if number is None else str(number)


def short_id(node_id: str) -> str:
    """The first two groups of a node id (``ABCD-EFGH``), enough to tell peers apart."""
    return node_id[:9]


@dataclass(frozen=True)
class Resources:
    """The node process's use of the machine (``status.resources``)."""

    cpu_percent: float | None = None
    memory_rss: int | None = None
    net_bytes_sent: int | None = None
    net_bytes_recv: int | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Resources:
        """Read ``status.resources``; unknown fields stay None."""
        return cls(cpu_percent=_number(data.get("cpu_percent")),
                   memory_rss=_count(data.get("memory_rss")),
                   net_bytes_sent=_count(data.get("net_bytes_sent")),
                   net_bytes_recv=_count(data.get("net_bytes_recv")))


@dataclass(frozen=True)
class Privacy:
    """Differential-privacy budget spent so far (``status.privacy``)."""

    epsilon: float
    delta: float | None = None
    target_epsilon: float | None = None

    @classmethod
    def parse(cls, data: object) -> Privacy | None:
        """Read ``status.privacy``; None when privacy is off or epsilon is unknown."""
        fields = _mapping(data)
        epsilon = _number(fields.get("epsilon"))
        if epsilon is None:
            return None
        return cls(epsilon=epsilon, delta=_number(fields.get("delta")),
                   target_epsilon=_number(fields.get("target_epsilon")))


@dataclass(frozen=True)
class NodeStatus:
    """The node's own state: identity, training progress, resources (the status object)."""

    node_id: str = ""
    name: str = ""
    federation: str = ""
    state: str = ""
    mode: str = ""
    is_aggregator: bool = False
    aggregator: str | None = None
    round: int = 0
    rounds_total: int | None = None
    current_round: int | None = None
    attempt: int | None = None
    quorum_have: int | None = None
    quorum_need: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    uptime_s: float | None = None
    resources: Resources | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    privacy: Privacy | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> NodeStatus:
        """Read a status object (``GET /api/status``, ``hello``, ``status_update``)."""
        quorum = _mapping(data.get("quorum"))
        traffic = _mapping(data.get("traffic"))
        resources = data.get("resources")
        aggregator = data.get("aggregator")
        return cls(
            node_id=_text(data.get("node_id")),
            name=_text(data.get("name")),
            federation=_text(data.get("federation")),
            state=_text(data.get("state")),
            mode=_text(data.get("mode")),
            is_aggregator=data.get("is_aggregator") is True,
            aggregator=aggregator if isinstance(aggregator, str) else None,
            round=_count(data.get("round")) or 0,
            rounds_total=_count(data.get("rounds_total")),
            current_round=_count(data.get("current_round")),
            attempt=_count(data.get("attempt")),
            quorum_have=_count(quorum.get("have")),
            quorum_need=_count(quorum.get("need")),
            accuracy=_number(data.get("accuracy")),
            loss=_number(data.get("loss")),
            uptime_s=_number(data.get("uptime_s")),
            resources=Resources.parse(resources) if isinstance(resources, Mapping) else None,
            bytes_sent=_count(traffic.get("bytes_sent")),
            bytes_received=_count(traffic.get("bytes_received")),
            privacy=Privacy.parse(data.get("privacy")),
        )


@dataclass(frozen=True)
class Peer:
    """One row of the peers table (an entry of ``status.peers``)."""

    node_id: str
    name: str = ""
    state: str = ""
    trust: str = ""
    round: int | None = None
    rtt_ms: float | None = None
    links: tuple[str, ...] = ()

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Peer | None:
        """Read a peer object; None when it has no node id."""
        node_id = _text(data.get("node_id"))
        if not node_id:
            return None
        trust = _text(data.get("trust"))
        if not trust and isinstance(data.get("trusted"), bool):
            trust = "yes" if data["trusted"] else "no"
        links = data.get("links")
        return cls(node_id=node_id, name=_text(data.get("name")),
                   state=_text(data.get("state")), trust=trust,
                   round=_count(data.get("round")), rtt_ms=_number(data.get("rtt_ms")),
                   links=tuple(x for x in links if isinstance(x, str))
                   if isinstance(links, list) else ())


@dataclass(frozen=True)
class RoundRecord:
    """What the node recorded for one completed round (``metrics_update`` data)."""

    round: int
    accuracy: float | None = None
    loss: float | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> RoundRecord | None:
        """Read a round record; None when it has no round number."""
        number = _count(data.get("round"))
        if number is None:
            return None
        return cls(round=number, accuracy=_number(data.get("accuracy")),
                   loss=_number(data.get("loss")))


@dataclass(frozen=True)
class Connection:
    """The TUI's link to the node: ``connected`` is None until the first attempt ends."""

    connected: bool | None = None
    error: str | None = None
    retry_in: float | None = None


@dataclass(frozen=True)
class LogLine:
    """One line of the event log."""

    ts: float
    kind: str
    detail: str


@dataclass(frozen=True)
class TopologyRow:
    """A node of the topology drawing and the names of the nodes it is linked to."""

    name: str
    links: tuple[str, ...]
    is_self: bool = False


#: Peer states in which this node has a direct link to the peer (contract: "connected").
DIRECT_STATES = frozenset({"connected"})


class Dashboard:
    """Everything the TUI shows, updated by :meth:`apply` one message at a time."""

    def __init__(self) -> None:
        self.status = NodeStatus()
        self.peers: dict[str, Peer] = {}
        self.rounds: dict[int, RoundRecord] = {}
        self.connection = Connection()

    def apply(self, message: Mapping[str, Any], now: float) -> list[LogLine]:
        """Fold one message in; return the lines it adds to the event log.

        ``now`` stamps lines whose message carries no ``ts``. Unknown message types and
        malformed data change nothing.
        """
        kind = _text(message.get("type"))
        data = _mapping(message.get("data"))
        ts = _number(message.get("ts")) or now
        if kind in ("hello", "status_update"):
            if isinstance(message.get("data"), Mapping):
                self._apply_status(data)
        elif kind == "metrics_update":
            record = RoundRecord.parse(data)
            if record is not None:
                self.rounds[record.round] = record
        elif kind == "peer_joined":
            return self._peer_joined(data, ts)
        elif kind == "peer_left":
            return self._peer_left(data, ts)
        elif kind == "connection":
            return self._connection(data, ts)
        elif kind == "event":
            return [LogLine(ts, _text(data.get("kind"), "event"), _text(data.get("detail")))]
        elif kind == "round_completed":
            return [LogLine(ts, "round", self._round_completed_text(data))]
        elif kind == "training_started":
            return [LogLine(ts, "training", f"started round {_round_of(data)}")]
        elif kind == "training_stopped":
            reason = _text(data.get("reason"))
            return [LogLine(ts, "training", f"stopped in round {_round_of(data)}"
                            + (f": {reason}" if reason else ""))]
        return []

    def _apply_status(self, data: Mapping[str, Any]) -> None:
        status = NodeStatus.parse(data)
        if self.status.node_id and status.node_id and status.node_id != self.status.node_id:
            # Another node answers at this address now: what we knew was about the old one.
            self.peers.clear()
            self.rounds.clear()
        self.status = status
        peers = data.get("peers")
        if isinstance(peers, list):
            parsed = (Peer.parse(p) for p in peers if isinstance(p, Mapping))
            self.peers = {p.node_id: p for p in parsed if p is not None}

    def _peer_joined(self, data: Mapping[str, Any], ts: float) -> list[LogLine]:
        node_id = _text(data.get("node_id"))
        if not node_id:
            return []
        name = _text(data.get("name"))
        if node_id not in self.peers:
            # The next status_update brings the peer's full row; until then, what we know.
            self.peers[node_id] = Peer(node_id=node_id, name=name, state="joined")
        return [LogLine(ts, "peer", f"{name or short_id(node_id)} joined")]

    def _peer_left(self, data: Mapping[str, Any], ts: float) -> list[LogLine]:
        node_id = _text(data.get("node_id"))
        if not node_id:
            return []
        name = self.name_of(node_id)
        self.peers.pop(node_id, None)
        return [LogLine(ts, "peer", f"{name} left")]

    def _connection(self, data: Mapping[str, Any], ts: float) -> list[LogLine]:
        before = self.connection
        connected = data.get("connected") is True
        error = _text(data.get("error")) or None
        self.connection = Connection(connected, error, _number(data.get("retry_in")))
        # Retries repeat the same failure every few seconds: log changes only.
        if (before.connected, before.error) == (connected, error):
            return []
        if connected:
            return [LogLine(ts, "connection", "connected to the node")]
        return [LogLine(ts, "connection", f"disconnected: {error or 'no reason given'}")]

    def _round_completed_text(self, data: Mapping[str, Any]) -> str:
        text = f"round {_round_of(data)} completed"
        model_hash = _text(data.get("model_hash"))
        if model_hash:
            text += f", model {model_hash[:12]}"
        aggregator = _text(data.get("aggregator"))
        if aggregator:
            text += f", aggregated by {self.name_of(aggregator)}"
        return text

    def name_of(self, node_id: str) -> str:
        """The name to show for a node id: this node's or a peer's name, else a short id."""
        if node_id == self.status.node_id and self.status.name:
            return self.status.name
        peer = self.peers.get(node_id)
        return peer.name if peer and peer.name else short_id(node_id)

    def role(self) -> str:
        """This node's part in the current round: aggregator, or member of whose round."""
        if self.status.is_aggregator:
            return "aggregator"
        if self.status.aggregator:
            return f"member (aggregator {self.name_of(self.status.aggregator)})"
        return "member"

    def series(self, field: Literal["accuracy", "loss"]) -> tuple[tuple[int, float], ...]:
        """(round, value) of ``accuracy`` or ``loss`` for every recorded round that has it."""
        points = []
        for number in sorted(self.rounds):
            value = getattr(self.rounds[number], field)
            if value is not None:
                points.append((number, value))
        return tuple(points)

    def peer_rows(self) -> tuple[Peer, ...]:
        """The peers, by name then id, as the table lists them."""
        return tuple(sorted(self.peers.values(), key=lambda p: (p.name, p.node_id)))

    def topology(self) -> tuple[TopologyRow, ...]:
        """This node with its direct links, then each peer with the links it reports."""
        peers = self.peer_rows()
        me = TopologyRow(self.status.name or short_id(self.status.node_id) or "this node",
                         tuple(self.name_of(p.node_id) for p in peers
                               if p.state in DIRECT_STATES),
                         is_self=True)
        return (me, *(TopologyRow(self.name_of(p.node_id),
                                  tuple(self.name_of(x) for x in p.links)) for p in peers))

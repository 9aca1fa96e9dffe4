"""What a node keeps about the peers it knows of, and its traffic totals."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PeerStats:
    """What this node knows about one key it has heard of."""

    name: str
    address: str = ""
    addresses: tuple[str, ...] = ()
    rounds: int = 0
    state: str = "unknown"
    last_seen: float = 0.0
    rtt_ms: float | None = None
    rejected: int = 0
    messages: int = 0
    trusted: bool = False
    trust: str = ""
    link_down_at: float = 0.0
    last_announce: float = -1.0
    links: tuple[bytes, ...] = ()
    discovered: bool = False
    member: bool = False
    served_round: int = -1
    #: Failed checks of what it sent (node.peers.checks), the last reason, and whether
    #: it was cut off for them.
    strikes: int = 0
    last_strike: str = ""
    banned: bool = False


@dataclass
class Counters:
    """Traffic totals, for status and benchmarks."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    rejected: int = 0
    duplicates: int = 0
    relayed: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)

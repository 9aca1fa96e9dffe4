"""What a node keeps about the peers it knows of, and its traffic totals."""

from __future__ import annotations

from collections import deque
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
    served_at: float = float("-inf")
    #: When we last sent it the genesis model (it asked: docs/protocol.md 9.8).
    genesis_at: float = float("-inf")
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
    #: Rejected frames by kind (one of ``REJECT_KINDS``: a small fixed set, so that
    #: strangers cannot grow it), and the newest rejections with their details.
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    recent_rejections: deque[dict[str, object]] = field(
        default_factory=lambda: deque(maxlen=RECENT_REJECTIONS))

    def count_reject(self, reason: str, peer: str | None, ts: float) -> str:
        """Count a rejected frame; return its kind."""
        kind = reject_kind(reason)
        self.rejected += 1
        self.rejected_reasons[kind] = self.rejected_reasons.get(kind, 0) + 1
        self.recent_rejections.append({"ts": ts, "kind": kind, "peer": peer,
                                       "reason": reason[:160]})
        return kind


#: How many rejections status lists with their details.
RECENT_REJECTIONS = 20
#: (kind, words that mark it), first match wins; anything else is "other".
_KIND_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("signature", ("signature",)),
    ("replay", ("replayed", "stale sequence", "timestamp")),
    ("federation", ("is not ours",)),
    ("size", ("exceeds the cap", "too large")),
    ("poison", ("nan or infinite", "l2 norm")),
    ("incompatible", ("genesis", "unsupported protocol version")),
    ("not_member", ("not a member", "not an admitted", "not trusted")),
    ("handshake", ("hello", "handshake", "challenge", "impostor", "answered with key")),
    ("pairing", ("pairing", "pair_request", "token")),
    ("malformed", ("msgpack", "frame", "payload", "bad fields", "expected", "tensor",
                   "must be", "bad length", "characters", "duplicate", "out of range",
                   "not a finite", "wrong type", "unknown message", "not allowed")),
)
#: Every kind ``rejected_reasons`` can have.
REJECT_KINDS = (*(k for k, _ in _KIND_WORDS), "other")


def reject_kind(reason: str) -> str:
    """The kind of a rejection reason (one of ``REJECT_KINDS``)."""
    text = reason.lower()
    for kind, words in _KIND_WORDS:
        if any(w in text for w in words):
            return kind
    return "other"

"""Message types and their bodies, as frozen dataclasses with strict decoders.

Every body decoder takes the decoded msgpack map and either returns the dataclass or
raises ProtocolError. Unknown fields are refused so that a field added in a later version
comes with a version bump (see docs/protocol.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError
from .tensors import Tensor, weights_from_wire, weights_to_wire

HASH_LEN = 32
#: A hello's nonce and echo: the two ephemeral X25519 keys of the link.
NONCE_LEN = 32
KEY_LEN = 32


def _fields(body: Any, kind: str, required: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"{kind}: body must be a map")
    if set(body) != set(required):
        missing = sorted(set(required) - set(body))
        extra = sorted(str(k)[:32] for k in set(body) - set(required))
        raise ProtocolError(f"{kind}: bad fields (missing {missing}, unknown {extra})")
    for key, typ in required.items():
        value = body[key]
        # bool is an int subclass in Python; never accept it where an int is meant.
        if isinstance(value, bool) and typ is not bool:
            raise ProtocolError(f"{kind}.{key}: wrong type bool")
        if not isinstance(value, typ):
            raise ProtocolError(f"{kind}.{key}: wrong type {type(value).__name__}")
    return body


def _bin(kind: str, name: str, value: bytes, length: int) -> bytes:
    if len(value) != length:
        raise ProtocolError(f"{kind}.{name}: expected {length} bytes, got {len(value)}")
    return value


def _count(kind: str, name: str, value: int, limit: int = 2**53) -> int:
    if not 0 <= value <= limit:
        raise ProtocolError(f"{kind}.{name}: out of range")
    return value


def _finite(kind: str, name: str, value: float | int) -> float:
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ProtocolError(f"{kind}.{name}: not a finite number")
    return value


@dataclass(frozen=True)
class Hello:
    """First message on a link in each direction: who I am and proof of my key.

    ``nonce`` is a fresh challenge for the other side; ``echo`` is the other side's
    challenge (empty in the opener's first hello), so a signed Hello that echoes my nonce
    proves the peer holds its key now.
    """

    TYPE = "hello"
    name: str
    nonce: bytes
    echo: bytes
    port: int
    genesis: bytes
    round: int
    #: HMAC proving knowledge of the federation secret, bound to ``echo`` (empty if none).
    proof: bytes = b""

    def to_body(self) -> dict[str, Any]:
        return {
            "name": self.name, "nonce": self.nonce, "echo": self.echo,
            "port": self.port, "genesis": self.genesis, "round": self.round,
            "proof": self.proof,
        }

    @classmethod
    def from_body(cls, body: Any) -> Hello:
        b = _fields(body, "hello", {"name": str, "nonce": bytes, "echo": bytes,
                                    "port": int, "genesis": bytes, "round": int,
                                    "proof": bytes})
        if not 0 < len(b["name"]) <= 64:
            raise ProtocolError("hello.name: 1 to 64 characters")
        if len(b["proof"]) not in (0, HASH_LEN):
            raise ProtocolError("hello.proof: bad length")
        return cls(
            name=b["name"],
            nonce=_bin("hello", "nonce", b["nonce"], NONCE_LEN),
            echo=_bin("hello", "echo", b["echo"], NONCE_LEN),
            port=_count("hello", "port", b["port"], 65535),
            genesis=_bin("hello", "genesis", b["genesis"], HASH_LEN),
            round=_count("hello", "round", b["round"]),
            proof=b["proof"],
        )


#: The body fields an update and a delta share (with their wire types).
_UPDATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "round": int, "attempt": int, "base": bytes, "n": int, "loss": (float, int),
    "secs": (float, int), "weights": list,
}


def _update_body(m: Update | Delta) -> dict[str, Any]:
    """The body fields an update and a delta share."""
    return {
        "round": m.round, "attempt": m.attempt, "base": m.base, "n": m.num_examples,
        "loss": m.loss, "secs": m.train_seconds, "weights": weights_to_wire(m.weights),
    }


def _update_values(kind: str, b: dict[str, Any]) -> dict[str, Any]:
    """The checked values of the fields an update and a delta share (not the weights)."""
    if b["round"] < 1:
        raise ProtocolError(f"{kind}.round: must be >= 1")
    return {
        "round": _count(kind, "round", b["round"]),
        "attempt": _count(kind, "attempt", b["attempt"]),
        "base": _bin(kind, "base", b["base"], HASH_LEN),
        "num_examples": _count(kind, "n", b["n"]),
        "loss": _finite(kind, "loss", b["loss"]),
        "train_seconds": _finite(kind, "secs", b["secs"]),
    }


@dataclass(frozen=True)
class Update:
    """A member's locally trained model for ``round``, sent to that round's aggregator."""

    TYPE = "update"
    round: int
    attempt: int
    base: bytes
    num_examples: int
    loss: float
    train_seconds: float
    weights: list[Tensor] = field(repr=False)

    def to_body(self) -> dict[str, Any]:
        return _update_body(self)

    @classmethod
    def from_body(cls, body: Any) -> Update:
        b = _fields(body, "update", _UPDATE_FIELDS)
        return cls(**_update_values("update", b), weights=weights_from_wire(b["weights"]))


@dataclass(frozen=True)
class Delta:
    """A member's update sent compressed: ``weights`` hold the codec's encoding of the
    difference between its trained weights and the round's global model ``base``
    (``codec``: ``fp16``, ``int8`` or ``topk:FRACTION``; see node/compress.py). Only an
    aggregator holding the model ``base`` can use it."""

    TYPE = "delta"
    round: int
    attempt: int
    base: bytes
    num_examples: int
    loss: float
    train_seconds: float
    codec: str
    weights: list[Tensor] = field(repr=False)

    def to_body(self) -> dict[str, Any]:
        return {**_update_body(self), "codec": self.codec}

    @classmethod
    def from_body(cls, body: Any) -> Delta:
        b = _fields(body, "delta", {**_UPDATE_FIELDS, "codec": str})
        if not 0 < len(b["codec"]) <= 32:
            raise ProtocolError("delta.codec: 1 to 32 characters")
        return cls(**_update_values("delta", b), codec=b["codec"],
                   weights=weights_from_wire(b["weights"]))


@dataclass(frozen=True)
class Model:
    """The global model of ``round``, published by that round's aggregator."""

    TYPE = "model"
    round: int
    attempt: int
    aggregator: bytes
    contributors: tuple[bytes, ...]
    num_examples: int
    digest: bytes
    weights: list[Tensor] = field(repr=False)

    def to_body(self) -> dict[str, Any]:
        return {
            "round": self.round, "attempt": self.attempt, "aggregator": self.aggregator,
            "contributors": list(self.contributors), "n": self.num_examples,
            "digest": self.digest, "weights": weights_to_wire(self.weights),
        }

    @classmethod
    def from_body(cls, body: Any) -> Model:
        b = _fields(body, "model", {"round": int, "attempt": int, "aggregator": bytes,
                                    "contributors": list, "n": int, "digest": bytes,
                                    "weights": list})
        if b["round"] < 1:
            raise ProtocolError("model.round: must be >= 1")
        contributors = b["contributors"]
        if len(contributors) > 100_000 or not all(
            isinstance(c, bytes) and len(c) == KEY_LEN for c in contributors
        ):
            raise ProtocolError("model.contributors: expected a list of 32-byte keys")
        return cls(
            round=_count("model", "round", b["round"]),
            attempt=_count("model", "attempt", b["attempt"]),
            aggregator=_bin("model", "aggregator", b["aggregator"], KEY_LEN),
            contributors=tuple(contributors),
            num_examples=_count("model", "n", b["n"]),
            digest=_bin("model", "digest", b["digest"], HASH_LEN),
            weights=weights_from_wire(b["weights"]),
        )


@dataclass(frozen=True)
class Share:
    """A member's model while it is offline (below quorum): offered to the peers it can
    reach for gossip averaging, weighted by ``num_examples``. ``round`` is the global round
    the sender is working towards, ``step`` counts its offline steps, ``base`` is the digest
    of the model it trained from."""

    TYPE = "share"
    round: int
    step: int
    base: bytes
    num_examples: int
    loss: float
    weights: list[Tensor] = field(repr=False)

    def to_body(self) -> dict[str, Any]:
        return {
            "round": self.round, "step": self.step, "base": self.base,
            "n": self.num_examples, "loss": self.loss, "weights": weights_to_wire(self.weights),
        }

    @classmethod
    def from_body(cls, body: Any) -> Share:
        b = _fields(body, "share", {"round": int, "step": int, "base": bytes, "n": int,
                                    "loss": (float, int), "weights": list})
        if b["round"] < 1:
            raise ProtocolError("share.round: must be >= 1")
        return cls(
            round=_count("share", "round", b["round"]),
            step=_count("share", "step", b["step"]),
            base=_bin("share", "base", b["base"], HASH_LEN),
            num_examples=_count("share", "n", b["n"]),
            loss=_finite("share", "loss", b["loss"]),
            weights=weights_from_wire(b["weights"]),
        )


@dataclass(frozen=True)
class Heartbeat:
    """Liveness and progress on a link; ``echo_ts`` lets the sender of a ping measure RTT."""

    TYPE = "heartbeat"
    round: int
    state: str
    ping_ts: int
    echo_ts: int

    def to_body(self) -> dict[str, Any]:
        return {"round": self.round, "state": self.state, "ping_ts": self.ping_ts,
                "echo_ts": self.echo_ts}

    @classmethod
    def from_body(cls, body: Any) -> Heartbeat:
        b = _fields(body, "heartbeat", {"round": int, "state": str, "ping_ts": int,
                                        "echo_ts": int})
        if len(b["state"]) > 32:
            raise ProtocolError("heartbeat.state: too long")
        return cls(_count("heartbeat", "round", b["round"]), b["state"],
                   _count("heartbeat", "ping_ts", b["ping_ts"], 2**63),
                   _count("heartbeat", "echo_ts", b["echo_ts"], 2**63))


@dataclass(frozen=True)
class Relay:
    """Another node's signed frame, carried over this link (gossip and routed delivery).

    ``to`` empty: a broadcast, forwarded at most once per node to a few peers while
    ``ttl`` > 0. ``to`` a key: routed towards that node (direct link if any, else
    forwarded like a broadcast); only that node processes it.
    """

    TYPE = "relay"
    ttl: int
    to: bytes
    frame: bytes = field(repr=False)

    def to_body(self) -> dict[str, Any]:
        return {"ttl": self.ttl, "to": self.to, "frame": self.frame}

    @classmethod
    def from_body(cls, body: Any) -> Relay:
        b = _fields(body, "relay", {"ttl": int, "to": bytes, "frame": bytes})
        if len(b["to"]) not in (0, KEY_LEN):
            raise ProtocolError("relay.to: expected empty or a 32-byte key")
        return cls(_count("relay", "ttl", b["ttl"], 64), b["to"], b["frame"])


@dataclass(frozen=True)
class Announce:
    """A member's periodic, gossiped self-description: how to reach it and whom it links."""

    TYPE = "announce"
    name: str
    addresses: tuple[str, ...]
    links: tuple[bytes, ...]
    round: int
    state: str
    #: Federation credential for the signer's key (HMAC, see protocol.gossip), or empty.
    credential: bytes = b""

    def to_body(self) -> dict[str, Any]:
        return {"name": self.name, "addrs": list(self.addresses), "links": list(self.links),
                "round": self.round, "state": self.state, "cred": self.credential}

    @classmethod
    def from_body(cls, body: Any) -> Announce:
        b = _fields(body, "announce", {"name": str, "addrs": list, "links": list,
                                       "round": int, "state": str, "cred": bytes})
        if len(b["cred"]) not in (0, HASH_LEN):
            raise ProtocolError("announce.cred: bad length")
        if not 0 < len(b["name"]) <= 64 or len(b["state"]) > 32:
            raise ProtocolError("announce: bad name or state")
        if len(b["addrs"]) > 16 or not all(isinstance(a, str) and len(a) <= 64
                                           for a in b["addrs"]):
            raise ProtocolError("announce.addrs: at most 16 strings")
        if len(b["links"]) > 1024 or not all(isinstance(k, bytes) and len(k) == KEY_LEN
                                             for k in b["links"]):
            raise ProtocolError("announce.links: at most 1024 keys of 32 bytes")
        return cls(b["name"], tuple(b["addrs"]), tuple(b["links"]),
                   _count("announce", "round", b["round"]), b["state"], b["cred"])


@dataclass(frozen=True)
class PairRequest:
    """Sent to a node's pairing endpoint with the one-time token from its pairing code.

    The envelope's signature proves the requester holds the key it asks to be trusted."""

    TYPE = "pair_request"
    token: str
    name: str
    addresses: tuple[str, ...]

    def to_body(self) -> dict[str, Any]:
        return {"token": self.token, "name": self.name, "addrs": list(self.addresses)}

    @classmethod
    def from_body(cls, body: Any) -> PairRequest:
        b = _fields(body, "pair_request", {"token": str, "name": str, "addrs": list})
        if not 0 < len(b["token"]) <= 64 or not 0 < len(b["name"]) <= 64:
            raise ProtocolError("pair_request: bad token or name")
        if len(b["addrs"]) > 8 or not all(isinstance(a, str) and len(a) <= 64
                                          for a in b["addrs"]):
            raise ProtocolError("pair_request.addrs: at most 8 strings")
        return cls(b["token"], b["name"], tuple(b["addrs"]))


@dataclass(frozen=True)
class PairAccept:
    """The answer to a valid PairRequest, signed by the node whose code was used."""

    TYPE = "pair_accept"
    name: str
    requester: bytes

    def to_body(self) -> dict[str, Any]:
        return {"name": self.name, "requester": self.requester}

    @classmethod
    def from_body(cls, body: Any) -> PairAccept:
        b = _fields(body, "pair_accept", {"name": str, "requester": bytes})
        if not 0 < len(b["name"]) <= 64:
            raise ProtocolError("pair_accept.name: 1 to 64 characters")
        return cls(b["name"], _bin("pair_accept", "requester", b["requester"], KEY_LEN))


@dataclass(frozen=True)
class PairRefuse:
    """The answer to a pair_request that cannot be granted, with the reason for people."""

    TYPE = "pair_refuse"
    reason: str

    def to_body(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_body(cls, body: Any) -> PairRefuse:
        b = _fields(body, "pair_refuse", {"reason": str})
        if not 0 < len(b["reason"]) <= 200:
            raise ProtocolError("pair_refuse.reason: 1 to 200 characters")
        return cls(b["reason"])


@dataclass(frozen=True)
class GenesisRequest:
    """Ask a linked member for the genesis model (a node that cannot build it itself)."""

    TYPE = "genesis_request"

    def to_body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, body: Any) -> GenesisRequest:
        _fields(body, "genesis_request", {})
        return cls()


@dataclass(frozen=True)
class Genesis:
    """The genesis model (round 0), answering a GenesisRequest: its tensors' digest is the
    genesis hash of the hellos (docs/protocol.md 5, 9.8)."""

    TYPE = "genesis"
    weights: list[Tensor] = field(repr=False)

    def to_body(self) -> dict[str, Any]:
        return {"weights": weights_to_wire(self.weights)}

    @classmethod
    def from_body(cls, body: Any) -> Genesis:
        b = _fields(body, "genesis", {"weights": list})
        return cls(weights_from_wire(b["weights"]))


Message = (Hello | Update | Delta | Model | Share | Heartbeat | Relay | Announce | PairRequest
           | PairAccept | PairRefuse | GenesisRequest | Genesis)

#: type name -> body decoder. A type not in here is refused.
DECODERS: Mapping[str, Callable[[Any], Message]] = {
    Hello.TYPE: Hello.from_body,
    Update.TYPE: Update.from_body,
    Delta.TYPE: Delta.from_body,
    Model.TYPE: Model.from_body,
    Share.TYPE: Share.from_body,
    Heartbeat.TYPE: Heartbeat.from_body,
    Relay.TYPE: Relay.from_body,
    Announce.TYPE: Announce.from_body,
    PairRequest.TYPE: PairRequest.from_body,
    PairAccept.TYPE: PairAccept.from_body,
    PairRefuse.TYPE: PairRefuse.from_body,
    GenesisRequest.TYPE: GenesisRequest.from_body,
    Genesis.TYPE: Genesis.from_body,
}

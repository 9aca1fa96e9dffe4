"""Gossip primitives: federation-secret proofs, a bounded seen-cache, fan-out choice.

Pure functions and small classes; ``node.peers.core`` uses them to spread what must reach
every member (global models, announcements) and to route updates over relays.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence

PROOF_DOMAIN = b"fl-node/v1/federation-proof\x00"
CREDENTIAL_DOMAIN = b"fl-node/v1/federation-credential\x00"
DEFAULT_TTL = 8
DEFAULT_FANOUT = 4


def federation_key(secret: bytes, federation: str) -> bytes:
    """The HMAC key derived from a federation secret (the secret itself never travels)."""
    return hmac.new(secret, b"fl-node/v1/federation-key\x00" + federation.encode(),
                    hashlib.sha256).digest()


def federation_proof(fed_key: bytes, federation: str, prover: bytes, challenge: bytes) -> bytes:
    """Proof that ``prover`` knows the federation secret, bound to the peer's challenge.

    HMAC-SHA256(federation_key, PROOF_DOMAIN || utf8(federation) || 0x00 || prover key ||
    challenge). Binding to the fresh challenge makes a recorded proof useless elsewhere.
    """
    return hmac.new(fed_key, PROOF_DOMAIN + federation.encode() + b"\x00" + prover + challenge,
                    hashlib.sha256).digest()


def check_federation_proof(fed_key: bytes, federation: str, prover: bytes, challenge: bytes,
                           proof: bytes) -> bool:
    """Constant-time check of ``federation_proof``."""
    want = federation_proof(fed_key, federation, prover, challenge)
    return len(proof) == len(want) and hmac.compare_digest(proof, want)


def federation_credential(fed_key: bytes, federation: str, member: bytes) -> bytes:
    """A member's standing credential, carried in its announcements.

    HMAC-SHA256(federation_key, CREDENTIAL_DOMAIN || utf8(federation) || 0x00 || key). It
    is not bound to a challenge, but it only vouches for ``member``'s key, and only that
    key can sign the announcements it rides in; so it lets nodes admit members they reach
    only through relays.
    """
    return hmac.new(fed_key, CREDENTIAL_DOMAIN + federation.encode() + b"\x00" + member,
                    hashlib.sha256).digest()


class SeenCache:
    """The last ``capacity`` message ids seen; each message is handled once per node."""

    def __init__(self, capacity: int = 8192) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[bytes, None] = OrderedDict()

    def add(self, message_id: bytes) -> bool:
        """Remember ``message_id``; False if it was already there (a duplicate)."""
        if message_id in self._ids:
            self._ids.move_to_end(message_id)
            return False
        self._ids[message_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def discard(self, message_id: bytes) -> None:
        """Forget ``message_id``: the message may be handled again when it comes back."""
        self._ids.pop(message_id, None)

    def __contains__(self, message_id: bytes) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


def frame_id(frame: bytes | bytearray | memoryview) -> bytes:
    """A frame's identity for de-duplication: its Ed25519 signature (the last 64 bytes).

    Ed25519 signatures are deterministic and bound to key and payload, so equal frames
    share it and different frames cannot, short of a forgery.
    """
    return bytes(memoryview(frame)[-64:])


def choose_fanout(rng: random.Random, candidates: Iterable[bytes], fanout: int,
                  exclude: Sequence[bytes] = ()) -> list[bytes]:
    """Up to ``fanout`` peers from ``candidates`` (sorted first, so a seeded rng is
    reproducible), never one in ``exclude``."""
    pool = sorted(k for k in set(candidates) if k not in exclude)
    if len(pool) <= fanout:
        return pool
    return rng.sample(pool, fanout)

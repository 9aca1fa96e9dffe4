"""Per-round aggregator election by rendezvous hashing.

Every member computes the same answer from the same inputs without sending a message:
the aggregator of round ``r`` is the candidate with the highest
``SHA-256(b"fl-node/v1/elect\\0" || utf8(federation) || 0x00 || u64be(r) || public_key)``.
The ranking changes every round, so the role rotates; a candidate that fails is excluded
and the next one in the same ranking takes over.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

ELECTION_DOMAIN = b"fl-node/v1/elect\x00"


def election_score(federation: str, round_number: int, public_key: bytes) -> bytes:
    """The rendezvous score of one candidate for one round (compared as bytes)."""
    return hashlib.sha256(
        ELECTION_DOMAIN + federation.encode() + b"\x00" + struct.pack(">Q", round_number)
        + public_key
    ).digest()


def ranking(federation: str, round_number: int, candidates: Iterable[bytes]) -> list[bytes]:
    """Candidates from most to least preferred aggregator for ``round_number``."""
    return sorted(set(candidates), key=lambda k: election_score(federation, round_number, k),
                  reverse=True)


def elect(federation: str, round_number: int, candidates: Iterable[bytes]) -> bytes:
    """The aggregator of ``round_number`` among ``candidates`` (which must not be empty)."""
    ranked = ranking(federation, round_number, candidates)
    if not ranked:
        raise ValueError("no candidates")
    return ranked[0]

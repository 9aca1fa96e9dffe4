"""Whom a node trusts: pinned keys, paired keys (the trust store), holders of the
federation secret, or everyone of the federation with ``--open`` (docs/trust.md)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Protocol

from protocol.gossip import check_federation_proof, federation_credential
from protocol.identity import node_id_from_key


class TrustSource(Protocol):
    """What the core needs of a trust store."""

    def is_trusted(self, public_key: bytes) -> bool: ...


@dataclass
class TrustPolicy:
    """How this node decides whom to trust (see module docstring)."""

    store: TrustSource | None = None
    federation_key: bytes | None = None
    open: bool = False
    pinned: set[bytes] = field(default_factory=set)
    pinned_ids: set[str] = field(default_factory=set)

    def static(self, key: bytes) -> str | None:
        """The reason ``key`` is trusted without any proof, or None."""
        if key in self.pinned or (self.pinned_ids and node_id_from_key(key) in self.pinned_ids):
            return "pinned"
        if self.store is not None and self.store.is_trusted(key):
            return "paired"
        if self.open:
            return "open"
        return None

    def admit(self, federation: str, key: bytes, proof: bytes, our_nonce: bytes) -> str | None:
        """Why ``key`` is trusted after a handshake (None: it is not): without proof, or
        by a federation-secret ``proof`` bound to the challenge ``our_nonce`` we sent."""
        reason = self.static(key)
        if reason:
            return reason
        if self.federation_key and check_federation_proof(self.federation_key, federation,
                                                          key, our_nonce, proof):
            return "federation-secret"
        return None

    def by_credential(self, federation: str, key: bytes, credential: bytes) -> str | None:
        """Why ``key`` is trusted given the federation ``credential`` of its announcement
        (None: it is not)."""
        reason = self.static(key)
        if reason:
            return reason
        if self.federation_key and credential and hmac.compare_digest(
                credential, federation_credential(self.federation_key, federation, key)):
            return "federation-secret"
        return None

    def credential(self, federation: str, key: bytes) -> bytes:
        """Our federation credential for announcements (empty without a secret)."""
        if not self.federation_key:
            return b""
        return federation_credential(self.federation_key, federation, key)

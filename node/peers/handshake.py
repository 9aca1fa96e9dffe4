"""The three-hello handshake and admission of a link (docs/protocol.md, "Links").

The dialer's hello carries its challenge; the acceptor's hello echoes it and carries its
own; the dialer's second hello echoes that. Each hello is a signed envelope, so each side
proves it holds its key now; with a federation secret the echo carries a proof bound to
the challenge. Both sides must train the same genesis model. Admission then asks the
trust policy (node.trust.policy) why the key is trusted, if at all.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from protocol.envelope import Envelope
from protocol.errors import ProtocolError
from protocol.gossip import federation_proof
from protocol.messages import NONCE_LEN, Hello

if TYPE_CHECKING:
    from node.peers.core import NodeCore


class Handshake:
    """Hellos and admission for one node core."""

    def __init__(self, core: NodeCore) -> None:
        self.core = core

    @staticmethod
    def new_nonce() -> bytes:
        """A fresh handshake challenge."""
        return os.urandom(NONCE_LEN)

    def hello(self, nonce: bytes, echo: bytes = b"") -> bytearray:
        """Our hello: ``nonce`` challenges the peer, ``echo`` answers it (with a
        federation-secret proof bound to it when we have a secret)."""
        core = self.core
        fed_key = core.trust.federation_key
        proof = federation_proof(fed_key, core.federation, core.key, echo) if (
            echo and fed_key) else b""
        return core.frame(Hello(
            name=core.name, nonce=nonce, echo=echo, port=core.port,
            genesis=core.machine.genesis_digest, round=core.machine.completed, proof=proof,
        ))

    def accept(self, frame: bytes | bytearray, our_nonce: bytes | None) -> tuple[Envelope, Hello]:
        """Check a peer's hello; when we challenged it, it must echo ``our_nonce``."""
        env = self.core.decode(frame)
        self.core.check_fresh(env)
        msg = env.message
        if not isinstance(msg, Hello):
            raise ProtocolError(f"expected hello, got {env.type}")
        if our_nonce is not None and msg.echo != our_nonce:
            raise ProtocolError("hello does not answer our challenge")
        if msg.genesis != self.core.machine.genesis_digest:
            raise ProtocolError("peer trains another model (genesis hash differs:"
                                " check --dataset, --model and --seed)")
        return env, msg

    def admit(self, key: bytes, hello: Hello, our_nonce: bytes) -> str | None:
        """Why ``key`` is trusted after a handshake (None: it is not); ``hello`` is its
        hello that answered ``our_nonce``. A member cut off for failed checks is refused
        for the rest of the run."""
        core = self.core
        if core.peers.banned(key):
            return None
        return core.trust.admit(core.federation, key, hello.proof, our_nonce)

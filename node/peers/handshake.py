"""The two signed hellos inside a link's channel, and admission (docs/protocol.md 6.2).

A link's channel (node.peers.channel) starts with two fresh ephemeral keys. Each side's
hello carries its own ephemeral key as ``nonce`` and the peer's as ``echo``, and is signed
by its identity: so each side proves it holds its key now, and binds its identity to this
channel (a man in the middle that put its own ephemeral key in place of one of them is
caught: the echo differs, and it cannot sign for the node). With a federation secret the
hello carries a proof bound to the peer's ephemeral key. Both sides must train the same
genesis model. Admission then asks the trust policy (node.trust.policy) why the key is
trusted, if at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from node.common.wsclose import AnyWebSocket
from node.peers.channel import Channel, open_acceptor, open_dialer
from protocol.envelope import Envelope
from protocol.errors import ProtocolError
from protocol.gossip import federation_proof
from protocol.linkcrypto import Ephemeral
from protocol.messages import Hello

if TYPE_CHECKING:
    from node.peers.core import NodeCore


class Ends(Protocol):
    """A link's two ephemeral public keys, ours and the peer's (node.peers.channel.Channel
    has them; so has ``LinkEnds``, for the simulation, which has no sockets)."""

    @property
    def ours(self) -> bytes: ...

    @property
    def theirs(self) -> bytes: ...


@dataclass(frozen=True)
class LinkEnds:
    """The ephemeral keys of a link without a channel (the simulation's links)."""

    ours: bytes
    theirs: bytes


class Handshake:
    """Hellos and admission for one node core."""

    def __init__(self, core: NodeCore) -> None:
        self.core = core

    def hello(self, channel: Ends) -> bytearray:
        """Our hello on ``channel``: our ephemeral key as the nonce, the peer's as the echo
        (with a federation-secret proof bound to it when we have a secret)."""
        core = self.core
        fed_key = core.trust.federation_key
        proof = federation_proof(fed_key, core.federation, core.key, channel.theirs) if (
            fed_key) else b""
        return core.frame(Hello(
            name=core.name, nonce=channel.ours, echo=channel.theirs, port=core.port,
            genesis=core.machine.genesis_digest, round=core.machine.completed, proof=proof,
        ))

    def accept(self, frame: bytes | bytearray, channel: Ends) -> tuple[Envelope, Hello]:
        """Check the peer's hello on ``channel``: it names the channel's two ephemeral keys
        (its own as the nonce, ours as the echo)."""
        env = self.core.decode(frame)
        self.core.check_fresh(env)
        msg = env.message
        if not isinstance(msg, Hello):
            raise ProtocolError(f"expected hello, got {env.type}")
        if msg.echo != channel.ours or msg.nonce != channel.theirs:
            raise ProtocolError("hello names other ephemeral keys than this link's (a man in"
                                " the middle, or a replayed hello)")
        if msg.genesis != self.core.machine.genesis_digest:
            raise ProtocolError("peer trains another model (genesis hash differs:"
                                " check --dataset, --model and --seed)")
        return env, msg

    async def as_acceptor(self, ws: AnyWebSocket) -> tuple[Channel, Envelope, Hello]:
        """The acceptor's side on a fresh WebSocket (links and pairing alike): the key
        exchange, our hello, the peer's hello checked."""
        channel = await open_acceptor(ws)
        await channel.send(self.hello(channel))
        env, hello = self.accept(await channel.receive_frame(), channel)
        return channel, env, hello

    async def as_dialer(self, ws: AnyWebSocket, check_key: Callable[[bytes], None]
                        ) -> tuple[Channel, Envelope, Hello]:
        """The dialer's side: the key exchange, the acceptor's hello checked, then
        ``check_key`` on its signer (it raises to refuse an impostor before we have said
        who we are), then our hello."""
        channel = await open_dialer(ws)
        env, hello = self.accept(await channel.receive_frame(), channel)
        check_key(env.sender)
        await channel.send(self.hello(channel))
        return channel, env, hello

    def admit(self, key: bytes, hello: Hello, our_nonce: bytes) -> str | None:
        """Why ``key`` is trusted after a handshake (None: it is not); ``hello`` is its
        hello, which echoed ``our_nonce`` (our ephemeral key). A member cut off for failed checks is refused
        for the rest of the run."""
        core = self.core
        if core.peers.banned(key):
            return None
        return core.trust.admit(core.federation, key, hello.proof, our_nonce)


def socketless_hellos(dialer: Handshake, acceptor: Handshake) -> tuple[
        tuple[Envelope, Hello, LinkEnds], tuple[Envelope, Hello, LinkEnds]]:
    """The hellos of a link between two cores in one process (the simulation, tests), in
    the transport's order and with fresh ephemeral keys but no channel: for the dialer,
    the acceptor's checked hello and the dialer's ends; then the same for the acceptor.
    ProtocolError as on a socket."""
    e_d, e_a = Ephemeral.generate().public, Ephemeral.generate().public
    ends_d, ends_a = LinkEnds(ours=e_d, theirs=e_a), LinkEnds(ours=e_a, theirs=e_d)
    env_a, hello_a = dialer.accept(bytes(acceptor.hello(ends_a)), ends_d)
    env_d, hello_d = acceptor.accept(bytes(dialer.hello(ends_d)), ends_a)
    return (env_a, hello_a, ends_d), (env_d, hello_d, ends_a)

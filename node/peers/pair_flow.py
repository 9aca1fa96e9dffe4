"""Mutual pairing over the network: `fl-node pair` on one node, `fl-node pair add URI` on
another (docs/trust.md).

1. Node A issues a pairing code (URI): its full public key, addresses, federation, and a
   one-time token that expires (node.trust.pairing).
2. Node B, given the URI, opens the encrypted channel of a link (node.peers.channel) on
   ``/fl/v2/pair`` at one of A's addresses. The two hellos run as on a link: A's must be
   signed by the key in the URI (an impostor at that address cannot sign it), B's proves B
   holds its key. Then B sends a signed ``pair_request`` with the token, inside the
   channel: the token, names and addresses never cross the network in the clear.
3. A redeems the token (once, before it expires), trusts B's key, and answers with a signed
   ``pair_accept`` (or a ``pair_refuse`` with the reason). B checks that the accept is
   A's and names B, then trusts A. Both keep each other in their trust store, so the
   pairing survives restarts, and B dials A.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import aiohttp
from aiohttp import web

from node.common.wsaccept import upgrade_refusal
from node.common.wsclose import close_ws
from node.config import NodeConfig
from node.peers.channel import WS_LIMIT
from node.peers.handshake import Handshake
from node.trust.pairing import PairingError, PairingOffer, TokenBook, make_offer, split_address
from node.trust.store import TrustedPeer, TrustStore, check_name
from protocol.envelope import Envelope
from protocol.errors import ProtocolError
from protocol.identity import node_id_from_key
from protocol.messages import Message, PairAccept, PairRefuse, PairRequest


class PairingCore(Protocol):
    """What pairing needs of the node core (node.peers.core.NodeCore): signing, checking
    and counting frames, and the addresses the node announces."""

    @property
    def addresses(self) -> tuple[str, ...]: ...

    @property
    def handshake(self) -> Handshake: ...

    def decode(self, frame: bytes | bytearray | memoryview, *, carried: bool = False
               ) -> Envelope: ...

    def check_fresh(self, env: Envelope) -> None: ...

    def frame(self, message: Message) -> bytearray: ...

    def reject(self, key: bytes | None, reason: str) -> None: ...


class DialingNode(Protocol):
    """A node as pairing and discovery see it: who it is, where it listens, and how to
    have it keep a link to an address (node.runtime.supervisor.Node provides it)."""

    @property
    def public_key(self) -> bytes: ...

    @property
    def config(self) -> NodeConfig: ...

    @property
    def peer_port(self) -> int: ...

    def dial(self, address: str, key: bytes | str | None = None) -> None: ...


class PairingHost(DialingNode, Protocol):
    """What pairing needs of a node besides ``DialingNode``."""

    @property
    def core(self) -> PairingCore: ...

    @property
    def pairing_tokens(self) -> TokenBook: ...

    @property
    def trust_store(self) -> TrustStore: ...

log = logging.getLogger(__name__)

PAIR_PATH = "/fl/v2/pair"
#: Where pairing was a plain HTTP POST (before December 2026): answered 426.
OLD_PAIR_PATH = "/fl/v1/pair"
#: Seconds for the whole exchange, either side.
PAIR_TIMEOUT = 10.0


def _valid_address(address: str) -> bool:
    try:
        split_address(address)
    except PairingError:
        return False
    return True


def offer(node: PairingHost, ttl_s: float) -> PairingOffer:
    """A fresh pairing code for this node."""
    addresses = node.core.addresses or (f"127.0.0.1:{node.peer_port}",)
    return make_offer(node.pairing_tokens, node.public_key, node.config.name,
                      node.config.federation, addresses, ttl_s)


async def handle_pair_request(node: PairingHost, request: web.Request) -> web.StreamResponse:
    """``/fl/v2/pair`` on the peer port: the channel and hellos of a link, then one
    ``pair_request``; redeem its token, trust the requester, answer."""
    refusal = upgrade_refusal(request)
    if refusal is not None:
        return refusal
    ws = web.WebSocketResponse(max_msg_size=WS_LIMIT, compress=False)
    await ws.prepare(request)
    core = node.core
    try:
        async with asyncio.timeout(PAIR_TIMEOUT):
            channel, hello_env, _ = await core.handshake.as_acceptor(ws)
            env = core.decode(await channel.receive_frame())
            core.check_fresh(env)
            msg = env.message
            if not isinstance(msg, PairRequest):
                raise ProtocolError(f"expected pair_request, got {env.type}")
            if env.sender != hello_env.sender:
                raise ProtocolError("pair_request signed by another key than the hello")
            try:
                check_name(msg.name)  # before the token is spent
                addresses = [a for a in msg.addresses[:2] if _valid_address(a)]
                node.pairing_tokens.redeem(msg.token)
            except (PairingError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, PairingError) else str(exc)
                log.warning("pairing request from %s refused: %s", request.remote, reason)
                core.reject(None, reason)
                await channel.send(core.frame(PairRefuse(reason[:200] or "refused")))
                await close_ws(ws)
                return ws
            peer = await asyncio.to_thread(node.trust_store.add, env.sender, msg.name,
                                           "pairing")
            log.info("paired with %s (%s)", peer.name, peer.node_id)
            for address in addresses:
                node.dial(address, env.sender)
            await channel.send(core.frame(PairAccept(name=node.config.name,
                                                     requester=env.sender)))
    except (ProtocolError, TimeoutError, ConnectionError, aiohttp.ClientError) as exc:
        reason = exc.reason if isinstance(exc, ProtocolError) else type(exc).__name__
        log.warning("pairing request from %s refused: %s", request.remote, reason)
        core.reject(None, reason)
    await close_ws(ws)
    return ws


async def old_pair_path(request: web.Request) -> web.Response:
    """``POST /fl/v1/pair``: a node of link protocol 1 learns why it is refused."""
    return web.Response(status=426, text=f"this node pairs on {PAIR_PATH} (encrypted);"
                                         " upgrade fl-node\n")


async def pair_with(node: PairingHost, uri: str) -> tuple[str, str]:
    """Complete a pairing with the node whose code is ``uri``; returns (node id, name).

    Raises PairingError with the reason when the code or the other node refuses."""
    target = PairingOffer.from_uri(uri)
    if target.public_key == node.public_key:
        raise PairingError("that is this node's own pairing code")
    if target.federation != node.config.federation:
        raise PairingError(f"the code is for federation {target.federation!r}, this node is"
                           f" in {node.config.federation!r}")
    errors = []
    timeout = aiohttp.ClientTimeout(total=PAIR_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for address in target.addresses:
            try:
                ws = await session.ws_connect(f"http://{address}{PAIR_PATH}",
                                              max_msg_size=WS_LIMIT, compress=0)
            except aiohttp.WSServerHandshakeError as exc:
                # The node answered: another address would answer the same.
                raise PairingError(f"{address} does not pair on {PAIR_PATH} (HTTP"
                                   f" {exc.status}): it runs an older fl-node") from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                errors.append(f"{address}: {exc or type(exc).__name__}")
                continue
            try:
                async with asyncio.timeout(PAIR_TIMEOUT):
                    answer = await _request(node, target, address, ws)
            except (ProtocolError, ConnectionError, TimeoutError, aiohttp.ClientError) as exc:
                reason = exc.reason if isinstance(exc, ProtocolError) else (
                    str(exc) or type(exc).__name__)
                raise PairingError(f"pairing with {address} failed: {reason}") from None
            finally:
                await close_ws(ws)
            if isinstance(answer, PairRefuse):
                # The other node refused: its reason is final (the token is spent or bad),
                # trying another address would not change it.
                raise PairingError(answer.reason)
            await asyncio.to_thread(node.trust_store.add, target.public_key, target.name,
                                    "pairing")
            log.info("paired with %s (%s)", target.name, target.node_id)
            node.dial(address, target.public_key)
            return target.node_id, target.name
    raise PairingError("could not reach the node: " + "; ".join(errors))


async def _request(node: PairingHost, target: PairingOffer, address: str,
                   ws: aiohttp.ClientWebSocketResponse) -> PairAccept | PairRefuse:
    """The dialer's side of ``/fl/v2/pair``: the answer of the code's key (PairingError
    for an impostor, ProtocolError for anything malformed)."""
    core = node.core

    def check_key(key: bytes) -> None:
        if key != target.public_key:
            raise PairingError(f"{address} answered with key {node_id_from_key(key)},"
                               f" not {target.node_id}: refused as an impostor")

    channel, _, _ = await core.handshake.as_dialer(ws, check_key)
    await channel.send(core.frame(PairRequest(token=target.token, name=node.config.name,
                                              addresses=core.addresses)))
    answer = core.decode(await channel.receive_frame())
    msg = answer.message
    if answer.sender != target.public_key:
        raise ProtocolError("answer signed by another key than the hello")
    if isinstance(msg, PairRefuse):
        return msg
    if not isinstance(msg, PairAccept) or msg.requester != node.public_key:
        raise ProtocolError(f"unexpected answer {answer.type}")
    return msg


class Pairing:
    """A node's pairing service for its web API: codes, pairing, the trust store.

    ``forget`` is called with a key whose pairing was removed (the node drops its link)."""

    def __init__(self, host: PairingHost, forget: Callable[[bytes], None]) -> None:
        self.host = host
        self.forget = forget

    def offer(self, ttl_s: float) -> PairingOffer:
        """A fresh one-time pairing code, valid ``ttl_s`` seconds."""
        return offer(self.host, ttl_s)

    async def pair_with(self, uri: str) -> tuple[str, str]:
        """Pair with the node whose code ``uri`` is (PairingError with the reason)."""
        return await pair_with(self.host, uri)

    def entries(self) -> list[TrustedPeer]:
        """The paired nodes."""
        return self.host.trust_store.entries()

    async def remove(self, ident: str) -> TrustedPeer | None:
        """Forget a paired node (id or unique prefix; ValueError if ambiguous)."""
        removed = await asyncio.to_thread(self.host.trust_store.remove, ident)
        if removed is not None:
            self.forget(removed.public_key)
        return removed

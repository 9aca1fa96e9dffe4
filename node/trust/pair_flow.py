"""Mutual pairing over the network: `fl-node pair` on one node, `fl-node pair add URI` on
another (docs/trust.md).

1. Node A issues a pairing code (URI): its full public key, addresses, federation, and a
   one-time token that expires (node.trust.pairing).
2. Node B, given the URI, sends a signed ``pair_request`` with the token to
   ``POST /fl/v1/pair`` on one of A's addresses. The signature proves B holds its key.
3. A redeems the token (once, before it expires), trusts B's key, and answers with a signed
   ``pair_accept``. B checks that the answer is signed by the key in the URI (an impostor
   at that address cannot sign it), then trusts A. Both keep each other in their trust
   store, so the pairing survives restarts, and B dials A.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import aiohttp
from aiohttp import web

from node.config import NodeConfig
from node.trust.pairing import PairingError, PairingOffer, TokenBook, make_offer, split_address
from node.trust.store import TrustedPeer, TrustStore, check_name
from protocol.envelope import Envelope
from protocol.errors import ProtocolError
from protocol.identity import node_id_from_key
from protocol.messages import Message, PairAccept, PairRequest


class PairingCore(Protocol):
    """What pairing needs of the node core (node.peers.core.NodeCore): signing, checking
    and counting frames, and the addresses the node announces."""

    @property
    def addresses(self) -> tuple[str, ...]: ...

    def decode(self, frame: bytes, *, carried: bool = False) -> Envelope: ...

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

PAIR_PATH = "/fl/v1/pair"
MAX_REQUEST = 64 * 1024


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


async def handle_pair_request(node: PairingHost, request: web.Request) -> web.Response:
    """``POST /fl/v1/pair`` on the peer port: redeem a token, trust the requester."""
    data = await request.content.read(MAX_REQUEST + 1)
    if len(data) > MAX_REQUEST:
        return web.Response(status=413, text="pairing request too large")
    try:
        env = node.core.decode(data)
        node.core.check_fresh(env)
        msg = env.message
        if not isinstance(msg, PairRequest):
            raise ProtocolError(f"expected pair_request, got {env.type}")
        check_name(msg.name)  # before the token is spent
        addresses = [a for a in msg.addresses[:2] if _valid_address(a)]
        node.pairing_tokens.redeem(msg.token)
    except (ProtocolError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, ProtocolError | PairingError) else str(exc)
        log.warning("pairing request from %s refused: %s", request.remote, reason)
        node.core.reject(None, reason)
        return web.Response(status=403, text=reason)
    peer = await asyncio.to_thread(node.trust_store.add, env.sender, msg.name, "pairing")
    log.info("paired with %s (%s)", peer.name, peer.node_id)
    for address in addresses:
        node.dial(address, env.sender)
    answer = node.core.frame(PairAccept(name=node.config.name, requester=env.sender))
    return web.Response(body=bytes(answer), content_type="application/octet-stream")


async def pair_with(node: PairingHost, uri: str) -> tuple[str, str]:
    """Complete a pairing with the node whose code is ``uri``; returns (node id, name).

    Raises PairingError with the reason when the code or the other node refuses."""
    target = PairingOffer.from_uri(uri)
    if target.public_key == node.public_key:
        raise PairingError("that is this node's own pairing code")
    if target.federation != node.config.federation:
        raise PairingError(f"the code is for federation {target.federation!r}, this node is"
                           f" in {node.config.federation!r}")
    request = bytes(node.core.frame(PairRequest(token=target.token, name=node.config.name,
                                                addresses=node.core.addresses)))
    errors = []
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for address in target.addresses:
            try:
                async with session.post(f"http://{address}{PAIR_PATH}", data=request) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        # The other node refused: its reason is final (the token is spent
                        # or bad), trying another address would not change it.
                        raise PairingError(body.decode(errors="replace")[:200]
                                           or f"HTTP {resp.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                errors.append(f"{address}: {exc or type(exc).__name__}")
                continue
            try:
                env = node.core.decode(body)
            except ProtocolError as exc:
                raise PairingError(f"bad answer from {address}: {exc.reason}") from None
            if env.sender != target.public_key:
                raise PairingError(f"{address} answered with key {node_id_from_key(env.sender)},"
                                   f" not {target.node_id}: refused as an impostor")
            if not isinstance(env.message, PairAccept) or env.message.requester != node.public_key:
                raise PairingError(f"unexpected answer from {address}")
            await asyncio.to_thread(node.trust_store.add, target.public_key, target.name,
                                    "pairing")
            log.info("paired with %s (%s)", target.name, target.node_id)
            node.dial(address, target.public_key)
            return target.node_id, target.name
    raise PairingError("could not reach the node: " + "; ".join(errors))


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

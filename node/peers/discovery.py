"""mDNS discovery with python-zeroconf's asyncio API.

Each node registers ``<name>-<id>._fl-node._tcp.local.`` with TXT records:

=========  ==========================================================
``id``     node id (derived from the key, see docs/protocol.md)
``key``    the full Ed25519 public key, base64url without padding
``fed``    federation name
``v``      protocol version
``port``   peer port (also the SRV port)
``name``   human name
=========  ==========================================================

and browses for the others. A node of our federation that appears is dialled with its
announced key *expected*: the handshake must prove that key, or the link is dropped as an
impostor. Discovery only finds addresses; it never grants trust (see docs/trust.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import socket
from typing import Protocol

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from node.peers.pair_flow import DialingNode
from protocol.envelope import PROTOCOL_VERSION
from protocol.identity import node_id_from_key


class DiscoveryHost(DialingNode, Protocol):
    """What discovery needs of a node besides ``DialingNode``."""

    @property
    def node_id(self) -> str: ...

    @property
    def addresses(self) -> tuple[str, ...]: ...

    def undial(self, address: str, key: bytes | str | None = None) -> None: ...

    def discovered(self, key: bytes, name: str, address: str) -> None: ...

log = logging.getLogger(__name__)

SERVICE_TYPE = "_fl-node._tcp.local."
#: Nodes of our federation discovery keeps (and dials) at once; more are ignored until
#: some leave, so a flood of announcements cannot grow the node without bound.
MAX_DISCOVERED = 256


def txt_records(node: DiscoveryHost) -> dict[str, str]:
    """The TXT records this node publishes."""
    return {
        "id": node.node_id,
        "key": base64.urlsafe_b64encode(node.public_key).rstrip(b"=").decode(),
        "fed": node.config.federation,
        "v": str(PROTOCOL_VERSION),
        "port": str(node.peer_port),
        "name": node.config.name,
    }


def parse_txt(properties: dict[bytes, bytes | None]) -> dict[str, str]:
    """Decode TXT properties (bytes) into str, ignoring what is not UTF-8."""
    out = {}
    for k, v in properties.items():
        with contextlib.suppress(UnicodeDecodeError, AttributeError):
            out[k.decode()] = (v or b"").decode()
    return out


def key_from_txt(txt: dict[str, str]) -> bytes | None:
    """The announced public key, checked against the announced id; None if inconsistent."""
    try:
        key = base64.urlsafe_b64decode(txt.get("key", "") + "=" * (-len(txt.get("key", "")) % 4))
    except (ValueError, TypeError):
        return None
    if len(key) != 32 or node_id_from_key(key) != txt.get("id"):
        return None
    return key


class Discovery:
    """Registers this node and dials the members of its federation that appear."""

    def __init__(self, node: DiscoveryHost) -> None:
        self.node = node
        self._events: asyncio.Queue[tuple[ServiceStateChange, str]] = asyncio.Queue()
        self._addresses: dict[str, tuple[str, bytes]] = {}

    def _interfaces(self) -> list[str] | None:
        return list(self.node.config.mdns_interfaces) or None

    def _own_addresses(self) -> list[bytes]:
        ifaces = self.node.config.mdns_interfaces
        hosts = list(ifaces) if ifaces else [a.rsplit(":", 1)[0] for a in self.node.addresses]
        out = []
        for h in hosts:
            with contextlib.suppress(ValueError):
                out.append(socket.inet_aton(str(ipaddress.IPv4Address(h))))
        return out or [socket.inet_aton("127.0.0.1")]

    async def run(self) -> None:
        """Register, browse, and dial until cancelled; unregister on the way out."""
        interfaces = self._interfaces()
        azc = AsyncZeroconf(interfaces=interfaces or InterfaceChoice.All,
                            ip_version=IPVersion.V4Only)
        node = self.node
        short = node.node_id.replace("-", "")[:8].lower()
        info = AsyncServiceInfo(
            SERVICE_TYPE, f"{node.config.name}-{short}.{SERVICE_TYPE}",
            addresses=self._own_addresses(), port=node.peer_port,
            properties=txt_records(node), server=f"fl-{short}.local.",
        )
        browser: AsyncServiceBrowser | None = None
        try:
            await azc.async_register_service(info)
            log.info("mDNS: registered %s on %s", info.name, interfaces or "all interfaces")
            browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE,
                                          handlers=[self._on_change])
            while True:
                change, name = await self._events.get()
                if name == info.name:
                    continue
                if change is ServiceStateChange.Removed:
                    known = self._addresses.pop(name, None)
                    if known:
                        log.info("mDNS: %s left", name)
                        node.undial(*known)
                    continue
                await self._resolve(azc, name)
        finally:
            if browser is not None:
                with contextlib.suppress(Exception):
                    await browser.async_cancel()
            with contextlib.suppress(Exception):
                await azc.async_unregister_service(info)
            await azc.async_close()

    def _on_change(self, zeroconf: object, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        self._events.put_nowait((state_change, name))

    async def _resolve(self, azc: AsyncZeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(azc.zeroconf, 3000):
            log.debug("mDNS: could not resolve %s", name)
            return
        txt = parse_txt(info.properties)
        if txt.get("fed") != self.node.config.federation:
            return
        key = key_from_txt(txt)
        if key is None:
            log.warning("mDNS: %s announces an id that does not match its key: ignored", name)
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            return
        address = f"{addresses[0]}:{info.port}"
        if self._addresses.get(name) == (address, key):
            return
        if name not in self._addresses and len(self._addresses) >= MAX_DISCOVERED:
            log.debug("mDNS: %s ignored: %d nodes are known already", name, MAX_DISCOVERED)
            return
        old = self._addresses.get(name)
        if old:
            self.node.undial(*old)
        self._addresses[name] = (address, key)
        self.node.discovered(key, txt.get("name", ""), address)
        log.info("mDNS: found %s (%s) at %s", txt.get("name"), txt.get("id"), address)
        self.node.dial(address, key)

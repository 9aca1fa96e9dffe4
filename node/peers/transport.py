"""Peer links over aiohttp WebSockets: handshake, one link per peer, send queues, dialing.

Every link is a WebSocket on ``/fl/v2/link`` carrying an encrypted channel
(node.peers.channel) of frames (signed envelopes). The handshake is the channel's two
ephemeral keys, then two signed hellos inside it, the acceptor's first (node.peers
.handshake). Each side thereby proves it holds its key now. Bad frames are caught here, in one place: logged with their
reason, counted against the peer, and the link keeps going (a peer that keeps sending
garbage is cut off).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import WSMsgType, web

from node.common.connguard import ConnectionGuard
from node.common.health import Health
from node.common.ratelog import RateLimitedLog
from node.common.wsaccept import upgrade_refusal
from node.common.wsclose import CLOSE_GRACE, AnyWebSocket, close_ws
from node.peers.channel import WS_LIMIT, Channel
from node.peers.core import RELAY_OVERHEAD, NodeCore
from protocol.envelope import Envelope
from protocol.errors import ProtocolError
from protocol.identity import node_id_from_key
from protocol.messages import Hello

log = logging.getLogger(__name__)

LINK_PATH = "/fl/v2/link"
#: Where nodes of link protocol 1 dialed: answered 426 with the reason.
OLD_LINK_PATH = "/fl/v1/link"
#: Seconds from a link's WebSocket upgrade to the end of the signed handshake; the
#: upgrade request itself must arrive within node.common.connguard.HEADER_TIMEOUT.
HANDSHAKE_TIMEOUT = 5.0
#: Frames at least this large are decoded on a worker thread.
THREAD_DECODE_MIN = 1 << 20
#: A link is cut after this many rejected frames.
MAX_REJECTS_PER_LINK = 50


@dataclass(eq=False)
class Link:
    """One authenticated WebSocket to a peer."""

    key: bytes
    dialer: bytes
    address: str
    ws: AnyWebSocket
    #: The link's encrypted channel (node.peers.channel), with the full frame cap.
    channel: Channel
    outbox: asyncio.Queue[bytes | bytearray] = field(default_factory=lambda: asyncio.Queue(256))
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    rejects: int = 0

    @property
    def node_id(self) -> str:
        return node_id_from_key(self.key)


FrameHandler = Callable[[Link, Envelope, bytes | bytearray], Awaitable[None]]


class PeerTransport:
    """Accepts and dials peer links and moves frames between them and the node."""

    def __init__(
        self,
        core: NodeCore,
        *,
        on_frame: FrameHandler,
        on_link_up: Callable[[Link, Hello, str], None],
        on_link_down: Callable[[Link], None],
        health: Health | None = None,
    ) -> None:
        self.core = core
        #: Where unexpected failures of dialers are reported (node.common.health).
        self.health = health or Health()
        self.on_frame = on_frame
        self.on_link_up = on_link_up
        self.on_link_down = on_link_down
        self.links: dict[bytes, Link] = {}
        #: Peers the node was told are up (``on_link_up``) and not yet down.
        self._up: set[bytes] = set()
        self.address_keys: dict[str, bytes] = {}
        self._changed = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        #: Lines about what peers send, limited per peer and kind (a flood cannot fill
        #: the log: node.common.ratelog).
        self.refused_log = RateLimitedLog(log, what="refused links")
        self.untrusted_log = RateLimitedLog(log, what="untrusted handshakes")
        self.dial_log = RateLimitedLog(log, what="failed handshakes")
        self.rejected_log = RateLimitedLog(log, what="rejected messages")
        #: Seconds without any frame after which a link is considered dead.
        self.idle_timeout = 10.0
        #: Closes connections to the peer port that are not admitted links in time
        #: (node.common.connguard); the node attaches it to the server's runner.
        self.guard = ConnectionGuard()
        self.settle = self.guard.settle

    # -- server -----------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application serving ``/fl/v2/link``."""
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get(LINK_PATH, self._accept)
        app.router.add_get(OLD_LINK_PATH, _old_protocol)
        return app

    async def _accept(self, request: web.Request) -> web.StreamResponse:
        # Every WebSocket message is one record, a sealed piece (node.peers.channel): at
        # most 64 KiB and a little, so a header claiming more is refused by aiohttp at
        # once; the frame cap is the channel's, a few KiB until the handshake is done. No
        # aiohttp heartbeat: our heartbeats and the idle timeout watch a link, and
        # aiohttp's timer kept every closed socket (and its buffers) alive for 20 s, which
        # a flood of handshakes turned into memory (11 KB each; issue 12).
        refusal = upgrade_refusal(request)
        if refusal is not None:
            return refusal
        ws = web.WebSocketResponse(max_msg_size=WS_LIMIT, compress=False)
        await ws.prepare(request)
        peer_ip = request.remote or "?"
        handshake = self.core.handshake
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                channel, env, hello = await handshake.as_acceptor(ws)
                trust = handshake.admit(env.sender, hello, channel.ours)
        except (ProtocolError, TimeoutError, ConnectionError, aiohttp.ClientError) as exc:
            reason = exc.reason if isinstance(exc, ProtocolError) else type(exc).__name__
            self.refused_log.warning(peer_ip, "refused link from %s: %s", peer_ip, reason)
            self.core.reject(None, reason)
            await close_ws(ws)
            return ws
        address = f"{peer_ip}:{hello.port}"
        if trust is None:
            self._untrusted(env.sender, hello, address)
            await close_ws(ws)
            return ws
        self.settle(request)
        channel.admit(self._frame_cap())
        link = Link(key=env.sender, dialer=env.sender, address=address, ws=ws, channel=channel)
        await self._run_link(link, hello, trust)
        return ws

    def _frame_cap(self) -> int:
        """The frame cap of an admitted link: the full cap (a relay may wrap a frame of up
        to the cap, hence the overhead; node.peers.core.decode)."""
        return self.core.max_message_size + RELAY_OVERHEAD

    def _untrusted(self, key: bytes, hello: Hello, address: str) -> None:
        self.untrusted_log.info(address.rsplit(":", 1)[0], "peer %s (%s) at %s is not"
                                " trusted (no pairing, federation secret or --open): no"
                                " model traffic", hello.name, node_id_from_key(key), address)
        self.core.peers.note_untrusted(key, hello.name, address, now())

    # -- client -----------------------------------------------------------------------

    async def dial(self, address: str, expected: Callable[[bytes], bool] | None = None) -> None:
        """Keep a link to ``address`` (HOST:PORT) up for as long as the node runs.

        ``expected`` checks the key that answers (pinned by ``--peer KEY@HOST:PORT`` or
        announced by discovery); any other key is dropped as an impostor.
        """
        delay = 0.2
        while True:
            key = self.address_keys.get(address)
            if key is not None and key in self.links:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                started = time.monotonic()
                trusted = await self._dial_once(address, expected)
                if not trusted:
                    delay = 30.0
                elif time.monotonic() - started < 5.0:
                    # The other side closed at once (it does not trust us): back off.
                    delay = min(max(delay * 2, 1.0), 30.0)
                else:
                    delay = 0.2
            except (OSError, TimeoutError, aiohttp.ClientError, ProtocolError) as exc:
                reason = (exc.reason if isinstance(exc, ProtocolError)
                          else str(exc) or type(exc).__name__)
                log.debug("dial %s failed: %s", address, reason)
                if isinstance(exc, ProtocolError):
                    self.dial_log.warning(address, "handshake with %s failed: %s", address,
                                          reason)
                    self.core.reject(None, reason)
                    delay = max(delay, 30.0)  # an impostor or a stranger: do not hammer
            except Exception as exc:  # noqa: BLE001 (a bug must not end the dialing for good)
                self.health.failed(f"link to {address}", exc, action="retrying in 5 s")
                delay = max(delay, 5.0)
            else:
                self.health.recovered(f"link to {address}")
            await asyncio.sleep(delay)
            if delay < 5.0:
                delay = min(delay * 2, 5.0)

    async def _dial_once(self, address: str,
                         expected: Callable[[bytes], bool] | None = None) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            try:
                ws = await self._session.ws_connect(
                    f"http://{address}{LINK_PATH}", max_msg_size=WS_LIMIT,
                    heartbeat=20, compress=0, autoping=True,
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status in (404, 426):
                    raise ProtocolError(f"{address} does not speak link protocol 2 (HTTP"
                                        f" {exc.status} for {LINK_PATH}): it runs an older"
                                        " fl-node") from None
                raise
        handshake = self.core.handshake

        def check_key(key: bytes) -> None:
            if expected is not None and not expected(key):
                raise ProtocolError(f"{address} answered with key {node_id_from_key(key)},"
                                    " not the expected one: dropped as an impostor")

        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                channel, env, hello = await handshake.as_dialer(ws, check_key)
        except BaseException:
            await close_ws(ws)
            raise
        self.address_keys[address] = env.sender
        trust = handshake.admit(env.sender, hello, channel.ours)
        if trust is None:
            self._untrusted(env.sender, hello, address)
            await close_ws(ws)
            return False
        channel.admit(self._frame_cap())
        link = Link(key=env.sender, dialer=self.core.key, address=address, ws=ws,
                    channel=channel)
        await self._run_link(link, hello, trust)
        return True

    # -- links ------------------------------------------------------------------------

    def _prefer(self, new: Link, old: Link) -> bool:
        """Which of two links to one peer survives; both ends decide alike."""
        if new.dialer == old.dialer:
            return True  # a re-dial: the old link is stale
        return new.dialer < old.dialer

    async def _run_link(self, link: Link, hello: Hello, trust: str) -> None:
        """Run ``link`` until it ends. The node hears ``on_link_up`` and ``on_link_down`` in
        pairs per peer: up when a link to it first serves, down when the link serving it
        ends with none to take over, whatever order concurrent links (both sides dialing,
        re-dials) come and go in, and also if this task is cancelled (an undial)."""
        old = self.links.get(link.key)
        if old is not None and not self._prefer(link, old):
            log.debug("duplicate link to %s dropped", link.node_id)
            await close_ws(link.ws)
            return
        self.links[link.key] = link
        writer: asyncio.Task[None] | None = None
        try:
            if old is not None:
                old.closed.set()
                await close_ws(old.ws)
                if self.links.get(link.key) is not link:
                    # A newer link took over while the old one closed: that one serves
                    # the peer; announcing this one would count a peer no link serves.
                    log.debug("link to %s superseded while it came up", link.node_id)
                    return
            # Also on a replacement link: the peer may have restarted behind us (catch-up).
            self._up.add(link.key)
            self.on_link_up(link, hello, trust)
            self._changed.set()
            log.info("link up: %s (%s) at %s", hello.name, link.node_id, link.address)
            writer = asyncio.create_task(self._writer(link))
            await self._reader(link)
        finally:
            # The bookkeeping first, with no await before it: a cancellation arriving in
            # the closing below must not leave the peer counted as connected.
            if self.links.get(link.key) is link:
                del self.links[link.key]
                if link.key in self._up:
                    self._up.discard(link.key)
                    log.info("link down: %s", link.node_id)
                    self.on_link_down(link)
            self._changed.set()
            link.closed.set()
            if writer is not None:
                writer.cancel()
            if not link.ws.closed:
                await close_ws(link.ws)
            if writer is not None:
                # wait() and not ``await writer``: a cancellation of this task while it
                # waits must end it, not be taken for the writer's and swallowed.
                await asyncio.wait({writer})

    async def _reader(self, link: Link) -> None:
        ws = link.ws
        while not link.closed.is_set():
            try:
                # Our own timeout around all of receive(), not receive(timeout=...): aiohttp
                # applies that one to the wait for a frame only, not to the pong or close
                # it sends from inside receive(), which blocks on a peer that reads nothing.
                async with asyncio.timeout(self.idle_timeout):
                    msg = await ws.receive()
            except TimeoutError:
                # Peers send a heartbeat every second: this much silence means the link is
                # dead even if TCP has not noticed (a partition, a pulled cable).
                log.warning("link to %s silent for %.0f s: closing it", link.node_id,
                            self.idle_timeout)
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:
                log.warning("link %s: %s", link.node_id, msg.data)
                return
            if msg.type != WSMsgType.BINARY:
                self._reject(link, f"unexpected websocket frame type {msg.type.name}")
            else:
                try:
                    # Returns at once for most records of a large frame: their pieces are
                    # opened on worker threads while the next records arrive.
                    frame = await link.channel.take(msg.data)
                except ProtocolError as exc:
                    self._reject(link, exc.reason)
                    log.warning("cutting link to %s: its records cannot be read",
                                link.node_id)
                    return  # the channel is lost: nothing after this record can be read
                if frame is not None:
                    await self._handle(link, frame)
            if link.rejects >= MAX_REJECTS_PER_LINK:
                log.warning("cutting link to %s: too many bad messages", link.node_id)
                return

    async def _handle(self, link: Link, frame: bytearray) -> None:
        """Decode one frame and hand it on (or count it against the link)."""
        try:
            if len(frame) >= THREAD_DECODE_MIN:
                env = await asyncio.to_thread(self.core.decode, frame)
            else:
                env = self.core.decode(frame)
            await self.on_frame(link, env, frame)
        except ProtocolError as exc:
            self._reject(link, exc.reason)

    def _reject(self, link: Link, reason: str) -> None:
        link.rejects += 1
        self.core.reject(link.key, reason)
        self.rejected_log.warning(link.node_id, "rejected message from %s: %s",
                                  link.node_id, reason)

    async def _writer(self, link: Link) -> None:
        try:
            while True:
                frame = await link.outbox.get()
                await link.channel.send(frame)
                self.core.counters.bytes_sent += len(frame)
                self.core.counters.messages_sent += 1
        except (ConnectionError, aiohttp.ClientError) as exc:
            # The connection broke under a send: end the link (the reader sees the close)
            # rather than leave it up with a writer that is gone.
            log.warning("link to %s: send failed (%s): closing it", link.node_id,
                        str(exc) or type(exc).__name__)
            link.closed.set()
            await close_ws(link.ws)

    def send(self, key: bytes, frame: bytes | bytearray) -> bool:
        """Queue ``frame`` for ``key``; False if there is no link (or its queue is full)."""
        link = self.links.get(key)
        if link is None:
            return False
        try:
            link.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            log.warning("send queue to %s full: message dropped", link.node_id)
            return False
        return True

    def broadcast(self, frame: bytes | bytearray) -> int:
        """Queue ``frame`` for every linked peer; returns how many."""
        return sum(self.send(key, frame) for key in list(self.links))

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Close every link (all at once, each peer given ``grace`` seconds to answer the
        close frame) and the client session. A slow or vanished peer does not hold up a
        shutdown: its connection is dropped when the grace is over."""
        links = list(self.links.values())
        for link in links:
            link.closed.set()

        await asyncio.gather(*(close_ws(link.ws, grace) for link in links))
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _old_protocol(request: web.Request) -> web.StreamResponse:
    """``/fl/v1/link``: a node of link protocol 1 learns why it is refused."""
    return web.Response(status=426, headers={"Upgrade": "websocket"},
                        text=f"this node speaks link protocol 2 ({LINK_PATH}, encrypted); "
                             "upgrade fl-node\n")


def now() -> float:
    """The monotonic clock the node runs its round machine on."""
    return time.monotonic()

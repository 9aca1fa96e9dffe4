"""Closing peer links never waits on a peer that does not read or answer: shutdown, and a
link found dead, finish within the close grace, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from node.peers.transport import Link, PeerTransport, close_ws

from .fakes import idle_channel


class SilentSocket:
    """A WebSocket whose peer never answers the close frame (a frozen or vanished host)."""

    def __init__(self) -> None:
        self.close_started = False

    async def close(self, **how: object) -> bool:
        self.close_started = True
        await asyncio.Event().wait()  # forever
        return True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class PoliteSocket:
    def __init__(self) -> None:
        self.closed = False

    async def close(self, **how: object) -> bool:
        self.closed = True
        return True


def test_close_gives_each_silent_peer_the_grace_at_once_and_closes_the_rest():
    async def main() -> None:
        transport = PeerTransport(None, on_frame=None, on_link_up=None,  # type: ignore[arg-type]
                                  on_link_down=None)
        silent = [SilentSocket() for _ in range(5)]
        polite = PoliteSocket()
        for i, ws in enumerate([*silent, polite]):
            key = bytes([i]) * 32
            transport.links[key] = Link(key=key, dialer=key, address=f"10.0.0.{i}:1",
                                        ws=ws,  # type: ignore[arg-type]
                                        channel=idle_channel(ws))
        # Without the grace this never returns; with it, five silent peers cost one grace
        # (they are closed together), well within the bound below.
        await asyncio.wait_for(transport.close(grace=0.2), timeout=5)
        assert polite.closed
        assert all(ws.close_started for ws in silent)
        assert all(link.closed.is_set() for link in transport.links.values())

    asyncio.run(main())


class FrozenPeer:
    """A WebSocket server on 127.0.0.1 whose peer, once a client connects, reads nothing
    more (a stopped process, a cut cable): ``frozen`` is set then. After ``then(ws)``, if
    given, it sends nothing more either. Leaving the context drops it."""

    def __init__(self, then: Callable[[web.WebSocketResponse], Awaitable[None]] | None
                 ) -> None:
        self.then = then
        self.frozen, self.release = asyncio.Event(), asyncio.Event()
        self.port = 0

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        request.transport.pause_reading()  # the peer reads nothing more
        self.frozen.set()
        if self.then is not None:
            await self.then(ws)
        await self.release.wait()
        request.transport.abort()  # the test is over: the frozen side goes too
        return ws


@contextlib.asynccontextmanager
async def frozen_peer(then: Callable[[web.WebSocketResponse], Awaitable[None]] | None = None
                      ) -> AsyncIterator[FrozenPeer]:
    peer = FrozenPeer(then)
    app = web.Application()
    app.router.add_get("/", peer.handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    peer.port = runner.addresses[0][1]
    try:
        yield peer
    finally:
        peer.release.set()
        await runner.cleanup()


def test_a_websocket_to_a_peer_that_stopped_reading_is_dropped_within_the_grace():
    """A frozen peer (it stops reading: a stopped process, a cut cable) with our send
    buffers full: a plain close() blocks on flushing them for as long as TCP retries
    (many minutes). close_ws drops the connection after its grace instead."""
    async def main() -> None:
        async with frozen_peer() as peer:
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(f"http://127.0.0.1:{peer.port}/")
                await peer.frozen.wait()
                chunk = bytes(1 << 20)
                # Fill the socket buffers both ways until a send blocks.
                for _ in range(512):
                    try:
                        await asyncio.wait_for(ws.send_bytes(chunk), timeout=0.5)
                    except TimeoutError:
                        break
                else:
                    raise AssertionError("512 MB went into a peer that reads nothing")
                await asyncio.wait_for(close_ws(ws, grace=0.3), timeout=10)
                # the connection is gone: the client side sees it closed
                await asyncio.wait_for(_closed(ws), timeout=10)

    asyncio.run(main())


async def _closed(ws: aiohttp.ClientWebSocketResponse) -> None:
    while not ws.closed:
        msg = await ws.receive()
        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return


def test_a_link_whose_peer_froze_after_a_ping_is_closed_within_the_idle_timeout():
    """The reader's idle timeout bounds all of receive(). aiohttp's own receive(timeout=)
    bounds only the wait for a frame: the pong it sends from inside receive() for a peer's
    ping blocks, with our send buffers full, for as long as TCP retries, and the link of a
    peer that froze (or was cut off) right after its ping stayed up for minutes."""
    async def main() -> None:
        go_ping, pinged = asyncio.Event(), asyncio.Event()

        async def last_words(ws: web.WebSocketResponse) -> None:
            await go_ping.wait()
            await ws.ping(b"last words")  # its last frame before it goes silent
            pinged.set()

        async with frozen_peer(then=last_words) as peer:
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(f"http://127.0.0.1:{peer.port}/", autoping=True)
                await peer.frozen.wait()
                # Our writer sends until it blocks on the full buffers, as a node's does.
                sent = 0

                async def fill() -> None:
                    nonlocal sent
                    while True:
                        await ws.send_bytes(bytes(1 << 20))
                        sent += 1

                filler = asyncio.create_task(fill())
                last = -1
                while sent != last:
                    last = sent
                    await asyncio.sleep(0.3)
                assert sent < 512, "512 MB went into a peer that reads nothing"
                # Our writes since the last flow-control wait now sum to exactly aiohttp's
                # limit: the next frame we write, the pong, is the one that waits to drain.
                writer = ws._writer  # noqa: SLF001 (the scenario needs this exact state)
                room = writer._limit - writer._output_size  # noqa: SLF001
                header = (2 if room < 126 + 6 else 4 if room < 65536 + 8 else 10) + 4  # + mask
                await ws.send_bytes(bytes(room - header))
                assert writer._output_size == writer._limit  # noqa: SLF001
                go_ping.set()
                await pinged.wait()
                transport = PeerTransport(None, on_frame=None,  # type: ignore[arg-type]
                                          on_link_up=None, on_link_down=None)
                transport.idle_timeout = 0.5
                key = b"\x01" * 32
                link = Link(key=key, dialer=key, address=f"127.0.0.1:{peer.port}", ws=ws,
                            channel=idle_channel(ws))
                # Without the bound on all of receive() this waits on TCP for minutes.
                try:
                    await asyncio.wait_for(transport._reader(link), timeout=10)  # noqa: SLF001
                finally:
                    await close_ws(ws, grace=0.3)
                    filler.cancel()

    asyncio.run(main())

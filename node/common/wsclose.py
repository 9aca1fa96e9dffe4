"""Closing a WebSocket without waiting on a peer that does not read: peer links and
dashboard sockets alike."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import aiohttp
from aiohttp import web

#: Seconds a peer gets to take our close frame (and answer it) before the connection is
#: dropped: a frozen or cut-off peer stops reading, and a close would wait on TCP for
#: many minutes while the link still counts as up.
CLOSE_GRACE = 2.0

AnyWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def close_ws(ws: AnyWebSocket, grace: float = CLOSE_GRACE, *,
                   code: int = aiohttp.WSCloseCode.OK, message: bytes = b"") -> None:
    """Close ``ws`` (with ``code`` and ``message``) politely if the peer takes it within
    ``grace`` seconds, else drop the connection (RST, nothing more sent). Never raises (but
    for a cancellation, after the drop) and never waits longer than ``grace``."""
    try:
        async with asyncio.timeout(grace):
            await ws.close(code=code, message=message)
        return
    except TimeoutError:
        pass
    except asyncio.CancelledError:
        _reset(ws)
        raise
    except Exception:  # noqa: BLE001 (a broken connection: drop it below)
        pass
    _reset(ws)


def _reset(ws: AnyWebSocket) -> None:
    """Drop the connection under ``ws`` at once (RST), whatever is left to send."""
    sock = ws.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # The blocked writes fail at once, and the transport closes the socket.
            sock.shutdown(socket.SHUT_RDWR)

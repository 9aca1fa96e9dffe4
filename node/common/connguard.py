"""Connections that have proved nothing yet are few and short-lived.

Both of a node's servers (the peer port and the web port) hold every TCP connection in an
aiohttp request handler until the connection closes. A connection is *pending* until it
has shown it is worth keeping: on the web port, a request's headers arrived (the
``middleware`` marks it); on the peer port, the signed handshake admitted the peer (the
transport marks it). Three limits keep strangers from holding a node's sockets:

* request headers must arrive within ``HEADER_TIMEOUT`` seconds of the connection (or of
  the previous response on a kept-alive one): aiohttp's keep-alive timer, which runs
  from the connection's start, closes it otherwise (``server_options``);
* a pending connection is closed ``PENDING_DEADLINE`` seconds after it was first seen,
  whatever it sends (a slow upgrade, a handshake that never ends);
* at most ``MAX_PENDING_PER_ADDRESS`` pending connections per remote address, counting
  those seen pending for ``CROWD_GRACE`` seconds or more: the oldest beyond it are closed
  at the next sweep (every ``SWEEP_INTERVAL`` seconds). The grace and the order keep a
  legitimate client that shares an address with a flood (behind one NAT, or on the same
  host) usable: its request arrives within milliseconds and is settled before it counts,
  and the flood's oldest sockets go first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

HEADER_TIMEOUT = 5.0
PENDING_DEADLINE = 10.0
MAX_PENDING_PER_ADDRESS = 16
CROWD_GRACE = 1.0
SWEEP_INTERVAL = 0.5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_options() -> dict[str, Any]:
    """Options for an ``aiohttp.web.AppRunner`` guarded by a ConnectionGuard."""
    return {"keepalive_timeout": HEADER_TIMEOUT}


class ConnectionGuard:
    """Closes a server's pending connections that are too old or too many (module doc)."""

    def __init__(self, *, max_per_address: int = MAX_PENDING_PER_ADDRESS,
                 deadline: float = PENDING_DEADLINE, grace: float = CROWD_GRACE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_per_address = max_per_address
        self.deadline = deadline
        self.grace = grace
        self.clock = clock
        self.runner: web.BaseRunner | None = None
        #: When each live connection was first seen; settled ones are in ``_settled``.
        self._seen: dict[RequestHandler, float] = {}
        self._settled: set[RequestHandler] = set()
        #: Connections closed for age and for crowding, since the start.
        self.closed_late = 0
        self.closed_crowded = 0

    def settle(self, request: web.BaseRequest) -> None:
        """``request``'s connection has shown it is worth keeping."""
        self._settled.add(request.protocol)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """For the web port: a connection whose request headers arrived is settled."""
        self.settle(request)
        return await handler(request)

    def sweep(self) -> int:
        """Close what is too old or too many now; returns how many were closed."""
        if self.runner is None or self.runner.server is None:
            return 0
        live = self.runner.server.connections
        now = self.clock()
        seen = {h: self._seen.get(h, now) for h in live}
        self._seen = seen
        self._settled.intersection_update(seen)
        crowds: dict[str, list[RequestHandler]] = {}
        doomed: list[RequestHandler] = []
        for handler, first in seen.items():
            if handler in self._settled or handler.transport is None:
                continue
            if now - first >= self.deadline:
                self.closed_late += 1
                doomed.append(handler)
            elif now - first >= self.grace:
                crowds.setdefault(_address(handler), []).append(handler)
        for crowd in crowds.values():
            crowd.sort(key=seen.__getitem__)  # oldest first
            excess = crowd[:max(0, len(crowd) - self.max_per_address)]
            self.closed_crowded += len(excess)
            doomed.extend(excess)
        for handler in doomed:
            handler.force_close()
        return len(doomed)

    async def run(self) -> None:
        """Sweep for as long as the node runs."""
        while True:
            self.sweep()
            await asyncio.sleep(SWEEP_INTERVAL)


def _address(handler: RequestHandler) -> str:
    transport = handler.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "?"

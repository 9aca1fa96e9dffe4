"""Test doubles for the TUI: an in-memory data source and a minimal node web server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import WSMsgType, web

from tui.source import SourceError

TOKEN = "test-token-0123456789"
PAIRING_URI = "fl-node://pair?v=1&key=k&name=alpha&fed=lab&addr=127.0.0.1:7700&token=t&exp=9"


def peer(name: str, node_id: str, *, state: str = "connected", rtt_ms: float | None = 4.0,
         round_: int = 3, links: tuple[str, ...] = ()) -> dict[str, Any]:
    """A peer object of the status (contract shape)."""
    return {"node_id": node_id, "name": name, "address": "127.0.0.1:7701", "state": state,
            "trusted": True, "trust": "paired", "round": round_, "peer_state": "training",
            "last_seen": time.time(), "rtt_ms": rtt_ms, "links": list(links)}


def status(*, round_: int = 3, rounds_total: int = 10, state: str = "training",
           peers: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """A status object of node ``alpha`` (contract shape)."""
    return {"node_id": "AAAA-BBBB-CCCC-DDDD-E", "name": "alpha", "federation": "lab",
            "state": state, "mode": "elected", "quorum": {"need": 2, "have": 3},
            "round": round_, "rounds_total": rounds_total, "current_round": round_ + 1,
            "aggregator": None, "is_aggregator": True, "attempt": 0,
            "peers": peers if peers is not None else [], **extra}


def message(kind: str, data: Any, ts: float | None = None) -> dict[str, Any]:
    """A WebSocket event as the node sends it."""
    return {"type": kind, "data": data, "ts": time.time() if ts is None else ts}


class FakeSource:
    """An in-memory DataSource: the test feeds messages; commands are recorded.

    ``feed`` returns once the app's worker has taken every message (it has then posted
    them to the app; a ``pilot.pause()`` lets the app handle them). A command raises
    ``failure`` when it is set.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.calls: list[str] = []
        self.failure: SourceError | None = None

    async def feed(self, *messages: dict[str, Any]) -> None:
        """Queue ``messages`` and wait until the consumer has taken them all."""
        for m in messages:
            self.queue.put_nowait(m)
        await asyncio.wait_for(self.queue.join(), 5)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The fed messages, in order."""
        while True:
            m = await self.queue.get()
            try:
                yield m
            finally:
                self.queue.task_done()

    async def _command(self, name: str, answer: str) -> str:
        self.calls.append(name)
        if self.failure is not None:
            raise self.failure
        return answer

    async def start(self) -> str:
        """Record the call; answer ``training``."""
        return await self._command("start", "training")

    async def stop(self) -> str:
        """Record the call; answer ``stopped``."""
        return await self._command("stop", "stopped")

    async def pairing_uri(self) -> str:
        """Record the call; answer PAIRING_URI."""
        return await self._command("pairing_uri", PAIRING_URI)


class FakeNode:
    """Just enough of a node's web API for NodeSource: status, history, commands and /ws.

    One instance can serve several successive servers (a node that restarts): ``app()``
    makes a fresh aiohttp application each time. ``ws_tokens`` lists the token of every
    WebSocket auth message; ``posts`` the (path, Authorization, body) of every POST.
    """

    def __init__(self) -> None:
        self.status = status()
        self.rounds = [{"round": 1, "accuracy": 0.5, "loss": 1.2, "ts": 1000.0},
                       {"round": 2, "accuracy": 0.7, "loss": 0.8, "ts": 1060.0}]
        self.events = [{"ts": 1001.0, "kind": "start", "detail": "node started"}]
        self.ws_tokens: list[str] = []
        self.posts: list[tuple[str, str, Any]] = []
        self.sockets: set[web.WebSocketResponse] = set()

    def app(self) -> web.Application:
        """A fresh application serving this node."""
        app = web.Application()
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/metrics", self._metrics)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/start", self._command)
        app.router.add_post("/api/stop", self._command)
        app.router.add_post("/api/pair/offer", self._command)
        app.router.add_get("/ws", self._ws)
        app.on_shutdown.append(self._close_sockets)
        return app

    async def push(self, event: dict[str, Any]) -> None:
        """Send ``event`` to every authenticated WebSocket."""
        for ws in list(self.sockets):
            await ws.send_json(event)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.json_response({"node_id": self.status["node_id"], "rounds": self.rounds})

    async def _events(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "100"))
        return web.json_response({"events": self.events[-limit:]})

    async def _command(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        body = await request.json() if request.can_read_body else None
        self.posts.append((request.path, auth, body))
        if auth != f"Bearer {TOKEN}":
            return web.json_response({"error": "missing or wrong API token"}, status=401)
        if request.path == "/api/pair/offer":
            if not isinstance(body, dict) or body.get("ttl") != 600:
                return web.json_response({"error": "ttl: 1 to 86400 seconds"}, status=400)
            return web.json_response({"uri": PAIRING_URI})
        if request.path == "/api/stop" and self.status["state"] == "stopped":
            return web.json_response({"error": "not training"}, status=400)
        self.status["state"] = "training" if request.path == "/api/start" else "stopped"
        return web.json_response({"state": self.status["state"]})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        first = await ws.receive(timeout=5)
        auth = first.json() if first.type == WSMsgType.TEXT else {}
        self.ws_tokens.append(auth.get("token", ""))
        if auth.get("type") != "auth" or auth.get("token") != TOKEN:
            await ws.send_json({"type": "error", "error": "unauthorized"})
            await ws.close(code=4401)
            return ws
        self.sockets.add(ws)
        try:
            await ws.send_json({"type": "hello", "data": self.status, "ts": time.time()})
            async for _ in ws:
                pass  # the client sends nothing more in these tests
        finally:
            self.sockets.discard(ws)
        return ws

    async def _close_sockets(self, app: web.Application) -> None:
        for ws in list(self.sockets):
            await ws.close()

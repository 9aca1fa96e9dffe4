"""Where the TUI's data comes from: the :class:`DataSource` seam and the real node client.

A data source yields messages shaped like the node's WebSocket events (``hello``,
``status_update``, ``metrics_update``, ``round_completed``, ``training_started``,
``training_stopped``, ``peer_joined``, ``peer_left``, ``event``) plus a synthetic
``{"type": "connection", "data": {"connected": bool, "error": str | None}}`` (with
``retry_in`` seconds while disconnected), and carries out the operator's commands. It
knows nothing of widgets; the app consumes it in one worker.

:class:`NodeSource` talks to a running node over its REST + WebSocket API (see the
control-plane contract). It keeps reconnecting, with a capped backoff, until the app ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Protocol

import aiohttp
from yarl import URL

#: How many past events to show on (re)connecting.
HISTORY_EVENTS = 100
#: How long a pairing code made from the TUI stays valid, in seconds.
PAIRING_TTL_S = 600
#: WebSocket close code of a node that refused the API token (contract).
CLOSE_UNAUTHORIZED = 4401


class SourceError(Exception):
    """A failure talking to the node, worded for the operator (no traceback needed)."""


class DataSource(Protocol):
    """What the TUI needs from a node: a feed of messages and three commands."""

    def events(self) -> AsyncIterator[dict[str, Any]]:
        """Messages from the node, until the consumer stops iterating."""
        ...

    async def start(self) -> str:
        """Ask the node to start training; return its new state. Raises SourceError."""
        ...

    async def stop(self) -> str:
        """Ask the node to stop training; return its new state. Raises SourceError."""
        ...

    async def pairing_uri(self) -> str:
        """A fresh one-time pairing URI of the node. Raises SourceError."""
        ...


def connection_message(connected: bool, error: str | None = None,
                       retry_in: float | None = None) -> dict[str, Any]:
    """The synthetic message that reports the link to the node coming up or going down."""
    data: dict[str, Any] = {"connected": connected, "error": error}
    if retry_in is not None:
        data["retry_in"] = retry_in
    return {"type": "connection", "data": data, "ts": time.time()}


def describe(exc: BaseException) -> str:
    """A one-line, operator-readable account of a failure to reach or talk to the node."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        # asyncio words a refusal "Connect call failed (addr)"; errno names the cause.
        errno = exc.os_error.errno
        reason = os.strerror(errno).lower() if errno else str(exc.os_error) or "unreachable"
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"the node refused the WebSocket (HTTP {exc.status})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the node closed the connection"
    if isinstance(exc, asyncio.TimeoutError):
        return "the node did not answer in time"
    return str(exc) or type(exc).__name__


class NodeSource:
    """A :class:`DataSource` backed by a running node's HTTP API and WebSocket.

    Use it as an async context manager (it owns an ``aiohttp.ClientSession``). On each
    connection it first replays history (``GET /api/status``, ``/api/metrics``,
    ``/api/events``) as ``status_update``, ``metrics_update`` and ``event`` messages, then
    authenticates on ``/ws`` and forwards what the node pushes. When the node goes away it
    yields ``connection`` False and tries again after ``min_backoff`` seconds, doubling up
    to ``max_backoff``; the delay resets once the node says hello again.
    """

    def __init__(self, url: str, token: str, *, min_backoff: float = 0.5,
                 max_backoff: float = 5.0, request_timeout: float = 10.0) -> None:
        base = URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"not a node address: {url!r} (expected http://HOST:PORT)")
        self._base = base.with_path("/")
        self._token = token
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session: aiohttp.ClientSession | None = None
        # Events up to this time have been shown; history refetched later skips them.
        self._events_seen_until = 0.0

    async def __aenter__(self) -> NodeSource:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session; stop iterating :meth:`events` first."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                       *, missing_ok: bool = False) -> dict[str, Any]:
        """One JSON call. Raises SourceError, in the node's own words when it says no.

        With ``missing_ok`` a 404 (an endpoint this node does not have) reads as ``{}``.
        """
        headers = {"Authorization": f"Bearer {self._token}"} if method == "POST" else None
        try:
            async with self._http().request(method, self._base.join(URL(path)), json=body,
                                            headers=headers) as response:
                raw = await response.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise SourceError(describe(exc)) from None
        if response.status == 404 and missing_ok:
            return {}
        if response.status == 401:
            raise SourceError("the node refused the API token (HTTP 401): use the token in"
                              " the node's state directory (api.token)")
        try:
            payload = json.loads(raw) if raw.strip() else {}
        except ValueError:
            payload = None
        if response.status >= 400:
            error = payload.get("error") if isinstance(payload, dict) else None
            reason = error if isinstance(error, str) else response.reason or "error"
            raise SourceError(f"{method} {URL(path).path}: HTTP {response.status}: {reason}")
        if not isinstance(payload, dict):
            raise SourceError(f"{method} {URL(path).path}: the answer is not a JSON object")
        return payload

    async def start(self) -> str:
        """``POST /api/start``: ask the node to start training; return its new state."""
        return str((await self._request("POST", "/api/start", {})).get("state", "unknown"))

    async def stop(self) -> str:
        """``POST /api/stop``: ask the node to stop training; return its new state."""
        return str((await self._request("POST", "/api/stop", {})).get("state", "unknown"))

    async def pairing_uri(self) -> str:
        """``POST /api/pair/offer``: a one-time pairing URI valid for PAIRING_TTL_S."""
        offer = await self._request("POST", "/api/pair/offer", {"ttl": PAIRING_TTL_S})
        uri = offer.get("uri")
        if not isinstance(uri, str) or not uri:
            raise SourceError("the node's pairing offer has no URI")
        return uri

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """History, then live events; ``connection`` messages as the link changes. Endless."""
        delay = self._min_backoff
        while True:
            try:
                for message in await self._history():
                    yield message
                async with self._http().ws_connect(self._base.join(URL("/ws")),
                                                   heartbeat=10.0) as ws:
                    await ws.send_json({"type": "auth", "token": self._token})
                    while True:
                        message = await self._receive(ws)
                        if message["type"] == "hello":
                            delay = self._min_backoff
                            yield connection_message(True)
                        elif message["type"] == "event":
                            self._note_event(message.get("ts"))
                        yield message
            except SourceError as exc:
                error = str(exc)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                error = describe(exc)
            yield connection_message(False, error, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)

    async def _history(self) -> list[dict[str, Any]]:
        """What happened before this connection, as messages of the live vocabulary."""
        status = await self._request("GET", "/api/status")
        metrics = await self._request("GET", "/api/metrics", missing_ok=True)
        events = await self._request("GET", f"/api/events?limit={HISTORY_EVENTS}",
                                     missing_ok=True)
        now = time.time()
        messages: list[dict[str, Any]] = [{"type": "status_update", "data": status, "ts": now}]
        rounds = metrics.get("rounds")
        for record in rounds if isinstance(rounds, list) else ():
            if isinstance(record, dict):
                messages.append({"type": "metrics_update", "data": record,
                                 "ts": record.get("ts", now)})
        past = events.get("events")
        for event in past if isinstance(past, list) else ():
            ts = event.get("ts") if isinstance(event, dict) else None
            if isinstance(ts, int | float) and ts > self._events_seen_until:
                messages.append({"type": "event", "ts": ts,
                                 "data": {"kind": event.get("kind"),
                                          "detail": event.get("detail")}})
                self._note_event(ts)
        return messages

    def _note_event(self, ts: object) -> None:
        if isinstance(ts, int | float) and not isinstance(ts, bool):
            self._events_seen_until = max(self._events_seen_until, float(ts))

    @staticmethod
    async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        """The next well-formed message; SourceError when the socket ends or auth fails."""
        while True:
            frame = await ws.receive()
            if frame.type == aiohttp.WSMsgType.ERROR:
                raise SourceError(f"connection error: {describe(frame.data)}")
            if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED):
                if ws.close_code == CLOSE_UNAUTHORIZED:
                    raise SourceError("the node refused the API token (unauthorized)")
                raise SourceError("the node closed the connection")
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                message = json.loads(frame.data)
            except ValueError:
                continue  # garbage from the node is dropped, not shown
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                continue
            if message["type"] == "error":
                if message.get("error") == "unauthorized":
                    raise SourceError("the node refused the API token (unauthorized)")
                raise SourceError(f"the node reported an error: {message.get('error')}")
            return message

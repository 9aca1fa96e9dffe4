"""The browser dashboard and the node's control plane, on the node's aiohttp app.

``add_dashboard`` mounts the page (``/``, ``/static/app.js``, ``/static/style.css``), the
live WebSocket (``/ws``), the control and read endpoints (``/api/peers``, ``/api/config``,
``/api/start``, ``/api/stop``, ``/api/events``) and Prometheus ``/metrics`` (see
docs/api.md). It talks to the node only through the ``Controllable`` protocol, and the node
pushes live events through an ``EventHub`` (node.web.hub); neither knows about the other's
internals.

Every request is checked by ``host_origin_guard`` (node.web.hostguard: DNS rebinding, CSRF);
every mutating call needs ``Authorization: Bearer <token>`` and takes only the body keys
it documents (node.web.httputil.json_object), and a WebSocket authenticates with its first
message.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web

from node.common.wsaccept import upgrade_refusal
from node.common.wsclose import close_ws
from node.web.hostguard import host_origin_guard
from node.web.httputil import UNAUTHORIZED, bearer_ok, error, json_object, parse_json, unknown_keys
from node.web.hub import STATUS_UPDATE, EventHub, HubEvent, SubscriberLagging, Subscription, message

log = logging.getLogger(__name__)

#: The close code a WebSocket gets when it did not authenticate (contract: 4401).
WS_UNAUTHORIZED = 4401
#: The most events ``/api/events`` returns at once.
MAX_EVENTS_LIMIT = 1000
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_STATIC_DIR = Path(__file__).with_name("static")
#: Everything /static/{name} serves; index.html is served at / only.
_STATIC_TYPES = {"app.js": "text/javascript", "style.css": "text/css"}
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}
_PEER_STATES = ("connected", "relayed", "suspect", "gone", "untrusted", "banned")


class Controllable(Protocol):
    """What the dashboard needs from a node. ``node.daemon.Node`` implements it."""

    @property
    def api_token(self) -> str:
        """The secret every mutating call must present."""
        ...

    @property
    def state(self) -> str:
        """The node's state word (``training``, ``stopped``, ...)."""
        ...

    def status(self) -> dict[str, Any]:
        """The status object of the contract, ``resources`` included."""
        ...

    async def metrics(self) -> list[dict[str, Any]]:
        """One record per completed round, oldest first."""
        ...

    async def events(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` event-log entries ``{"ts", "kind", "detail"}``, oldest first."""
        ...

    def config_view(self) -> dict[str, Any]:
        """Every configuration key with its current (JSON-able) value."""
        ...

    def runtime_keys(self) -> frozenset[str]:
        """The keys ``apply_config`` accepts while the node runs."""
        ...

    async def apply_config(self, changes: dict[str, Any]) -> list[str]:
        """Apply all changes or none; return the keys applied.

        Raises ValueError with a message for the user on an unknown or non-runtime key or
        a bad value.
        """
        ...

    async def start_training(self) -> None:
        """Start (or resume) rounds. Raises ValueError with a reason when it cannot now."""
        ...

    async def stop_training(self) -> None:
        """Stop after the current step. Raises ValueError with a reason when it cannot now."""
        ...


# -- Prometheus ---------------------------------------------------------


def _sample_value(value: object) -> str | None:
    """A sample value in exposition syntax, or None for no sample (missing or NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(status: Mapping[str, Any]) -> str:
    """The node's metrics in the Prometheus text exposition format 0.0.4.

    A sample whose value is missing, null or NaN is left out, and so is a family left with
    no samples (``fl_node_epsilon`` appears only when privacy is on).
    """
    node = {"node_id": str(status.get("node_id", ""))}
    res = status.get("resources") or {}
    traffic = status.get("traffic") or {}
    privacy = status.get("privacy")
    peers = collections.Counter(str(p.get("state")) for p in status.get("peers") or []
                                if isinstance(p, dict))
    families: list[tuple[str, str, str, list[tuple[dict[str, str], object]]]] = [
        ("fl_node_round", "gauge", "Completed federated-learning rounds.",
         [(node, status.get("round"))]),
        ("fl_node_rounds_planned", "gauge", "Rounds the federation is configured to run.",
         [(node, status.get("rounds_total"))]),
        ("fl_node_accuracy", "gauge", "Accuracy of the latest evaluated global model.",
         [(node, status.get("accuracy"))]),
        ("fl_node_loss", "gauge", "Loss of the latest evaluated global model.",
         [(node, status.get("loss"))]),
        ("fl_node_peers", "gauge", "Known peers by state.",
         [({**node, "state": s}, peers.get(s, 0)) for s in sorted({*_PEER_STATES, *peers})]),
        ("fl_node_bytes_sent_total", "counter", "Bytes sent to peers.",
         [(node, traffic.get("bytes_sent"))]),
        ("fl_node_bytes_received_total", "counter", "Bytes received from peers.",
         [(node, traffic.get("bytes_received"))]),
        ("fl_node_epsilon", "gauge", "Differential-privacy budget spent (epsilon).",
         [(node, privacy.get("epsilon"))] if isinstance(privacy, dict) else []),
        ("fl_node_cpu_percent", "gauge", "CPU used by the node process, percent of one core.",
         [(node, res.get("cpu_percent"))]),
        ("fl_node_memory_rss_bytes", "gauge", "Resident memory of the node process.",
         [(node, res.get("memory_rss"))]),
    ]
    lines: list[str] = []
    for name, kind, help_text, samples in families:
        rendered = []
        for labels, value in samples:
            text = _sample_value(value)
            if text is not None:
                label_text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
                rendered.append(f"{name}{{{label_text}}} {text}")
        if rendered:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *rendered]
    return "\n".join(lines) + "\n"


# -- the routes -----------------------------------------------------------------------


def _client_message(msg: aiohttp.WSMessage) -> dict[str, Any]:
    """A client's JSON object message; empty for anything else (a repeated key included)."""
    if msg.type is not WSMsgType.TEXT:
        return {}
    try:
        body = parse_json(msg.data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class _Stalled(Exception):
    """A send to a browser waited ``send_timeout`` seconds: it is not reading."""


class _Dashboard:
    """The handlers, bound to one node and hub."""

    def __init__(self, node: Controllable, hub: EventHub, *, auth_timeout: float,
                 status_interval: float, send_timeout: float) -> None:
        self.node = node
        self.hub = hub
        self.auth_timeout = auth_timeout
        self.status_interval = status_interval
        self.send_timeout = send_timeout
        self.index_html = (_STATIC_DIR / "index.html").read_bytes()
        self.static = {name: (_STATIC_DIR / name).read_bytes() for name in _STATIC_TYPES}
        self.sockets: set[web.WebSocketResponse] = set()

    # -- page and static files

    async def index(self, request: web.Request) -> web.Response:
        """GET /: the dashboard page."""
        return web.Response(body=self.index_html, content_type="text/html", charset="utf-8",
                            headers=_PAGE_HEADERS)

    async def static_file(self, request: web.Request) -> web.Response:
        """GET /static/{name}: app.js or style.css, nothing else."""
        name = request.match_info["name"]
        if name not in self.static:
            return error("not found", 404)
        return web.Response(body=self.static[name], content_type=_STATIC_TYPES[name],
                            charset="utf-8", headers=_PAGE_HEADERS)

    # -- read endpoints

    async def peers(self, request: web.Request) -> web.Response:
        """GET /api/peers: the peers of the status object."""
        return web.json_response({"peers": self.node.status().get("peers", [])})

    async def config(self, request: web.Request) -> web.Response:
        """GET /api/config: every key and value, and which keys POST can change."""
        return web.json_response({"config": self.node.config_view(),
                                  "runtime": sorted(self.node.runtime_keys())})

    async def events(self, request: web.Request) -> web.Response:
        """GET /api/events?limit=N: the node's recent event log, oldest first."""
        text = request.query.get("limit", "100")
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_EVENTS_LIMIT:
            return error(f"limit: a whole number from 1 to {MAX_EVENTS_LIMIT}", 400)
        return web.json_response({"events": await self.node.events(int(text))})

    async def prometheus(self, request: web.Request) -> web.Response:
        """GET /metrics: Prometheus text format."""
        return web.Response(body=prometheus_text(self.node.status()).encode(),
                            headers={hdrs.CONTENT_TYPE: PROMETHEUS_CONTENT_TYPE})

    # -- control endpoints (token)

    async def set_config(self, request: web.Request) -> web.Response:
        """POST /api/config {key: value, ...}: apply runtime settings, all or none."""
        if not bearer_ok(request, self.node.api_token):
            return web.json_response(UNAUTHORIZED, status=401)
        runtime = self.node.runtime_keys()
        # A key of GET /api/config that cannot change now is the node's to explain (which
        # flag to restart with); a key that is no setting at all is refused here.
        changes = await json_object(request, allowed=self.node.config_view().keys() | runtime,
                                    takes=", ".join(sorted(runtime)))
        try:
            applied = await self.node.apply_config(changes)
        except ValueError as exc:
            return error(str(exc), 400)
        return web.json_response({"config": self.node.config_view(), "applied": applied})

    async def start(self, request: web.Request) -> web.Response:
        """POST /api/start (no body, or ``{}``): start or resume training."""
        return await self._control(request, self.node.start_training)

    async def stop(self, request: web.Request) -> web.Response:
        """POST /api/stop (no body, or ``{}``): stop training."""
        return await self._control(request, self.node.stop_training)

    async def _control(self, request: web.Request,
                       action: Callable[[], Awaitable[None]]) -> web.Response:
        if not bearer_ok(request, self.node.api_token):
            return web.json_response(UNAUTHORIZED, status=401)
        await json_object(request, allowed=(), empty_ok=True)
        try:
            await action()
        except ValueError as exc:
            return error(str(exc), 409)
        return web.json_response({"state": self.node.state})

    # -- the WebSocket

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """GET /ws: authenticate, say hello, then stream events and status updates."""
        refusal = upgrade_refusal(request)
        if refusal is not None:
            return refusal
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096)
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            if await self._authenticate(ws):
                await self._serve(ws)
        except* ConnectionResetError:
            pass  # the browser went away while we were sending: nothing left to do
        except* _Stalled:
            # A frozen tab or a dead network: drop the socket so that the node never
            # waits on it (its queue in the hub is gone with it).
            log.info("dashboard socket took nothing for %.0f s: dropped", self.send_timeout)
            await close_ws(ws, grace=0)
        finally:
            self.sockets.discard(ws)
        return ws

    async def _send(self, ws: web.WebSocketResponse, text: str) -> None:
        """Send ``text``; ``_Stalled`` if the browser took nothing for ``send_timeout``."""
        try:
            async with asyncio.timeout(self.send_timeout):
                await ws.send_str(text)
        except TimeoutError:
            raise _Stalled from None

    async def _authenticate(self, ws: web.WebSocketResponse) -> bool:
        try:
            first = _client_message(await ws.receive(timeout=self.auth_timeout))
        except TimeoutError:
            first = {}
        token = first.get("token") if first.get("type") == "auth" else None
        if isinstance(token, str) and hmac.compare_digest(token.encode(),
                                                          self.node.api_token.encode()):
            return True
        if not ws.closed:
            await self._send(ws, json.dumps({"type": "error", "error": "unauthorized"}))
            await close_ws(ws, code=WS_UNAUTHORIZED, message=b"unauthorized")
        return False

    async def _serve(self, ws: web.WebSocketResponse) -> None:
        sub = self.hub.subscribe()
        try:
            await self._send(ws, message("hello", self.node.status()))
            async with asyncio.TaskGroup() as tg:
                pump = tg.create_task(self._pump(ws, sub))
                await self._receive(ws)
                pump.cancel()
        finally:
            self.hub.unsubscribe(sub)

    async def _pump(self, ws: web.WebSocketResponse, sub: Subscription) -> None:
        """Forward hub events; send a fresh status whenever none went out for an interval."""
        loop = asyncio.get_running_loop()
        last_status = loop.time()  # the hello carried one
        while True:
            event: HubEvent | None = None
            wait = last_status + self.status_interval - loop.time()
            if wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        event = await sub.get()
                except TimeoutError:
                    pass  # time for a status update
                except SubscriberLagging:
                    log.info("dashboard socket fell %d events behind; closed so it resyncs",
                             sub.maxsize)
                    await close_ws(ws, code=WSCloseCode.TRY_AGAIN_LATER,
                                   message=b"too slow: reconnect")
                    return
            if event is None:
                await self._send(ws, message(STATUS_UPDATE, self.node.status()))
                last_status = loop.time()
                continue
            await self._send(ws, event.text)
            if event.type == STATUS_UPDATE:
                last_status = loop.time()

    async def _receive(self, ws: web.WebSocketResponse) -> None:
        """Handle the client's ``start`` and ``stop`` messages until it closes."""
        actions = {"start": self.node.start_training, "stop": self.node.stop_training}
        async for msg in ws:
            if msg.type is WSMsgType.ERROR:
                return
            body = _client_message(msg)
            action = actions.get(str(body.get("type")))
            problem = ("unknown message" if action is None
                       else unknown_keys(body, ("type",), what="message"))
            if action is None or problem:
                await self._send(ws, json.dumps({"type": "error", "error": problem}))
                continue
            try:
                await action()
            except ValueError as exc:
                await self._send(ws, json.dumps({"type": "error", "error": str(exc)}))
                continue
            await self._send(ws, message(STATUS_UPDATE, self.node.status()))

    async def close_sockets(self, app: web.Application) -> None:
        """on_shutdown: tell every browser the node is going away (they reconnect), all at
        once and each within the close grace: a browser that reads nothing cannot hold up
        the node's shutdown."""
        await asyncio.gather(*(close_ws(ws, code=WSCloseCode.GOING_AWAY,
                                        message=b"node shutting down")
                               for ws in list(self.sockets)))


def add_dashboard(app: web.Application, node: Controllable, hub: EventHub, *,
                  allowed_hosts: Collection[str], auth_timeout: float = 5.0,
                  status_interval: float = 1.0, send_timeout: float = 30.0) -> None:
    """Mount the dashboard, control API, WebSocket and /metrics on ``app``.

    Also installs ``host_origin_guard(allowed_hosts)`` as the app's first middleware, so
    every route of the app (not only these) refuses foreign Host and Origin headers.
    ``auth_timeout`` is how long a WebSocket has to authenticate; ``status_interval`` the
    longest gap between two status updates on a socket; ``send_timeout`` how long a send
    may wait on a browser that reads nothing before its socket is dropped.
    """
    dash = _Dashboard(node, hub, auth_timeout=auth_timeout, status_interval=status_interval,
                      send_timeout=send_timeout)
    app.middlewares.insert(0, host_origin_guard(allowed_hosts))
    app.router.add_get("/", dash.index)
    app.router.add_get("/static/{name}", dash.static_file)
    app.router.add_get("/ws", dash.websocket)
    app.router.add_get("/api/peers", dash.peers)
    app.router.add_get("/api/config", dash.config)
    app.router.add_post("/api/config", dash.set_config)
    app.router.add_post("/api/start", dash.start)
    app.router.add_post("/api/stop", dash.stop)
    app.router.add_get("/api/events", dash.events)
    app.router.add_get("/metrics", dash.prometheus)
    app.on_shutdown.append(dash.close_sockets)

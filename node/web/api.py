"""The node's HTTP API (binds 127.0.0.1 by default).

Serves ``/api/status``, ``/api/metrics`` (per-round history), ``/healthz`` and pairing
here; node.web.dashboard adds the page, the WebSocket, control and Prometheus endpoints and
the Host/Origin guard (docs/api.md). Every mutating endpoint refuses a body key it does not
take with 400, naming the key (node.web.httputil.json_object).
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from node.trust.pairing import DEFAULT_TTL_S, PairingError, PairingOffer
from node.trust.store import TrustedPeer
from node.web.dashboard import Controllable, add_dashboard
from node.web.httputil import bearer_ok, json_object, refuse
from node.web.hub import EventHub


class PairingService(Protocol):
    """What the API needs of a node's pairing (node.peers.pair_flow.Pairing provides it)."""

    def offer(self, ttl_s: float) -> PairingOffer: ...

    async def pair_with(self, uri: str) -> tuple[str, str]: ...

    def entries(self) -> list[TrustedPeer]: ...

    async def remove(self, ident: str) -> TrustedPeer | None: ...


class WebNode(Protocol):
    """What the web API needs of a node (node.runtime.supervisor.Node provides it)."""

    @property
    def node_id(self) -> str: ...

    @property
    def api_token(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def hub(self) -> EventHub: ...

    @property
    def allowed_hosts(self) -> set[str]: ...

    @property
    def control(self) -> Controllable: ...

    @property
    def pairing(self) -> PairingService: ...

    def status(self) -> dict[str, Any]: ...

    def health_view(self) -> dict[str, Any]: ...


NODE_KEY: web.AppKey[WebNode] = web.AppKey("node")


async def status(request: web.Request) -> web.Response:
    """GET /api/status: the node's status object."""
    return web.json_response(request.app[NODE_KEY].status())


async def metrics(request: web.Request) -> web.Response:
    """GET /api/metrics: one record per completed round."""
    node = request.app[NODE_KEY]
    return web.json_response({"node_id": node.node_id, "rounds": await node.control.metrics()})


async def pair_offer(request: web.Request) -> web.Response:
    """POST /api/pair/offer {"ttl": seconds}: a new one-time pairing code."""
    if not bearer_ok(request, request.app[NODE_KEY].api_token):
        return refuse()
    body = await json_object(request, allowed={"ttl"})
    ttl = body.get("ttl", DEFAULT_TTL_S)
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 1 <= ttl <= 86400:
        return web.json_response({"error": "ttl: 1 to 86400 seconds"}, status=400)
    node = request.app[NODE_KEY]
    offer_ = node.pairing.offer(float(ttl))
    return web.json_response({"uri": offer_.to_uri(), "node_id": offer_.node_id,
                              "expires_at": offer_.expires_at})


async def pair_add(request: web.Request) -> web.Response:
    """POST /api/pair/add {"uri": ...}: pair with the node whose code this is."""
    if not bearer_ok(request, request.app[NODE_KEY].api_token):
        return refuse()
    body = await json_object(request, allowed={"uri"})
    uri = body.get("uri")
    if not isinstance(uri, str):
        return web.json_response({"error": "uri: a pairing code is required"}, status=400)
    try:
        node_id, name = await request.app[NODE_KEY].pairing.pair_with(uri)
    except PairingError as exc:
        return web.json_response({"error": exc.reason}, status=400)
    return web.json_response({"node_id": node_id, "name": name})


async def pair_list(request: web.Request) -> web.Response:
    """GET /api/pair: the trust store."""
    if not bearer_ok(request, request.app[NODE_KEY].api_token):
        return refuse()
    node = request.app[NODE_KEY]
    return web.json_response({"peers": [
        {"node_id": p.node_id, "name": p.name, "source": p.source, "added_at": p.added_at}
        for p in node.pairing.entries()]})


async def pair_remove(request: web.Request) -> web.Response:
    """DELETE /api/pair/{ident}: forget a paired node (id or unique prefix). No body, or
    an empty JSON object."""
    if not bearer_ok(request, request.app[NODE_KEY].api_token):
        return refuse()
    await json_object(request, allowed=(), empty_ok=True)
    node = request.app[NODE_KEY]
    try:
        removed = await node.pairing.remove(request.match_info["ident"])
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if removed is None:
        return web.json_response({"error": "no such paired node"}, status=404)
    return web.json_response({"node_id": removed.node_id, "name": removed.name})


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 while the node's loop is serving, with ``health`` ``ok`` or
    ``degraded`` and, when degraded, what fails and why (node.common.health)."""
    node = request.app[NODE_KEY]
    health = node.health_view()
    return web.json_response({"ok": True, "state": node.state, "health": health["state"],
                              "problems": health["problems"]})


def build_web_app(node: WebNode) -> web.Application:
    """The aiohttp application for one node."""
    app = web.Application(client_max_size=64 * 1024)
    app[NODE_KEY] = node
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/api/pair/offer", pair_offer)
    app.router.add_post("/api/pair/add", pair_add)
    app.router.add_get("/api/pair", pair_list)
    app.router.add_delete("/api/pair/{ident}", pair_remove)
    # The page, /ws, control and read endpoints, /metrics, and the Host/Origin guard on
    # every route (node.web.dashboard).
    add_dashboard(app, node.control, node.hub, allowed_hosts=node.allowed_hosts)
    return app

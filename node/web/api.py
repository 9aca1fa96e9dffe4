"""The node's HTTP API (binds 127.0.0.1 by default).

Serves ``/api/status``, ``/api/metrics`` (per-round history), ``/healthz`` and pairing
here; node.web.dashboard adds the page, the WebSocket, control and Prometheus endpoints and
the Host/Origin guard (docs/api.md).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Any

from aiohttp import web

from node.trust.store import pair_flow
from node.web.dashboard import add_dashboard
from node.trust.pairing import DEFAULT_TTL_S, PairingError

if TYPE_CHECKING:
    from node.runtime.supervisor import Node

NODE_KEY: web.AppKey[Node] = web.AppKey("node")


async def status(request: web.Request) -> web.Response:
    """GET /api/status: the node's status object."""
    return web.json_response(request.app[NODE_KEY].status())


async def metrics(request: web.Request) -> web.Response:
    """GET /api/metrics: one record per completed round."""
    node = request.app[NODE_KEY]
    return web.json_response({"node_id": node.node_id,
                              "rounds": await asyncio.to_thread(node.db.rounds)})


def _authorized(request: web.Request) -> bool:
    node = request.app[NODE_KEY]
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), node.api_token.encode())


def _refuse() -> web.Response:
    return web.json_response({"error": "missing or wrong API token (see fl-node token)"},
                             status=401)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text='{"error": "body must be JSON"}',
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}',
                                 content_type="application/json")
    return body


async def pair_offer(request: web.Request) -> web.Response:
    """POST /api/pair/offer {"ttl": seconds}: a new one-time pairing code."""
    if not _authorized(request):
        return _refuse()
    body = await _json_body(request)
    ttl = body.get("ttl", DEFAULT_TTL_S)
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 1 <= ttl <= 86400:
        return web.json_response({"error": "ttl: 1 to 86400 seconds"}, status=400)
    node = request.app[NODE_KEY]
    offer_ = pair_flow.offer(node, float(ttl))
    return web.json_response({"uri": offer_.to_uri(), "node_id": offer_.node_id,
                              "expires_at": offer_.expires_at})


async def pair_add(request: web.Request) -> web.Response:
    """POST /api/pair/add {"uri": ...}: pair with the node whose code this is."""
    if not _authorized(request):
        return _refuse()
    body = await _json_body(request)
    uri = body.get("uri")
    if not isinstance(uri, str):
        return web.json_response({"error": "uri: a pairing code is required"}, status=400)
    try:
        node_id, name = await pair_flow.pair_with(request.app[NODE_KEY], uri)
    except PairingError as exc:
        return web.json_response({"error": exc.reason}, status=400)
    return web.json_response({"node_id": node_id, "name": name})


async def pair_list(request: web.Request) -> web.Response:
    """GET /api/pair: the trust store."""
    if not _authorized(request):
        return _refuse()
    node = request.app[NODE_KEY]
    return web.json_response({"peers": [
        {"node_id": p.node_id, "name": p.name, "source": p.source, "added_at": p.added_at}
        for p in node.trust_store.entries()]})


async def pair_remove(request: web.Request) -> web.Response:
    """DELETE /api/pair/{ident}: forget a paired node (id or unique prefix)."""
    if not _authorized(request):
        return _refuse()
    node = request.app[NODE_KEY]
    try:
        removed = await asyncio.to_thread(node.trust_store.remove, request.match_info["ident"])
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if removed is None:
        return web.json_response({"error": "no such paired node"}, status=404)
    node.forget(removed.public_key)
    return web.json_response({"node_id": removed.node_id, "name": removed.name})


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 while the node's loop is serving."""
    node = request.app[NODE_KEY]
    return web.json_response({"ok": True, "state": node.state})


def build_web_app(node: Node) -> web.Application:
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
    add_dashboard(app, node, node.hub, allowed_hosts=node.allowed_hosts)
    return app

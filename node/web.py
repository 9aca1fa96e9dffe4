"""The node's HTTP API (binds 127.0.0.1 by default).

This first version serves what operators and tests need to read a node: ``/api/status``,
``/api/metrics`` (per-round history) and ``/healthz``. The dashboard, WebSocket and
control endpoints build on it (see docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .daemon import Node

NODE_KEY: web.AppKey[Node] = web.AppKey("node")


async def status(request: web.Request) -> web.Response:
    """GET /api/status: the node's status object."""
    return web.json_response(request.app[NODE_KEY].status())


async def metrics(request: web.Request) -> web.Response:
    """GET /api/metrics: one record per completed round."""
    node = request.app[NODE_KEY]
    return web.json_response({"node_id": node.node_id,
                              "rounds": [r.as_json() for r in node.history]})


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
    return app

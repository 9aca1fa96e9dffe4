"""Small HTTP helpers shared by the web API and the dashboard: the bearer-token check,
JSON errors and JSON object bodies."""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import hdrs, web

UNAUTHORIZED = {"error": "missing or wrong API token (see fl-node token)"}


def bearer_ok(request: web.Request, token: str) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <token>`` (constant time)."""
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    given = header[7:] if header.startswith("Bearer ") else ""
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def error(text: str, status: int) -> web.Response:
    """A JSON error answer: ``{"error": text}``."""
    return web.json_response({"error": text}, status=status)


def refuse() -> web.Response:
    """The 401 answer to a missing or wrong token."""
    return web.json_response(UNAUTHORIZED, status=401)


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object (HTTPBadRequest with a JSON reason if not)."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text='{"error": "body must be JSON"}',
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}',
                                 content_type="application/json")
    return body

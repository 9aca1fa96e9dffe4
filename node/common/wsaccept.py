"""Refusing a malformed WebSocket upgrade with a 400 and one reason, before aiohttp sees it.

aiohttp answers a bad upgrade with ``HTTPBadRequest`` carrying the offending header in its
text; a header that is not ASCII (aiohttp keeps undecodable bytes as surrogates) then
fails to encode, and the client gets a 500 while the log gets an ERROR traceback: a
stranger could fill the log with them. Upgrade headers are ASCII tokens (RFC 6455
section 4.1), so anything else is refused here, and the rest of aiohttp's own checks is
asked without letting it raise.
"""

from __future__ import annotations

from aiohttp import hdrs, web

#: The headers a WebSocket upgrade is decided on.
UPGRADE_HEADERS = (hdrs.UPGRADE, hdrs.CONNECTION, hdrs.SEC_WEBSOCKET_KEY,
                   hdrs.SEC_WEBSOCKET_VERSION, hdrs.SEC_WEBSOCKET_PROTOCOL,
                   hdrs.SEC_WEBSOCKET_EXTENSIONS)


def upgrade_refusal(request: web.BaseRequest) -> web.Response | None:
    """A 400 response if ``request`` is not a well-formed WebSocket upgrade, else None."""
    for name in UPGRADE_HEADERS:
        for value in request.headers.getall(name, ()):
            if not value.isascii() or not value.isprintable():
                return _bad(f"header {name} is not printable ASCII")
    if not web.WebSocketResponse().can_prepare(request).ok:
        return _bad("not a WebSocket upgrade (RFC 6455 section 4.1)")
    return None


def _bad(reason: str) -> web.Response:
    return web.Response(status=400, text=f"400: malformed WebSocket upgrade: {reason}\n")

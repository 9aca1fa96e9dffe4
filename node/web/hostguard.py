"""Which ``Host`` and ``Origin`` a node's web server answers to: the guard against DNS
rebinding and cross-site requests (docs/api.md), as aiohttp middleware."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def _host_port(host: str, default_port: int | None) -> str | None:
    """``host[:port]`` as a lower-case ``host:port`` (IPv6 in brackets), or None if bad."""
    if not host or any(c in host for c in "/?#@\\ "):
        return None
    try:
        parts = urlsplit("//" + host)
        port = parts.port
    except ValueError:
        return None
    name = parts.hostname
    port = port if port is not None else default_port
    if not name or port is None:
        return None
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def _origin_host_port(origin: str) -> str | None:
    try:
        parts = urlsplit(origin)
    except ValueError:
        return None
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if default is None or parts.path not in ("", "/") or parts.query or parts.username:
        return None
    return _host_port(parts.netloc, default)


def allowed_hosts_for(bind_host: str, port: int, extra: Iterable[str] = ()) -> set[str]:
    """The ``host:port`` strings a node's web server answers to.

    Always the loopback names; the bind address too unless it is a wildcard; and each
    ``extra`` host name, with ``:port`` appended when it names no port.
    """
    hosts = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    names = [] if bind_host in _WILDCARD_HOSTS else [bind_host]
    for name in [*names, *extra]:
        if name.count(":") > 1 and not name.startswith("["):  # a bare IPv6 address
            name = f"[{name}]"
        normal = _host_port(name, port)
        if normal is None:
            raise ValueError(f"{name!r}: not a host name or host:port")
        hosts.add(normal)
    return hosts


def _foreign(request: web.Request, allowed_hosts: Collection[str]) -> str | None:
    """Why the request must be refused (foreign Host or Origin), or None."""
    allowed = {n for h in allowed_hosts if (n := _host_port(h, None)) is not None}
    default_port = 443 if request.secure else 80
    if _host_port(request.headers.get(hdrs.HOST, ""), default_port) not in allowed:
        return "forbidden Host header"
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and _origin_host_port(origin) not in allowed:
        return "forbidden Origin header"
    return None


def host_origin_guard(allowed_hosts: Collection[str]) -> Middleware:
    """Middleware that answers 403 to a foreign Host or Origin header.

    ``allowed_hosts`` holds ``host:port`` strings and is read on every request, not
    copied, so a server that binds port 0 can fill it in once it knows its port.
    A request without an Origin header (curl, the TUI) is judged by its Host alone.
    """

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        reason = _foreign(request, allowed_hosts)
        if reason is not None:
            return web.json_response({"error": reason}, status=403)
        return await handler(request)

    return guard

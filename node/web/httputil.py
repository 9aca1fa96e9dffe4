"""Small HTTP helpers shared by the web API and the dashboard: the bearer-token check,
JSON errors and JSON object bodies (strict: no unknown keys, no repeated keys)."""

from __future__ import annotations

import collections
import hmac
import json
from collections.abc import Collection, Mapping
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


class DuplicateKeys(ValueError):
    """A JSON object names a key twice."""


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        counts = collections.Counter(key for key, _ in pairs)
        raise DuplicateKeys("duplicate key(s): "
                            + ", ".join(sorted(k for k, n in counts.items() if n > 1)))
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str | bytes) -> Any:
    """Strict JSON: ValueError for anything else, for an object with a repeated key (JSON
    parsers differ on which value wins) and for NaN and Infinity (not JSON)."""
    return json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_no_constant)


def unknown_keys(body: Mapping[str, Any], allowed: Collection[str], takes: str | None = None,
                 *, what: str = "endpoint") -> str | None:
    """The error for the keys of ``body`` not in ``allowed`` (None when there are none):
    ``unknown key(s): a, b; this endpoint takes <takes, or the allowed keys>``."""
    unknown = sorted(set(body) - set(allowed))
    if not unknown:
        return None
    takes = takes or (", ".join(sorted(allowed)) if allowed else "no keys")
    return f"unknown key(s): {', '.join(unknown)}; this {what} takes {takes}"


def _bad_request(text: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": text}),
                              content_type="application/json")


async def json_object(request: web.Request, allowed: Collection[str] | None = None, *,
                      takes: str | None = None, empty_ok: bool = False) -> dict[str, Any]:
    """The request's body as a JSON object (HTTPBadRequest with a JSON reason if not).

    ``allowed``: the keys the endpoint takes; any other key is refused, naming it (None:
    the caller checks the keys). ``empty_ok``: an empty body is taken as ``{}`` (for the
    endpoints that need no body). A repeated key, NaN or Infinity is refused.
    """
    try:
        text = await request.text()
        body = {} if empty_ok and not text.strip() else parse_json(text)
    except DuplicateKeys as exc:
        raise _bad_request(str(exc)) from None
    except ValueError:  # UnicodeDecodeError included
        raise _bad_request("body must be JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("body must be a JSON object")
    if allowed is not None and (problem := unknown_keys(body, allowed, takes)):
        raise _bad_request(problem)
    return body

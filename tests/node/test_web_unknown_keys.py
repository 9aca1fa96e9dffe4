"""Every mutating endpoint refuses a body key it does not take (issue 12, point 8):
``400 {"error": "unknown key(s): ...; this endpoint takes ..."}``, and nothing changes.

The whole web app (node.web.api.build_web_app: pairing, and the dashboard's control
endpoints and WebSocket) runs over real HTTP against a fake node that records every call.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from node.web.api import build_web_app
from node.web.hostguard import allowed_hosts_for
from node.web.hub import EventHub

from .test_dashboard import AUTH, TOKEN, FakeNode, next_message

RUNTIME = ", ".join(sorted(FakeNode.RUNTIME))


@dataclass
class FakePairing:
    """The pairing calls the API makes, recorded."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def offer(self, ttl_s: float) -> Any:
        self.calls.append(("offer", ttl_s))
        return SimpleNamespace(to_uri=lambda: "fl-node://pair?v=1", node_id="aaaa1111",
                               expires_at=1.0)

    async def pair_with(self, uri: str) -> tuple[str, str]:
        self.calls.append(("pair_with", uri))
        return "bbbb2222", "beta"

    def entries(self) -> list[Any]:
        return []

    async def remove(self, ident: str) -> Any:
        self.calls.append(("remove", ident))
        return SimpleNamespace(node_id=ident, name="beta")


class FakeWebNode:
    """A WebNode: the dashboard's FakeNode as its control, and a FakePairing."""

    def __init__(self) -> None:
        self.control = FakeNode()
        self.pairing = FakePairing()
        self.hub = EventHub()
        self.allowed_hosts: set[str] = set()
        self.api_token = TOKEN
        self.node_id = self.control.node_id

    @property
    def state(self) -> str:
        return self.control.state

    def status(self) -> dict[str, Any]:
        return self.control.status()

    def health_view(self) -> dict[str, Any]:
        return {"state": "ok", "problems": {}}

    def changes(self) -> list[tuple[Any, ...]]:
        """Every call that reached the node, and its state and settings."""
        return [*self.control.calls, *self.pairing.calls, ("state", self.state),
                ("config", dict(self.control.config))]


@dataclass
class Web:
    client: TestClient
    node: FakeWebNode


@pytest.fixture
async def web(no_leaked_tasks: None) -> AsyncIterator[Web]:
    async with _serve() as w:
        yield w


@contextlib.asynccontextmanager
async def _serve() -> AsyncIterator[Web]:
    node = FakeWebNode()
    async with TestClient(TestServer(build_web_app(node), host="127.0.0.1")) as client:
        node.allowed_hosts |= allowed_hosts_for("127.0.0.1", client.port or 0)
        yield Web(client, node)


async def call(w: Web, route: str, body: Any = None, raw: bytes | None = None,
               auth: bool = True) -> tuple[int, Any]:
    method, path = route.split(" ")
    headers = {**(AUTH if auth else {}), "Content-Type": "application/json"}
    kwargs: dict[str, Any] = {"data": raw} if raw is not None else (
        {"json": body} if body is not None else {})
    resp = await w.client.request(method, path, headers=headers, **kwargs)
    return resp.status, await resp.json()


#: route, a body it takes, that body with unknown keys, and the error for them
ROUTES = [
    ("POST /api/pair/offer", {"ttl": 60}, {"ttl": 60, "foo": 1},
     "unknown key(s): foo; this endpoint takes ttl"),
    ("POST /api/pair/add", {"uri": "fl-node://pair?v=1"},
     {"uri": "fl-node://pair?v=1", "name": "x", "addr": "y"},
     "unknown key(s): addr, name; this endpoint takes uri"),
    ("DELETE /api/pair/bbbb2222", {}, {"force": True},
     "unknown key(s): force; this endpoint takes no keys"),
    ("POST /api/start", {}, {"now": True}, "unknown key(s): now; this endpoint takes no keys"),
    ("POST /api/stop", {}, {"rounds": 99}, "unknown key(s): rounds; this endpoint takes no keys"),
    ("POST /api/config", {"lr": 0.1}, {"lr": 0.1, "nope": 1, "Lr": 2},
     f"unknown key(s): Lr, nope; this endpoint takes {RUNTIME}"),
]


@pytest.mark.parametrize(("route", "good", "bad", "message"), ROUTES, ids=lambda r: str(r))
async def test_an_unknown_key_is_refused_naming_it_and_changes_nothing(
        web: Web, route: str, good: dict[str, Any], bad: dict[str, Any], message: str) -> None:
    before = web.node.changes()
    assert await call(web, route, bad) == (400, {"error": message})
    assert web.node.changes() == before
    status, _ = await call(web, route, good)
    assert status == 200
    assert web.node.changes() != before


@pytest.mark.parametrize("route", [r[0] for r in ROUTES])
async def test_without_the_token_an_unknown_key_is_401_not_400(web: Web, route: str) -> None:
    before = web.node.changes()
    status, _ = await call(web, route, {"foo": 1}, auth=False)
    assert status == 401
    assert web.node.changes() == before


@pytest.mark.parametrize("route", ["POST /api/start", "POST /api/stop",
                                   "DELETE /api/pair/bbbb2222"])
@pytest.mark.parametrize("raw", [None, b"", b"  \n", b"{}", b" { } "])
async def test_the_endpoints_without_a_body_take_no_body_or_an_empty_object(
        web: Web, route: str, raw: bytes | None) -> None:
    status, _ = await call(web, route, raw=raw)
    assert status == 200


@pytest.mark.parametrize(("raw", "message"), [
    (b"start", "body must be JSON"), (b"null", "body must be a JSON object"),
    (b"[]", "body must be a JSON object"), (b'{"": 1}', "unknown key(s): ; this endpoint"
                                                        " takes no keys"),
])
async def test_start_refuses_any_other_body(web: Web, raw: bytes, message: str) -> None:
    assert await call(web, "POST /api/start", raw=raw) == (400, {"error": message})
    assert web.node.control.calls == []


async def test_pair_offer_without_ttl_takes_the_default(web: Web) -> None:
    status, _ = await call(web, "POST /api/pair/offer", {})
    assert status == 200 and web.node.pairing.calls == [("offer", 600.0)]


@pytest.mark.parametrize(("route", "raw", "message"), [
    ("POST /api/pair/offer", b'{"ttl": 60, "ttl": 86401}', "duplicate key(s): ttl"),
    ("POST /api/config", b'{"lr": 0.1, "rounds": 3, "lr": 5.0, "rounds": 4}',
     "duplicate key(s): lr, rounds"),
    ("POST /api/pair/add", b'{"uri": "a", "uri": "b"}', "duplicate key(s): uri"),
    ("POST /api/pair/offer", b'{"ttl": NaN}', "body must be JSON"),
    ("POST /api/config", b'{"lr": Infinity}', "body must be JSON"),
])
async def test_a_repeated_key_or_a_non_json_number_is_refused(
        web: Web, route: str, raw: bytes, message: str) -> None:
    """JSON parsers differ on which value of a repeated key wins: refuse it, as the wire
    protocol refuses a repeated msgpack key."""
    before = web.node.changes()
    assert await call(web, route, raw=raw) == (400, {"error": message})
    assert web.node.changes() == before


async def test_a_ws_control_message_with_an_unknown_key_is_refused(web: Web) -> None:
    ws = await web.client.ws_connect("/ws")
    await ws.send_json({"type": "auth", "token": TOKEN})
    assert (await ws.receive_json(timeout=2))["type"] == "hello"
    await ws.send_json({"type": "start", "now": True})
    assert await next_message(ws) == {
        "type": "error", "error": "unknown key(s): now; this message takes type"}
    await ws.send_str('{"type": "stop", "type": "start"}')
    assert await next_message(ws) == {"type": "error", "error": "unknown message"}
    assert web.node.control.calls == []
    await ws.send_json({"type": "start"})
    while (await next_message(ws, skip_status=False))["data"]["state"] != "training":
        pass
    assert web.node.control.calls == [("start",)] and not ws.closed
    await ws.close()

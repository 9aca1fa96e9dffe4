"""The dashboard and control plane (node/dashboard.py) against a fake node, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from node.common.resources import resources
from node.web.dashboard import (
    PROMETHEUS_CONTENT_TYPE,
    WS_UNAUTHORIZED,
    add_dashboard,
    prometheus_text,
)
from node.web.hostguard import allowed_hosts_for
from node.web.hub import EventHub

TOKEN = "correct-horse-battery-staple"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AUTH_TIMEOUT = 0.3
STATUS_INTERVAL = 0.2
UNAUTHORIZED = {"error": "missing or wrong API token (see fl-node token)"}


class FakeNode:
    """A Controllable with real behaviour: start/stop change the state, config validates.

    ``calls`` records every control call on entry, so a test can prove a refused request
    never reached the node.
    """

    RUNTIME = frozenset({"lr", "local_epochs", "rounds", "open"})

    def __init__(self) -> None:
        self.api_token = TOKEN
        self.state = "stopped"
        self.calls: list[tuple[Any, ...]] = []
        self.config: dict[str, Any] = {"name": "alpha", "port": 7700, "lr": 0.05,
                                       "local_epochs": 2, "rounds": 10, "open": False,
                                       "data_dir": None}
        self.rounds = [{"round": r, "model_hash": f"{r:02x}" * 4, "aggregator": "bbbb",
                        "contributors": 3, "accuracy": 0.5 + r / 10, "loss": 1.0 / r,
                        "ts": 1000.0 + r} for r in (1, 2, 3)]
        self.log = [{"ts": 1000.0 + i, "kind": "note", "detail": f"event {i}"} for i in range(5)]
        self.accuracy: float | None = 0.8
        self.privacy: dict[str, Any] | None = None
        self.node_id = "aaaa1111"

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "name": "alpha", "federation": "demo",
            "state": self.state, "mode": "elected", "quorum": {"need": 2, "have": 2},
            "round": 3, "rounds_total": 10, "current_round": 4,
            "aggregator": "bbbb2222", "is_aggregator": False, "attempt": 0,
            "model_hash": "ab" * 32, "accuracy": self.accuracy, "loss": 0.25,
            "evaluated_round": 3, "peer_port": 7700, "web_port": 7800, "uptime_s": 12.5,
            "peers": [
                {"node_id": "bbbb2222", "name": "beta", "address": "10.0.0.2:7700",
                 "state": "connected", "trusted": True, "trust": "paired", "round": 3,
                 "peer_state": "training", "last_seen": 1000.0, "rtt_ms": 1.5,
                 "links": ["aaaa1111", "cccc3333"]},
                {"node_id": "cccc3333", "name": "gamma", "address": None,
                 "state": "relayed", "trusted": True, "trust": "federation", "round": 3,
                 "peer_state": "training", "last_seen": 999.0, "rtt_ms": None,
                 "links": ["bbbb2222"]},
            ],
            "resources": {"cpu_percent": 12.5, "memory_rss": 123456789,
                          "memory_percent": 1.5, "net_bytes_sent": 10, "net_bytes_recv": 20},
            "traffic": {"bytes_sent": 4096, "bytes_received": 8192},
            "privacy": self.privacy,
            "learner": {"model": "cnn"},
        }

    async def metrics(self) -> list[dict[str, Any]]:
        return list(self.rounds)

    async def events(self, limit: int) -> list[dict[str, Any]]:
        return self.log[-limit:]

    def config_view(self) -> dict[str, Any]:
        return dict(self.config)

    def runtime_keys(self) -> frozenset[str]:
        return self.RUNTIME

    async def apply_config(self, changes: dict[str, Any]) -> list[str]:
        self.calls.append(("apply_config", dict(changes)))
        for key, value in changes.items():
            if key not in self.config:
                raise ValueError(f"{key}: no such setting")
            if key not in self.RUNTIME:
                raise ValueError(f"{key}: cannot change while the node runs")
            if type(value) is not type(self.config[key]):
                raise ValueError(f"{key}: expected {type(self.config[key]).__name__}")
        if not 0 < changes.get("lr", 0.05) <= 1:
            raise ValueError("lr: between 0 and 1")
        self.config.update(changes)
        return sorted(changes)

    async def start_training(self) -> None:
        self.calls.append(("start",))
        if self.state == "done":
            raise ValueError("every round is done")
        self.state = "training"

    async def stop_training(self) -> None:
        self.calls.append(("stop",))
        self.state = "stopped"


@dataclass
class Dash:
    client: TestClient
    node: FakeNode
    hub: EventHub

    @property
    def port(self) -> int:
        assert self.client.port is not None
        return self.client.port


@contextlib.asynccontextmanager
async def serve(hub: EventHub | None = None, send_timeout: float = 30.0
                ) -> AsyncIterator[Dash]:
    """A fake node's dashboard on 127.0.0.1; the allowed hosts are filled in after bind."""
    node, hub = FakeNode(), hub if hub is not None else EventHub()
    hosts: set[str] = set()
    app = web.Application()
    add_dashboard(app, node, hub, allowed_hosts=hosts, auth_timeout=AUTH_TIMEOUT,
                  status_interval=STATUS_INTERVAL, send_timeout=send_timeout)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        hosts |= allowed_hosts_for("127.0.0.1", client.port or 0)
        yield Dash(client, node, hub)


@pytest.fixture
async def dash(no_leaked_tasks: None) -> AsyncIterator[Dash]:
    async with serve() as d:
        yield d


async def authed(d: Dash) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await d.client.ws_connect("/ws")
    await ws.send_json({"type": "auth", "token": TOKEN})
    hello = await ws.receive_json(timeout=2)
    return ws, hello


async def next_message(ws: aiohttp.ClientWebSocketResponse, *, skip_status: bool = True
                       ) -> dict[str, Any]:
    while True:
        msg = await ws.receive_json(timeout=2)
        if not (skip_status and msg["type"] == "status_update"):
            return msg


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict[str, Any]], int]:
    """The messages received until the server closed the socket, and the close code."""
    got = []
    while True:
        msg = await ws.receive(timeout=2)
        if msg.type is WSMsgType.TEXT:
            got.append(msg.json())
            continue
        if msg.type is WSMsgType.CLOSE:  # the code the server sent, whatever happens next
            return got, msg.data
        assert msg.type is WSMsgType.CLOSED and ws.close_code is not None, msg
        return got, ws.close_code


# -- page and static files --------------------------------------------------------------


async def test_page_and_its_two_assets_are_served_with_their_types(dash: Dash) -> None:
    page = await dash.client.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    for element_id in ("round", "rounds-total", "state", "accuracy", "acc-chart", "loss-chart",
                       "peers", "topology", "events", "start", "stop", "config-form",
                       "token-form", "conn"):
        assert f'id="{element_id}"' in html
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    js = await dash.client.get("/static/app.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    assert "new WebSocket" in await js.text()
    css = await dash.client.get("/static/style.css")
    assert css.status == 200 and css.content_type == "text/css"


@pytest.mark.parametrize("path", [
    "/static/dashboard.py", "/static/index.html", "/static/..%2fdashboard.py",
    "/static/%2e%2e%2fdashboard.py", "/static/..%2f..%2fpyproject.toml",
    "/static/static%2fapp.js", "/static/", "/static/../dashboard.py", "/dashboard.py",
])
async def test_static_serves_nothing_but_the_three_files(dash: Dash, path: str) -> None:
    resp = await dash.client.get(URL(path, encoded=True))
    assert resp.status in (403, 404)
    body = await resp.text()
    assert "add_dashboard" not in body and "[project]" not in body


# -- read endpoints ---------------------------------------------------------------------


async def test_peers_are_the_status_peers(dash: Dash) -> None:
    resp = await dash.client.get("/api/peers")
    assert resp.status == 200
    peers = (await resp.json())["peers"]
    assert [p["name"] for p in peers] == ["beta", "gamma"]
    assert peers == dash.node.status()["peers"]


async def test_config_lists_every_key_and_the_runtime_ones(dash: Dash) -> None:
    body = await (await dash.client.get("/api/config")).json()
    assert body["config"] == dash.node.config
    assert body["runtime"] == sorted(FakeNode.RUNTIME)


async def test_events_returns_the_latest_oldest_first(dash: Dash) -> None:
    body = await (await dash.client.get("/api/events?limit=2")).json()
    assert [e["detail"] for e in body["events"]] == ["event 3", "event 4"]
    everything = await (await dash.client.get("/api/events")).json()
    assert len(everything["events"]) == 5


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1001", "2.5", "", "\u00b2"])
async def test_events_refuses_a_bad_limit(dash: Dash, limit: str) -> None:
    resp = await dash.client.get("/api/events", params={"limit": limit})
    assert resp.status == 400
    assert "limit" in (await resp.json())["error"]


# -- control endpoints ------------------------------------------------------------------


async def test_post_config_applies_runtime_settings(dash: Dash) -> None:
    resp = await dash.client.post("/api/config", json={"lr": 0.1, "rounds": 20}, headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert body["applied"] == ["lr", "rounds"]
    assert body["config"]["lr"] == 0.1 and body["config"]["rounds"] == 20
    assert dash.node.config["rounds"] == 20


@pytest.mark.parametrize(("changes", "message"), [
    # (a key that is no setting at all never reaches the node: test_web_unknown_keys.py)
    ({"port": 9000}, "port: cannot change while the node runs"),
    ({"lr": "fast"}, "lr: expected float"),
    ({"lr": 5.0}, "lr: between 0 and 1"),
])
async def test_post_config_shows_the_nodes_reason_for_a_bad_change(
        dash: Dash, changes: dict[str, Any], message: str) -> None:
    before = dict(dash.node.config)
    resp = await dash.client.post("/api/config", json=changes, headers=AUTH)
    assert resp.status == 400
    assert await resp.json() == {"error": message}
    assert dash.node.config == before


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "body must be JSON"), (b"[1, 2]", "body must be a JSON object"),
])
async def test_post_config_refuses_a_body_that_is_not_an_object(
        dash: Dash, body: bytes, message: str) -> None:
    resp = await dash.client.post("/api/config", data=body,
                                  headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == 400
    assert await resp.json() == {"error": message}
    assert dash.node.calls == []


async def test_start_and_stop_change_the_nodes_state(dash: Dash) -> None:
    resp = await dash.client.post("/api/start", headers=AUTH)
    assert resp.status == 200 and await resp.json() == {"state": "training"}
    resp = await dash.client.post("/api/stop", headers=AUTH)
    assert resp.status == 200 and await resp.json() == {"state": "stopped"}
    assert dash.node.calls == [("start",), ("stop",)]


async def test_start_the_node_refuses_is_409_with_its_reason(dash: Dash) -> None:
    dash.node.state = "done"
    resp = await dash.client.post("/api/start", headers=AUTH)
    assert resp.status == 409
    assert await resp.json() == {"error": "every round is done"}


# -- the WebSocket ----------------------------------------------------------------------


async def test_ws_without_an_auth_message_is_closed_after_the_timeout(dash: Dash) -> None:
    start = time.monotonic()
    ws = await dash.client.ws_connect("/ws")
    got, code = await closed_with(ws)
    assert got == [{"type": "error", "error": "unauthorized"}]
    assert code == WS_UNAUTHORIZED
    assert AUTH_TIMEOUT * 0.9 <= time.monotonic() - start < AUTH_TIMEOUT + 1.5


async def test_ws_with_a_wrong_token_gets_an_error_and_is_closed(dash: Dash) -> None:
    ws = await dash.client.ws_connect("/ws")
    await ws.send_json({"type": "auth", "token": TOKEN + "x"})
    got, code = await closed_with(ws)
    assert got == [{"type": "error", "error": "unauthorized"}]
    assert code == WS_UNAUTHORIZED


async def test_ws_says_hello_with_the_status_then_relays_events_in_order(dash: Dash) -> None:
    ws, hello = await authed(dash)
    assert hello["type"] == "hello"
    assert hello["data"]["node_id"] == "aaaa1111" and hello["data"]["state"] == "stopped"
    assert isinstance(hello["ts"], float)
    published = [("training_started", {"round": 4}),
                 ("event", {"kind": "note", "detail": "one"}),
                 ("metrics_update", dash.node.rounds[0]),
                 ("peer_joined", {"node_id": "dddd", "name": "delta"}),
                 ("event", {"kind": "note", "detail": "two"}),
                 ("round_completed", {"round": 4, "model_hash": "ff", "aggregator": None})]
    for type_, data in published:
        dash.hub.publish(type_, data)
    received = [await next_message(ws) for _ in published]
    assert [(m["type"], m["data"]) for m in received] == published
    await ws.close()


async def test_ws_sends_status_updates_while_nothing_else_happens(dash: Dash) -> None:
    ws, _ = await authed(dash)
    start = time.monotonic()
    first = await next_message(ws, skip_status=False)
    assert first["type"] == "status_update"
    dash.node.state = "collecting"
    second = await next_message(ws, skip_status=False)
    assert second["type"] == "status_update" and second["data"]["state"] == "collecting"
    assert time.monotonic() - start < 4 * STATUS_INTERVAL + 0.5
    await ws.close()


async def test_ws_start_and_stop_messages_control_the_node(dash: Dash) -> None:
    ws, _ = await authed(dash)
    await ws.send_json({"type": "start"})
    msg = await next_message(ws, skip_status=False)
    assert msg["type"] == "status_update" and msg["data"]["state"] == "training"
    await ws.send_json({"type": "stop"})
    while (msg := await next_message(ws, skip_status=False))["data"]["state"] != "stopped":
        pass
    assert dash.node.calls == [("start",), ("stop",)]
    await ws.close()


async def test_ws_answers_an_unknown_message_with_an_error_and_stays_open(dash: Dash) -> None:
    ws, _ = await authed(dash)
    await ws.send_json({"type": "reboot"})
    assert await next_message(ws) == {"type": "error", "error": "unknown message"}
    await ws.send_str("not json")
    assert await next_message(ws) == {"type": "error", "error": "unknown message"}
    dash.node.state = "done"
    await ws.send_json({"type": "start"})
    assert await next_message(ws) == {"type": "error", "error": "every round is done"}
    assert not ws.closed
    await ws.close()


async def test_ws_of_a_lagging_subscriber_is_closed_so_it_resyncs(no_leaked_tasks: None) -> None:
    async with serve(EventHub(queue_size=4)) as d:
        ws, _ = await authed(d)
        for i in range(10):  # no await in between: the socket cannot drain
            d.hub.publish("event", {"kind": "note", "detail": str(i)})
        assert d.hub.subscriber_count == 0
        _, code = await closed_with(ws)
        assert code == aiohttp.WSCloseCode.TRY_AGAIN_LATER


async def test_ws_is_told_the_node_is_going_away_on_shutdown(no_leaked_tasks: None) -> None:
    async with serve() as d:
        ws, _ = await authed(d)
        await d.client.server.close()
        _, code = await closed_with(ws)
        assert code == aiohttp.WSCloseCode.GOING_AWAY


async def frozen_browser(d: Dash) -> aiohttp.ClientWebSocketResponse:
    """An authenticated socket whose browser then reads nothing more (a frozen tab), with
    the node's sends to it blocked: every buffer on the way is full."""
    ws, _ = await authed(d)
    ws._writer.transport.pause_reading()  # noqa: SLF001 (the browser stops reading)
    big = "x" * (1 << 20)
    for i in range(48):  # 48 MB, far more than the socket buffers hold; fewer than the queue
        d.hub.publish("event", {"kind": "note", "detail": f"{i} {big}"})
        await asyncio.sleep(0.01)
    return ws


async def test_a_browser_that_reads_nothing_cannot_hold_up_the_shutdown(
        no_leaked_tasks: None) -> None:
    """Shutdown tells every browser the node is going away; one that reads nothing gets the
    close grace, then its connection is dropped. Before, shutdown waited on it for as long
    as TCP kept the connection (for ever, with a frozen tab on a live host)."""
    async with serve() as d:
        frozen = await frozen_browser(d)
        live, _ = await authed(d)
        assert d.hub.subscriber_count == 2
        await asyncio.wait_for(d.client.server.close(), timeout=10)
        _, code = await closed_with(live)
        assert code == aiohttp.WSCloseCode.GOING_AWAY
        frozen._writer.transport.abort()  # noqa: SLF001


async def test_a_browser_that_reads_nothing_is_dropped_after_the_send_timeout(
        no_leaked_tasks: None) -> None:
    """A socket whose sends wait ``send_timeout`` is dropped, and its queue in the hub goes
    with it; the other browsers carry on."""
    async with serve(send_timeout=0.5) as d:
        frozen = await frozen_browser(d)
        live, _ = await authed(d)
        deadline = asyncio.get_running_loop().time() + 10
        while d.hub.subscriber_count > 1:
            assert asyncio.get_running_loop().time() < deadline, "the frozen socket stayed"
            await asyncio.sleep(0.05)
        d.hub.publish("event", {"kind": "note", "detail": "still here"})
        while (await next_message(live))["data"].get("detail") != "still here":
            pass
        frozen._writer.transport.abort()  # noqa: SLF001


# -- security matrix --------------------------------------------------------------------

ATTACKS = ["no token", "wrong token", "foreign Host", "foreign Origin"]
ROUTES = ["POST /api/config", "POST /api/start", "POST /api/stop", "WS start", "WS stop"]


def attack_headers(attack: str, port: int) -> dict[str, str]:
    return {
        "no token": {},
        "wrong token": {"Authorization": f"Bearer {TOKEN[:-1]}"},
        "foreign Host": {**AUTH, "Host": f"evil.example:{port}"},
        "foreign Origin": {**AUTH, "Origin": "http://evil.example"},
    }[attack]


async def attempt(d: Dash, route: str, attack: str) -> int:
    """Try ``route`` under ``attack``: the HTTP status, or the WebSocket's close code."""
    headers = attack_headers(attack, d.port)
    if route.startswith("POST "):
        resp = await d.client.post(route[5:], json={"rounds": 99}, headers=headers)
        body = await resp.json()
        assert body == UNAUTHORIZED if resp.status == 401 else "error" in body
        return resp.status
    token = headers.pop("Authorization", "Bearer ")[7:]
    try:
        ws = await d.client.ws_connect("/ws", headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    if attack != "no token":
        await ws.send_json({"type": "auth", "token": token})
    await ws.send_json({"type": route[3:]})  # for "no token", this is the first message
    got, code = await closed_with(ws)
    assert got == [{"type": "error", "error": "unauthorized"}]
    return code


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("route", ROUTES)
async def test_a_refused_control_request_changes_nothing(dash: Dash, route: str,
                                                         attack: str) -> None:
    config = dict(dash.node.config)
    result = await attempt(dash, route, attack)
    expected = {"foreign Host": 403, "foreign Origin": 403}.get(
        attack, WS_UNAUTHORIZED if route.startswith("WS") else 401)
    assert result == expected
    assert dash.node.calls == []
    assert dash.node.state == "stopped"
    assert dash.node.config == config


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/api/peers", "/api/config",
                                  "/api/events", "/metrics"])
@pytest.mark.parametrize("attack", ["foreign Host", "foreign Origin"])
async def test_reads_refuse_a_foreign_host_or_origin(dash: Dash, path: str, attack: str) -> None:
    resp = await dash.client.get(path, headers=attack_headers(attack, dash.port))
    assert resp.status == 403
    assert "forbidden" in (await resp.json())["error"]


@pytest.mark.parametrize(("headers", "status"), [
    ({"Host": "LOCALHOST:{port}"}, 200),
    ({"Host": "[::1]:{port}"}, 200),
    ({"Host": "localhost:{port}", "Origin": "http://LocalHost:{port}"}, 200),
    ({"Origin": "http://127.0.0.1:{port}"}, 200),
    ({"Host": "127.0.0.1"}, 403),
    ({"Host": "127.0.0.1:1{port}"}, 403),
    ({"Host": "evil.example@127.0.0.1:{port}"}, 403),
    ({"Origin": "null"}, 403),
    ({"Origin": "http://127.0.0.1:1{port}"}, 403),
    ({"Origin": "https://127.0.0.1"}, 403),
    ({"Origin": "file://"}, 403),
])
async def test_host_and_origin_are_compared_as_host_port(dash: Dash, headers: dict[str, str],
                                                         status: int) -> None:
    resp = await dash.client.get("/api/config", headers={
        k: v.format(port=dash.port) for k, v in headers.items()})
    assert resp.status == status


def test_allowed_hosts_are_loopback_plus_a_specific_bind_address_and_extras() -> None:
    loopback = {"127.0.0.1:7800", "localhost:7800", "[::1]:7800"}
    assert allowed_hosts_for("0.0.0.0", 7800) == loopback
    assert allowed_hosts_for("::", 7800) == loopback
    assert allowed_hosts_for("192.168.1.5", 7800) == loopback | {"192.168.1.5:7800"}
    assert allowed_hosts_for("fe80::1", 7800) == loopback | {"[fe80::1]:7800"}
    assert allowed_hosts_for("0.0.0.0", 7800, ["Node.Example", "proxy.example:443"]) == (
        loopback | {"node.example:7800", "proxy.example:443"})
    with pytest.raises(ValueError):
        allowed_hosts_for("0.0.0.0", 7800, ["http://x/"])


# -- the event hub ----------------------------------------------------------------------


async def test_hub_drops_the_oldest_status_update_and_never_grows_past_its_bound() -> None:
    hub = EventHub(queue_size=8)
    sub = hub.subscribe()
    for i in range(1000):
        hub.publish("status_update", {"i": i})
        if i % 250 == 0:
            hub.publish("event", {"kind": "note", "detail": str(i)})
        assert len(sub) <= 8
    assert hub.subscriber_count == 1 and not sub.lagging
    kept = [json.loads((await sub.get()).text) for _ in range(len(sub))]
    assert [m["data"]["detail"] for m in kept if m["type"] == "event"] == [
        "0", "250", "500", "750"]
    assert kept[-1]["data"] == {"i": 999}


async def test_hub_drops_a_subscriber_that_cannot_keep_up_with_real_events() -> None:
    hub = EventHub(queue_size=3)
    slow, fast = hub.subscribe(), hub.subscribe()
    for i in range(3):
        hub.publish("event", {"kind": "note", "detail": str(i)})
    assert [(await fast.get()).type for _ in range(3)] == ["event"] * 3
    hub.publish("event", {"kind": "note", "detail": "3"})
    assert slow.lagging and len(slow) == 0 and hub.subscriber_count == 1
    hub.publish("event", {"kind": "note", "detail": "4"})
    assert len(slow) == 0 and len(fast) == 2


async def test_a_waiting_subscriber_wakes_up_on_publish() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    getter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    hub.publish("peer_left", {"node_id": "bbbb"})
    event = await asyncio.wait_for(getter, 1)
    assert event.type == "peer_left" and '"node_id": "bbbb"' in event.text
    hub.unsubscribe(sub)
    hub.publish("peer_left", {"node_id": "cccc"})
    assert len(sub) == 0


# -- Prometheus -------------------------------------------------------------------------

SAMPLE_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{((?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*",?)*)\}'
                         r' (\S+)$')


def families(text: str) -> dict[str, Any]:
    """Parse with prometheus_client, after checking the layout it tolerates silently."""
    from prometheus_client import parser  # a dev dependency: the test never skips
    assert text.endswith("\n")
    declared: list[str] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            declared.append(line.split()[2])
        elif line.startswith("# TYPE "):
            assert line.split()[2] == declared[-1]
        else:
            match = SAMPLE_LINE.match(line)
            assert match, line
            assert match[1] == declared[-1], "a sample outside its family"
            assert match[3] not in ("NaN", "nan", "None")
    assert len(declared) == len(set(declared))
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


async def test_metrics_is_valid_prometheus_text_with_the_nodes_numbers(dash: Dash) -> None:
    resp = await dash.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == PROMETHEUS_CONTENT_TYPE
    found = families(await resp.text())
    assert set(found) == {
        "fl_node_round", "fl_node_rounds_planned", "fl_node_accuracy", "fl_node_loss",
        "fl_node_peers", "fl_node_bytes_sent", "fl_node_bytes_received",
        "fl_node_cpu_percent", "fl_node_memory_rss_bytes"}

    def value(name: str, **labels: str) -> float:
        [sample] = [s for s in found[name].samples
                    if s.labels == {"node_id": "aaaa1111", **labels}]
        return sample.value

    assert value("fl_node_round") == 3 and value("fl_node_rounds_planned") == 10
    assert value("fl_node_accuracy") == 0.8 and value("fl_node_loss") == 0.25
    assert found["fl_node_bytes_sent"].type == "counter"
    assert found["fl_node_bytes_sent"].samples[0].name == "fl_node_bytes_sent_total"
    assert value("fl_node_bytes_received") == 8192
    assert value("fl_node_peers", state="connected") == 1
    assert value("fl_node_peers", state="relayed") == 1
    assert value("fl_node_peers", state="gone") == 0
    assert value("fl_node_cpu_percent") == 12.5
    assert value("fl_node_memory_rss_bytes") == 123456789
    assert all(f.type == "gauge" for n, f in found.items() if not n.startswith("fl_node_bytes"))


async def test_metrics_leaves_out_unknown_values_and_shows_epsilon_with_privacy(
        dash: Dash) -> None:
    dash.node.accuracy = None
    assert "fl_node_accuracy" not in families(await (await dash.client.get("/metrics")).text())
    dash.node.accuracy = math.nan
    dash.node.privacy = {"epsilon": 1.25, "delta": 1e-5, "target_epsilon": None}
    found = families(await (await dash.client.get("/metrics")).text())
    assert "fl_node_accuracy" not in found
    assert found["fl_node_epsilon"].samples[0].value == 1.25


def test_metrics_label_values_are_escaped_and_floats_round_trip() -> None:
    status = {"node_id": 'a"b\\c\nd', "round": 2, "loss": 1e-7, "accuracy": math.inf,
              "peers": [{"state": "connected"}, {"state": "weird\"state"}]}
    found = families(prometheus_text(status))
    assert found["fl_node_round"].samples[0].labels == {"node_id": 'a"b\\c\nd'}
    assert found["fl_node_loss"].samples[0].value == 1e-7
    assert found["fl_node_accuracy"].samples[0].value == math.inf
    states = {s.labels["state"]: s.value for s in found["fl_node_peers"].samples}
    assert states['weird"state'] == 1 and states["connected"] == 1
    assert "fl_node_bytes_sent" not in found and "fl_node_epsilon" not in found


def test_resources_reads_this_process() -> None:
    res = resources()
    assert set(res) == {"cpu_percent", "memory_rss", "memory_percent", "net_bytes_sent",
                        "net_bytes_recv"}
    assert res["memory_rss"] > 10_000_000
    assert 0 < res["memory_percent"] < 100
    assert res["cpu_percent"] >= 0 and res["net_bytes_sent"] >= 0

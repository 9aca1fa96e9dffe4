"""The terminal dashboard: what the operator sees for what the node says, the keys, and
the node client's history replay, live feed, commands and reconnection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer, unused_port
from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets import ProgressBar, Static

from tui.app import FlNodeApp, run_tui
from tui.model import Dashboard
from tui.pairing import PairingScreen
from tui.source import NodeSource, SourceError
from tui.widgets import (
    EventLog,
    MetricChart,
    NodeHeader,
    PeersTable,
    ResourcesView,
    RoundProgress,
    TopologyView,
)

from .fakes import PAIRING_URI, TOKEN, FakeNode, FakeSource, message, peer, status

SIZE = (120, 40)
BRAVO, CHARLIE = "BRAV-OOOO-1111-2222-B", "CHAR-LIEE-3333-4444-C"


def shown(widget: Widget) -> str:
    """The plain text a widget renders."""
    return str(widget.render())


def log_text(app: FlNodeApp) -> str:
    """Everything in the event log."""
    return "\n".join(line.text for line in app.query_one(EventLog).lines)


async def settle(pilot: Pilot[Any], source: FakeSource, *messages: dict[str, Any]) -> None:
    """Feed ``messages`` and let the app handle them and redraw (widgets follow the data
    within ``FlNodeApp.REDRAW_INTERVAL``)."""
    await source.feed(*messages)
    await pilot.pause()
    await pilot.pause(2 * FlNodeApp.REDRAW_INTERVAL)
    await pilot.pause()


async def until(pilot: Pilot[Any], condition: Callable[[], bool]) -> None:
    """Let the app run until ``condition`` holds (a worker's effect); fail after 5 s."""
    for _ in range(500):
        if condition():
            return
        await pilot.pause(0.01)
    raise AssertionError("condition not reached in 5 s")


# -- the app, fed by a fake source ------------------------------------------------------------

async def test_status_shows_identity_state_role_and_round_progress() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, source, message("hello", status(round_=0)),
                     message("status_update", status(round_=3, rounds_total=10)))
        bar = app.query_one(RoundProgress).query_one(ProgressBar)
        assert (bar.progress, bar.total) == (3, 10)
        assert "round 3/10" in str(app.query_one("#round-label", Static).content)
        header = shown(app.query_one(NodeHeader))
        assert "alpha" in header and "AAAA-BBBB-CCCC-DDDD-E" in header
        assert "federation lab" in header
        assert "state training" in header and "role aggregator" in header
        assert "mode elected" in header


async def test_metrics_updates_add_points_to_the_charts_once_per_round() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        chart = app.query_one("#accuracy", MetricChart)
        assert shown(chart).endswith("no rounds yet")
        await settle(pilot, source,
                     message("metrics_update", {"round": 1, "accuracy": 0.5, "loss": 1.5}),
                     message("metrics_update", {"round": 2, "accuracy": 0.75, "loss": 0.9}),
                     # a reconnect replays history: the same round again is not a new point
                     message("metrics_update", {"round": 2, "accuracy": 0.75, "loss": 0.9}),
                     message("metrics_update", {"round": 3, "accuracy": None}))
        assert chart.points == ((1, 0.5), (2, 0.75))
        assert app.query_one("#loss", MetricChart).points == ((1, 1.5), (2, 0.9))
        assert "accuracy 0.750" in shown(chart)


async def test_peers_fill_the_table_and_leave_it() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(PeersTable)
        await settle(pilot, source,
                     message("peer_joined", {"node_id": BRAVO, "name": "bravo"}))
        assert table.row_count == 1
        assert table.get_cell(BRAVO, "name") == "bravo"
        await settle(pilot, source, message("status_update", status(peers=[
            peer("bravo", BRAVO, rtt_ms=12.4, round_=3),
            peer("charlie", CHARLIE, state="suspect", rtt_ms=None, round_=2)])))
        assert table.row_count == 2
        assert [table.get_row_at(i)[0] for i in range(2)] == ["bravo", "charlie"]
        assert str(table.get_cell(BRAVO, "id")) == "BRAV-OOOO"
        assert str(table.get_cell(BRAVO, "state")) == "connected"
        assert str(table.get_cell(BRAVO, "trust")) == "paired"
        assert str(table.get_cell(BRAVO, "rtt")) == "12 ms"
        assert str(table.get_cell(BRAVO, "round")) == "3"
        assert str(table.get_cell(CHARLIE, "state")) == "suspect"
        assert str(table.get_cell(CHARLIE, "rtt")) == "-"
        await settle(pilot, source, message("peer_left", {"node_id": CHARLIE}))
        assert table.row_count == 1
        assert "charlie left" in log_text(app)


async def test_topology_lists_direct_links_and_each_peers_links() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, source, message("status_update", status(peers=[
            peer("bravo", BRAVO, links=("AAAA-BBBB-CCCC-DDDD-E", CHARLIE)),
            peer("charlie", CHARLIE, state="relayed", links=(BRAVO,))])))
        lines = [" ".join(line.split()) for line in
                 shown(app.query_one(TopologyView)).splitlines()]
        assert lines == ["alpha ── bravo",  # charlie is relayed: no direct link
                         "bravo ── alpha, charlie", "charlie ── bravo"]


async def test_resources_and_privacy_budget_are_shown() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, source, message("status_update", status(
            resources={"cpu_percent": 42.0, "memory_rss": 250_000_000,
                       "net_bytes_sent": 1_500_000, "net_bytes_recv": 2_500},
            privacy={"epsilon": 1.25, "delta": 1e-5, "target_epsilon": 3.0})))
        text = shown(app.query_one(ResourcesView))
        assert "CPU 42%" in text and "RSS 250 MB" in text
        assert "↑1.5 MB ↓2.5 kB" in text
        assert "ε 1.25/3.00" in text


async def test_keys_s_and_x_start_and_stop_training() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: "start sent, node state: training" in log_text(app))
        await pilot.press("x")
        await until(pilot, lambda: "stop sent, node state: stopped" in log_text(app))
        assert source.calls == ["start", "stop"]


async def test_a_refused_command_is_reported_and_the_app_carries_on() -> None:
    source = FakeSource()
    source.failure = SourceError("the node refused the API token (HTTP 401)")
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("x")
        await until(pilot, lambda: "stop failed" in log_text(app))
        assert "refused the API token (HTTP 401)" in log_text(app)
        assert app.is_running and source.calls == ["stop"]


async def test_p_shows_the_pairing_code_and_escape_closes_it() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, PairingScreen))
        assert str(app.screen.query_one("#pairing-uri", Static).content) == PAIRING_URI
        qr = str(app.screen.query_one("#pairing-qr", Static).content)
        assert len(qr.splitlines()) > 10 and "█" in qr
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, PairingScreen))


async def test_losing_the_node_shows_disconnected_and_retrying() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        header = app.query_one(NodeHeader)
        assert "connecting" in shown(header)
        await settle(pilot, source, message("connection", {"connected": True, "error": None}))
        assert "● connected" in shown(header)
        refused = {"connected": False, "error": "cannot connect to 127.0.0.1:7800: connection"
                   " refused", "retry_in": 2.0}
        await settle(pilot, source, message("connection", refused),
                     message("connection", refused))
        assert "disconnected, retrying in 2.0 s" in shown(header)
        assert "connection refused" in shown(header)
        assert log_text(app).count("disconnected: cannot connect") == 1  # retries not logged
        await settle(pilot, source, message("connection", {"connected": True, "error": None}))
        assert "● connected" in shown(header)


async def test_q_quits() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running)
    assert app.return_code == 0


async def test_every_part_is_visible_in_an_80x24_terminal() -> None:
    source = FakeSource()
    app = FlNodeApp(source)
    async with app.run_test(size=(80, 24)) as pilot:
        rounds = [message("metrics_update", {"round": r, "accuracy": r / 10, "loss": 1 / r})
                  for r in range(1, 6)]
        await settle(pilot, source, message("status_update", status(
            peers=[peer("bravo", BRAVO), peer("charlie", CHARLIE)],
            resources={"cpu_percent": 1.0, "memory_rss": 1, "net_bytes_sent": 1,
                       "net_bytes_recv": 1},
            privacy={"epsilon": 1.0})), *rounds)
        screen = app.screen.region
        for part in (NodeHeader, RoundProgress, PeersTable, TopologyView, ResourcesView,
                     EventLog):
            region = app.query_one(part).region
            assert region.height > 0 and screen.contains_region(region), part.__name__
        for chart in app.query(MetricChart):
            assert chart.region.height >= 2 and screen.contains_region(chart.region)
        table = app.query_one(PeersTable)
        assert table.virtual_size.width <= table.scrollable_content_region.width  # no h-scroll


def test_the_dashboard_ignores_malformed_messages() -> None:
    board = Dashboard()
    for bad in ({}, {"type": 3}, {"type": "hello", "data": "x"},
                {"type": "status_update", "data": {"round": "3", "peers": [1, {"name": "x"}]}},
                {"type": "metrics_update", "data": {"accuracy": 0.5}},
                {"type": "peer_left", "data": {}}, {"type": "unknown", "data": {}}):
        assert board.apply(bad, now=0.0) == []
    assert (board.status.round, board.peers, board.rounds) == (0, {}, {})


# -- NodeSource against a real (local) HTTP + WebSocket server -------------------------------

async def take_until(events: AsyncIterator[dict[str, Any]],
                     last: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Messages from ``events`` up to and including the first for which ``last`` holds."""
    got: list[dict[str, Any]] = []
    while not got or not last(got[-1]):
        got.append(await asyncio.wait_for(anext(events), 5))
    return got


def is_connection(connected: bool) -> Callable[[dict[str, Any]], bool]:
    """Matches a ``connection`` message with this ``connected``."""
    return lambda m: m["type"] == "connection" and m["data"]["connected"] is connected


async def test_node_source_replays_history_follows_live_events_and_reconnects(
        no_leaked_tasks: None) -> None:
    node = FakeNode()
    server = TestServer(node.app(), host="127.0.0.1", port=0)
    await server.start_server()
    port = server.port
    async with NodeSource(f"http://127.0.0.1:{port}", TOKEN, min_backoff=0.05,
                          max_backoff=0.2) as source:
        events = source.events()
        try:
            got = await take_until(events, lambda m: m["type"] == "hello")
            assert [m["type"] for m in got] == ["status_update", "metrics_update",
                                                "metrics_update", "event", "connection",
                                                "hello"]
            assert got[0]["data"]["name"] == "alpha"
            assert got[2]["data"]["accuracy"] == 0.7
            assert got[3]["data"] == {"kind": "start", "detail": "node started"}
            assert got[4]["data"]["connected"] is True
            assert node.ws_tokens == [TOKEN]

            await node.push(message("event", {"kind": "round", "detail": "pushed"}))
            pushed = await asyncio.wait_for(anext(events), 5)
            assert (pushed["type"], pushed["data"]["detail"]) == ("event", "pushed")

            await server.close()
            down = await take_until(events, is_connection(False))
            assert down[-1]["data"]["error"] == "the node closed the connection"
            refused = await take_until(events, is_connection(False))
            assert "connection refused" in refused[-1]["data"]["error"]

            node.rounds.append({"round": 3, "accuracy": 0.8, "loss": 0.5, "ts": 1120.0})
            server = TestServer(node.app(), host="127.0.0.1", port=port)
            await server.start_server()
            back = await take_until(events, is_connection(True))
            replayed = [m for m in back if m["type"] != "connection"]
            assert [m["type"] for m in replayed] == ["status_update"] + ["metrics_update"] * 3
            assert node.ws_tokens == [TOKEN, TOKEN]
            assert (await asyncio.wait_for(anext(events), 5))["type"] == "hello"
        finally:
            await events.aclose()
            await server.close()


async def test_node_source_commands_send_the_token(no_leaked_tasks: None) -> None:
    node = FakeNode()
    async with TestServer(node.app(), host="127.0.0.1", port=0) as server:
        async with NodeSource(f"http://127.0.0.1:{server.port}", TOKEN) as source:
            assert await source.stop() == "stopped"
            assert await source.start() == "training"
            assert await source.pairing_uri() == PAIRING_URI
    assert node.posts == [("/api/stop", f"Bearer {TOKEN}", {}),
                          ("/api/start", f"Bearer {TOKEN}", {}),
                          ("/api/pair/offer", f"Bearer {TOKEN}", {"ttl": 600})]


async def test_node_source_words_the_nodes_refusals(no_leaked_tasks: None) -> None:
    node = FakeNode()
    node.status["state"] = "stopped"
    async with TestServer(node.app(), host="127.0.0.1", port=0) as server:
        url = f"http://127.0.0.1:{server.port}"
        async with NodeSource(url, TOKEN) as source:
            with pytest.raises(SourceError, match=r"^POST /api/stop: HTTP 400: not training$"):
                await source.stop()
        async with NodeSource(url, "wrong", min_backoff=0.05) as source:
            with pytest.raises(SourceError, match="refused the API token"):
                await source.start()
            events = source.events()
            try:
                got = await take_until(events, is_connection(False))
            finally:
                await events.aclose()
            assert got[-1]["data"]["error"] == "the node refused the API token (unauthorized)"


async def test_node_source_reports_an_absent_node(no_leaked_tasks: None) -> None:
    port = unused_port()
    async with NodeSource(f"http://127.0.0.1:{port}", TOKEN, min_backoff=0.05) as source:
        with pytest.raises(SourceError, match=f"cannot connect to 127.0.0.1:{port}"):
            await source.pairing_uri()
        events = source.events()
        try:
            first, second = [await asyncio.wait_for(anext(events), 5) for _ in range(2)]
        finally:
            await events.aclose()
    assert first["type"] == second["type"] == "connection"
    assert first["data"]["connected"] is False
    assert first["data"]["error"] == f"cannot connect to 127.0.0.1:{port}: connection refused"
    assert (first["data"]["retry_in"], second["data"]["retry_in"]) == (0.05, 0.1)  # backoff


def test_run_tui_refuses_a_bad_address_without_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_tui("127.0.0.1:7800", TOKEN) == 2
    assert "not a node address" in capsys.readouterr().err

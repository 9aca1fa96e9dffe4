"""The fl-node terminal dashboard: :class:`FlNodeApp` and :func:`run_tui`.

One worker consumes the :class:`~tui.source.DataSource` and posts each message to the app;
the app folds it into a :class:`~tui.model.Dashboard` and assigns the result to the
widgets' reactive attributes. Keys: ``s`` start training, ``x`` stop, ``p`` pairing code,
``q`` quit.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from typing import Any, TypeVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Footer

from .model import Dashboard, LogLine
from .pairing import PairingScreen
from .source import DataSource, NodeSource, SourceError
from .widgets import (
    EventLog,
    MetricChart,
    NodeHeader,
    PeersTable,
    ResourcesView,
    RoundProgress,
    TopologyView,
)

W = TypeVar("W", bound=Widget)


class NodeMessage(Message):
    """One message from the data source, on its way to the app's message queue."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        super().__init__()
        self.payload = payload


class FlNodeApp(App[None]):
    """Live view of one fl-node: identity, rounds, metrics, peers, topology and events."""

    TITLE = "fl-node"

    CSS = """
    #main { height: 2fr; min-height: 10; }
    #left { width: 36%; min-width: 27; max-width: 60; }
    #right { width: 1fr; }
    .panel { border-top: solid $primary-darken-1; border-title-color: $text-accent;
             padding: 0 1; }
    #metrics { height: 1fr; }
    #accuracy, #loss { height: 1fr; max-height: 7; }
    #resources { height: auto; }
    #peers { height: 1fr; min-height: 3; padding: 0; }
    #topology-box { height: auto; max-height: 40%; }
    #log { height: 1fr; min-height: 4; }
    """

    BINDINGS = [
        Binding("s", "start_training", "Start"),
        Binding("x", "stop_training", "Stop"),
        Binding("p", "show_pairing", "Pairing code"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, source: DataSource) -> None:
        super().__init__()
        self.source = source
        self.dashboard = Dashboard()
        self._redraw_pending = False

    def compose(self) -> ComposeResult:
        """Header and round bar on top, metrics | peers in the middle, the log below."""
        yield NodeHeader(id="header")
        yield RoundProgress(id="progress")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                with _panel(Vertical(id="metrics"), "metrics"):
                    yield MetricChart("accuracy", color="green", id="accuracy")
                    yield MetricChart("loss", color="yellow", id="loss")
                yield _panel(ResourcesView(id="resources"), "resources")
            with Vertical(id="right"):
                yield _panel(PeersTable(id="peers"), "peers")
                with _panel(Vertical(id="topology-box"), "topology"):
                    yield TopologyView(id="topology")
        yield _panel(EventLog(id="log"), "events")
        yield Footer()

    def on_mount(self) -> None:
        """Start following the data source."""
        self.follow_source()

    @work(exclusive=True, group="source")
    async def follow_source(self) -> None:
        """Post every message of the data source to the app, for as long as the app runs."""
        async for payload in self.source.events():
            self.post_message(NodeMessage(payload))

    #: Widgets are redrawn at most this often (seconds): a fast-training node sends many
    #: events a second, and redrawing on each would let the app fall behind its keys.
    REDRAW_INTERVAL = 0.1

    def on_node_message(self, message: NodeMessage) -> None:
        """Fold a source message into the dashboard; the widgets follow within
        ``REDRAW_INTERVAL``."""
        lines = self.dashboard.apply(message.payload, time.time())
        if not self._redraw_pending:
            self._redraw_pending = True
            self.set_timer(self.REDRAW_INTERVAL, self._redraw)
        log = self.query_one(EventLog)
        for line in lines:
            log.add(line)

    def _redraw(self) -> None:
        self._redraw_pending = False
        self._show()

    def _show(self) -> None:
        """Hand the dashboard's current values to the widgets (equal values redraw nothing)."""
        d = self.dashboard
        header = self.query_one(NodeHeader)
        header.status, header.role, header.connection = d.status, d.role(), d.connection
        self.query_one(RoundProgress).status = d.status
        self.query_one("#accuracy", MetricChart).points = d.series("accuracy")
        self.query_one("#loss", MetricChart).points = d.series("loss")
        self.query_one(ResourcesView).status = d.status
        self.query_one(PeersTable).peers = d.peer_rows()
        self.query_one(TopologyView).rows = d.topology()

    def _note(self, kind: str, detail: str) -> None:
        """A line of the TUI's own in the event log."""
        self.query_one(EventLog).add(LogLine(time.time(), kind, detail))

    def action_start_training(self) -> None:
        """``s``: ask the node to start training."""
        self.send_command("start")

    def action_stop_training(self) -> None:
        """``x``: ask the node to stop training."""
        self.send_command("stop")

    @work(group="commands")
    async def send_command(self, command: str) -> None:
        """Run ``start`` or ``stop`` on the source; failures are shown, not raised."""
        call = self.source.start if command == "start" else self.source.stop
        try:
            state = await call()
        except SourceError as exc:
            self._note("error", f"{command} failed: {exc}")
            self.notify(str(exc), title=f"{command} failed", severity="error")
        else:
            self._note("command", f"{command} sent, node state: {state}")

    @work(exclusive=True, group="pairing")
    async def action_show_pairing(self) -> None:
        """``p``: fetch a one-time pairing code and show it as a QR code."""
        if isinstance(self.screen, PairingScreen):
            return
        try:
            uri = await self.source.pairing_uri()
        except SourceError as exc:
            self._note("error", f"pairing code failed: {exc}")
            self.notify(str(exc), title="pairing code failed", severity="error")
        else:
            await self.push_screen(PairingScreen(uri))


def _panel(widget: W, title: str) -> W:
    """Give ``widget`` the panel look: a rule on top, carrying ``title``."""
    widget.add_class("panel")
    widget.border_title = title
    return widget


def run_tui(url: str, token: str) -> int:
    """Run the dashboard against the node at ``url`` (its web API); return the exit code.

    ``token`` is the node's API token (``<state dir>/api.token``), needed for the live feed
    and the start/stop/pairing commands. Returns 2 for an unusable ``url``.
    """
    try:
        source = NodeSource(url, token)
    except ValueError as exc:
        print(f"fl-node tui: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        async with source:
            app = FlNodeApp(source)
            await app.run_async()
            return app.return_code or 0

    return asyncio.run(main())

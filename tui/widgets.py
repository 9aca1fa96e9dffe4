"""The dashboard's widgets. Each displays what the app assigns to its reactive attributes.

No widget fetches anything or knows where its data comes from: the app folds the data
source's messages into a :class:`tui.model.Dashboard` and hands the widgets its values.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import DataTable, Label, ProgressBar, RichLog

from .model import Connection, LogLine, NodeStatus, Peer, Resources, TopologyRow, short_id

#: Colours of peer states and node states, for a quick read of what is healthy.
STATE_STYLES = {
    "connected": "green", "relayed": "cyan", "joined": "cyan", "suspect": "yellow",
    "gone": "red", "untrusted": "red", "banned": "red",
    "training": "bold green", "collecting": "green", "aggregating": "bold magenta",
    "waiting": "yellow", "joining": "yellow", "waiting_model": "yellow", "offline": "red",
    "stopped": "red",
    "done": "bold blue",
}
#: Colours of event-log kinds.
KIND_STYLES = {"connection": "magenta", "error": "bold red", "round": "green",
               "training": "cyan", "peer": "blue"}


def human_bytes(count: int | None) -> str:
    """``48.2 MB`` style: three significant digits, decimal units; ``-`` when unknown."""
    if count is None:
        return "-"
    if count < 1000:
        return f"{count} B"
    value, unit = count / 1000, "kB"
    for larger in ("MB", "GB"):
        if value < 999.5:
            break
        value, unit = value / 1000, larger
    return f"{value:.3g} {unit}" if value < 999.5 else f"{value:.0f} {unit}"


def human_duration(seconds: float) -> str:
    """``3d 4h``, ``1h 02m``, ``5m 07s`` or ``42s``."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {s:02d}s" if minutes else f"{s}s"


class NodeHeader(Widget):
    """Who the node is, what it is doing, and whether the TUI can reach it."""

    DEFAULT_CSS = """
    NodeHeader { height: auto; background: $panel; padding: 0 1; }
    """

    # layout=True: a long error wraps the header onto another line.
    status: reactive[NodeStatus] = reactive(NodeStatus, layout=True)
    role: reactive[str] = reactive("", layout=True)
    connection: reactive[Connection] = reactive(Connection, layout=True)

    def render(self) -> Text:
        """Identity and link on the first line, state and role on the second."""
        s = self.status
        text = Text()
        text.append(s.name or "(unknown node)", style="bold")
        if s.node_id:
            text.append(f"  {s.node_id}", style="dim")
        if s.federation:
            text.append("  federation ").append(s.federation, style="bold")
        if s.uptime_s is not None:
            text.append("  up ").append(human_duration(s.uptime_s), style="bold")
        text.append("  ").append_text(self._link())
        text.append("\nstate ").append(s.state or "-", style=STATE_STYLES.get(s.state, "bold"))
        text.append("  role ").append(self.role or "-", style="bold")
        if s.mode:
            text.append("  mode ").append(s.mode, style="bold" if s.mode == "elected"
                                          else "bold yellow")
        if s.quorum_need is not None:
            have = s.quorum_have
            text.append(f"  quorum {s.quorum_need}, have ")
            text.append("?" if have is None else str(have),
                        style="bold green" if have is not None and have >= s.quorum_need
                        else "bold yellow")
        return text

    def _link(self) -> Text:
        c = self.connection
        if c.connected:
            return Text("● connected", style="bold green")
        if c.connected is None:
            return Text("○ connecting…", style="bold yellow")
        retry = f" in {c.retry_in:.1f} s" if c.retry_in is not None else ""
        text = Text(f"● disconnected, retrying{retry}", style="bold red")
        if c.error:
            text.append(f" ({c.error})", style="red")
        return text


class RoundProgress(Widget):
    """Completed rounds out of the planned total, as a bar."""

    DEFAULT_CSS = """
    RoundProgress { height: 1; layout: horizontal; padding: 0 1; }
    RoundProgress > #round-label { width: auto; margin-right: 1; text-style: bold; }
    RoundProgress > #round-extra { width: auto; margin-left: 1; color: $text-muted; }
    RoundProgress > ProgressBar { width: auto; }
    """

    status: reactive[NodeStatus] = reactive(NodeStatus)

    def compose(self) -> ComposeResult:
        """Label, bar, and what the node is doing in the round under way."""
        yield Label("round -", id="round-label")
        yield ProgressBar(show_eta=False, id="round-bar")
        yield Label("", id="round-extra")

    def watch_status(self, status: NodeStatus) -> None:
        """Move the bar to the status's round."""
        total = status.rounds_total or None
        self.query_one(ProgressBar).update(total=total, progress=status.round)
        self.query_one("#round-label", Label).update(
            f"round {status.round}/{total if total is not None else '?'}")
        extra = ""
        if status.state not in ("", "done", "stopped") and status.current_round is not None \
                and status.current_round > status.round:
            extra = f"working on round {status.current_round}"
            if status.attempt:  # aggregators that failed this round
                extra += f", retry {status.attempt}"
        self.query_one("#round-extra", Label).update(extra)


class MetricChart(Widget):
    """One metric over rounds: the latest value, then a bar per round scaled to the range.

    ``points`` are ``(round, value)`` pairs in round order; when there are more rounds than
    columns the latest ones are shown.
    """

    DEFAULT_CSS = """
    MetricChart { height: 4; min-height: 2; }
    """

    BARS = " ▁▂▃▄▅▆▇█"

    points: reactive[tuple[tuple[int, float], ...]] = reactive(tuple)

    def __init__(self, label: str, *, color: str, id: str | None = None) -> None:
        super().__init__(id=id)
        self.label = label
        self.color = color

    def render(self) -> Text:
        """Title with the latest value, then the bars with their range on the left."""
        text = Text()
        text.append(f"{self.label} ", style="bold")
        if not self.points:
            return text.append("-", style="bold").append("\nno rounds yet", style="dim")
        last_round, last_value = self.points[-1]
        text.append(f"{last_value:.3f}", style=f"bold {self.color}")
        text.append(f"  round {last_round}", style="dim")
        values = [v for _, v in self.points]
        gutter = max(len(f"{v:.3f}") for v in values)
        width = max(self.size.width - gutter - 1, 1)
        shown = values[-width:]
        column = max(1, min(3, width // len(shown)))
        lo, hi = min(shown), max(shown)
        top, bottom = f"{hi:.3f}", f"{lo:.3f}"
        rows = max(self.size.height - 1, 1)
        eighths = rows * 8
        levels = [1 + round((0.5 if hi == lo else (v - lo) / (hi - lo)) * (eighths - 1))
                  for v in shown]
        for row in reversed(range(rows)):
            label = top if row == rows - 1 else bottom if row == 0 else ""
            text.append(f"\n{label:>{gutter}} ", style="dim")
            bars = "".join(self.BARS[max(0, min(8, level - row * 8))] * column
                           for level in levels)
            text.append(bars, style=self.color)
        return text


class PeersTable(DataTable[str | Text]):
    """One row per known peer, keyed by node id; rows change in place as peers change."""

    COLUMNS = (("name", "name"), ("id", "node id"), ("state", "state"), ("trust", "trust"),
               ("rtt", "RTT"), ("round", "round"))

    peers: reactive[tuple[Peer, ...]] = reactive(tuple)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        for key, label in self.COLUMNS:
            self.add_column(label, key=key)

    @staticmethod
    def cells(peer: Peer) -> tuple[str | Text, ...]:
        """The row of one peer, in COLUMNS order."""
        return (peer.name or short_id(peer.node_id), short_id(peer.node_id),
                Text(peer.state or "-", style=STATE_STYLES.get(peer.state, "")),
                peer.trust or "-",
                Text(f"{peer.rtt_ms:.0f} ms" if peer.rtt_ms is not None else "-",
                     justify="right"),
                Text(str(peer.round) if peer.round is not None else "-", justify="right"))

    def watch_peers(self, peers: tuple[Peer, ...]) -> None:
        """Drop rows of peers that left, update the others, add newcomers."""
        wanted = {p.node_id for p in peers}
        for key in [k for k in self.rows if k.value not in wanted]:
            self.remove_row(key)
        for peer in peers:
            cells = self.cells(peer)
            if peer.node_id in self.rows:
                for (column, _), value in zip(self.COLUMNS, cells, strict=True):
                    self.update_cell(peer.node_id, column, value)
            else:
                self.add_row(*cells, key=peer.node_id)
        self.sort("name", "id")


class TopologyView(Widget):
    """An adjacency list: this node and its direct links, then each peer's links."""

    DEFAULT_CSS = """
    TopologyView { height: auto; }
    """

    rows: reactive[tuple[TopologyRow, ...]] = reactive(tuple, layout=True)

    def render(self) -> Text:
        """One line per node: ``name ── linked, names``."""
        text = Text()
        width = max((len(r.name) for r in self.rows), default=0)
        for i, row in enumerate(self.rows):
            if i:
                text.append("\n")
            text.append(f"{row.name:<{width}}",
                        style="bold reverse" if row.is_self else "bold")
            text.append(" ── ", style="dim")
            if row.links:
                text.append(", ".join(row.links))
            else:
                text.append("no links", style="dim")
        return text


class ResourcesView(Widget):
    """CPU and memory of the node process, the host's network totals, the node's peer
traffic, and the privacy budget spent."""

    DEFAULT_CSS = """
    ResourcesView { height: auto; }
    """

    status: reactive[NodeStatus] = reactive(NodeStatus, layout=True)

    def render(self) -> Text:
        """Short lines, to fit a narrow column; privacy only when the node reports it."""
        s, r = self.status, self.status.resources or Resources()
        text = Text()
        cpu = f"{r.cpu_percent:.0f}%" if r.cpu_percent is not None else "-"
        text.append("CPU ").append(cpu, style="bold")
        text.append("  RSS ").append(human_bytes(r.memory_rss), style="bold")
        text.append("\nhost net ↑").append(human_bytes(r.net_bytes_sent), style="bold")
        text.append(" ↓").append(human_bytes(r.net_bytes_recv), style="bold")
        text.append("\npeers ↑").append(human_bytes(s.bytes_sent), style="bold")
        text.append(" ↓").append(human_bytes(s.bytes_received), style="bold")
        if s.privacy is not None:
            p = s.privacy
            text.append("\nDP ε ").append(f"{p.epsilon:.2f}", style="bold magenta")
            if p.target_epsilon is not None:
                text.append(f"/{p.target_epsilon:.2f}")
            if p.delta is not None:
                text.append(f" δ {p.delta:.0e}", style="dim")
        return text


class EventLog(RichLog):
    """The node's event log and the TUI's own notes, newest at the bottom."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, max_lines=1000, min_width=20, wrap=True, markup=False)

    def add(self, line: LogLine) -> None:
        """Append one line: local time, kind, detail."""
        text = Text(time.strftime("%H:%M:%S ", time.localtime(line.ts)), style="dim")
        text.append(f"{line.kind:<10} ", style=KIND_STYLES.get(line.kind, "yellow"))
        text.append(line.detail)
        self.write(text)

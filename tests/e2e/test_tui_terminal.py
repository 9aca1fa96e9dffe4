"""The terminal UI in a real terminal (tmux), attached to real nodes.

Each test runs a private tmux server (``tmux -L <unique name>``) with a fixed 120x40
window, reads the screen with ``capture-pane`` and types with ``send-keys``. A shell around
the program writes its exit status to a file (see ``Terminal.run``), and panes stay after
their program ends (``remain-on-exit``) so the last screen can still be read. Every
process a test starts (tmux server, TUI, nodes) is stopped at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from .cluster import REPO, Cluster, NodeProc, poll_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tmux") is None,
                       reason="tmux is not installed (scripts/system-deps installs it)"),
]

T = TypeVar("T")

WIDTH, HEIGHT = 120, 40
#: Seconds to wait for anything to show on the screen or happen in a node. Generous: a
#: loaded 2-core machine may take many seconds to import torch and textual.
TIMEOUT = 90.0
#: A node that trains (a round every fraction of a second) for much longer than a test.
TRAINING = ("--dataset", "digits", "--rounds", "1000", "--local-epochs", "4",
            "--min-peers", "0")
#: What the pane's program gets on top of the test's environment.
PANE_ENV = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONUNBUFFERED": "1"}

ROUND = re.compile(r"\bround (\d+)/1000\b")       # RoundProgress: "round 12/1000"
STATE = re.compile(r"\bstate (\S+)  role\b")       # NodeHeader, second line
EPSILON = re.compile(r"DP ε (\d+\.\d\d)/(\d+\.\d\d)")  # NodeStats: "DP ε 1.37/8.00"
CONNECTED = "● connected"                          # NodeHeader link ("● disconnected…" differs)
DISCONNECTED = "● disconnected, retrying"


class Terminal:
    """One private tmux server with one session, ``fl``, running one program."""

    def __init__(self, base: Path) -> None:
        self.name = f"fl-tui-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.conf = base / "tmux.conf"
        self.conf.write_text("set -g remain-on-exit on\n"
                             "set -g status off\n"
                             "set -g history-limit 0\n")
        self.env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8")
        self.extra: list[psutil.Process] = []  # processes to stop that may leave the tree
        self.started = False
        self.last_screen = ""
        self.status_file = base / "pane.status"

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-u", "-L", self.name, "-f", str(self.conf), *args],
                              env=self.env, capture_output=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode("utf-8", errors="replace")

    def run(self, argv: list[str]) -> None:
        """Start ``argv`` (in the repository, with PANE_ENV) in a fresh 120x40 window.

        A shell around it writes its exit status to ``self.status_file``: tmux 3.3a's own
        ``pane_dead_status`` is unreliable (it sometimes never reaps the pane's program,
        leaving a zombie and no status, even for ``sleep 1``)."""
        program = ["env", *(f"{k}={v}" for k, v in PANE_ENV.items()), *argv]
        command = shlex.join(["sh", "-c", '"$@"; echo "$?" > "$0.part" && mv "$0.part" "$0"',
                              str(self.status_file), *program])
        self.started = True  # from here on, close() has a server to kill
        self.tmux("new-session", "-d", "-s", "fl", "-x", str(WIDTH), "-y", str(HEIGHT),
                  "-c", str(REPO), command)

    def screen(self) -> str:
        self.last_screen = self.tmux("capture-pane", "-p", "-t", "fl")
        return self.last_screen

    def press(self, key: str) -> None:
        self.tmux("send-keys", "-t", "fl", key)

    def dead(self) -> bool:
        """Whether the pane's program has ended (its exit status is written)."""
        return self.status_file.exists()

    def exit_status(self) -> str:
        """``0`` for a clean exit; else the status (128 + N: killed by signal N)."""
        return self.status_file.read_text().strip()

    def stacks(self) -> str:
        """The Python stacks of the pane's processes (py-spy), to tell a frozen UI's cause."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out = []
        try:
            panes = self.tmux("list-panes", "-a", "-F", "#{pane_dead} #{pane_pid}")
            out.append(f"--- panes (dead pid)\n{panes}")
            for dead, pid in (line.split() for line in panes.splitlines()):
                root = psutil.Process(int(pid))
                tree = [root, *root.children(recursive=True)]
                out.append("\n".join(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:160]}"
                                     for p in tree))
                if dead != "0":
                    continue
                for p in [*tree, *self.extra]:
                    if "python" not in p.name():
                        continue
                    done = subprocess.run([spy, "dump", "--locals", "--pid", str(p.pid)],
                                          capture_output=True, timeout=30, text=True)
                    out.append(f"--- py-spy dump {p.pid}\n{done.stdout}{done.stderr}")
        except (RuntimeError, psutil.Error, ValueError, OSError,
                subprocess.TimeoutExpired) as exc:
            out.append(f"(no stacks: {exc})")
        return "\n".join(out)

    def close(self) -> None:
        """Kill the tmux server and every process of the pane, also orphaned ones."""
        procs = list(self.extra)
        socket = None
        if self.started:
            try:
                socket = Path(self.tmux("display-message", "-p", "#{socket_path}").strip())
            except RuntimeError:
                pass
            try:
                panes = self.tmux("list-panes", "-a", "-F", "#{pane_dead} #{pane_pid}")
                for dead, pid in (line.split() for line in panes.splitlines()):
                    if dead == "0":  # a dead pane's pid may belong to another process now
                        root = psutil.Process(int(pid))
                        procs += [root, *root.children(recursive=True)]
            except (RuntimeError, psutil.Error, ValueError):
                pass
            try:
                self.tmux("kill-server")
            except RuntimeError:
                pass  # the server is gone already
            if socket is not None and socket.name == self.name:
                socket.unlink(missing_ok=True)  # tmux leaves its socket file behind
        alive = [p for p in procs if _running(p)]
        for p in alive:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, left = psutil.wait_procs(alive, timeout=15)
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path)
    try:
        yield term
    finally:
        term.close()


def wait_for(probe: Callable[[], T | None], what: str, term: Terminal,
             nodes: list[NodeProc] = (), timeout: float = TIMEOUT) -> T:
    """``poll_until`` ``probe`` and return its value; on timeout the failure shows the
    last screen and the pane's Python stacks too."""
    return poll_until(probe, timeout, what, nodes,
                      extra=lambda: f"--- screen\n{term.last_screen}\n{term.stacks()}")


def screen_round(screen: str) -> int | None:
    """The completed-round count of the round bar, or None if not shown."""
    m = ROUND.search(screen)
    return int(m.group(1)) if m else None


def screen_state(screen: str) -> str | None:
    m = STATE.search(screen)
    return m.group(1) if m else None


def screen_epsilon(screen: str) -> tuple[float, float] | None:
    """(epsilon spent, target) as the stats panel shows them, or None if not shown."""
    m = EPSILON.search(screen)
    return (float(m.group(1)), float(m.group(2))) if m else None


def header(screen: str) -> str:
    """The header's first line: name, node id, ..., link."""
    return screen.splitlines()[0] if screen else ""


def shows_node(screen: str, name: str, node_id: str) -> bool:
    """Connected to the node ``name`` (id ``node_id``), with its round on show."""
    first = header(screen)
    return (first.split()[:2] == [name, node_id] and CONNECTED in first
            and screen_round(screen) is not None and screen_state(screen) not in (None, "-"))


def showing(term: Terminal, name: str, node_id: str) -> str | None:
    """The screen, if it shows the node (see ``shows_node``); else None."""
    screen = term.screen()
    return screen if shows_node(screen, name, node_id) else None


def tui_command(node: NodeProc) -> list[str]:
    token = (node.state_dir / "api.token").read_text().strip()
    return [sys.executable, "-m", "node.cli.main", "tui", f"http://127.0.0.1:{node.web_port}",
            "--token", token]


def wait_rounds_advance(term: Terminal, node: NodeProc, by: int, what: str) -> int:
    """Wait until the node's API round and the screen's round both pass the API round now
    plus ``by``; return the screen's round then."""
    target = node.status()["round"] + by
    wait_for(lambda: node.status()["round"] >= target, f"node round {target} ({what})",
             term, [node])
    return wait_for(lambda: (r := screen_round(term.screen())) is not None and r >= target
                    and r, f"round {target} on the screen ({what})", term, [node])


def test_tui_watches_and_steers_a_node(tmp_path, terminal):
    with Cluster(tmp_path) as cluster:
        node = cluster.start("watched", *TRAINING)
        node_id = node.status()["node_id"]
        terminal.run(tui_command(node))

        # name, node id, link and round on show; then the round moves on the screen
        screen = wait_for(lambda: showing(terminal, "watched", node_id),
                          "the node on the screen", terminal, [node])
        first = screen_round(screen)
        wait_for(lambda: (r := screen_round(terminal.screen())) is not None and r >= first + 2,
                 f"the screen's round to pass {first + 1}", terminal, [node])

        # x stops training: in the node, and on the screen
        terminal.press("x")
        wait_for(lambda: node.status()["state"] == "stopped", "state stopped (API)",
                 terminal, [node])
        wait_for(lambda: screen_state(terminal.screen()) == "stopped",
                 "state stopped on the screen", terminal, [node])
        wait_for(lambda: "stop sent, node state: stopped" in terminal.screen(),
                 "the stop command in the event log", terminal, [node])
        stopped_round = node.status()["round"]

        # s starts it again: the node leaves 'stopped' and completes rounds; the screen too
        terminal.press("s")
        wait_for(lambda: node.status()["state"] != "stopped", "training again (API)",
                 terminal, [node])
        wait_for(lambda: node.status()["round"] >= stopped_round + 2,
                 "rounds after the restart", terminal, [node])
        wait_for(lambda: screen_state(terminal.screen()) not in (None, "-", "stopped")
                 and (screen_round(terminal.last_screen) or 0) >= stopped_round + 2,
                 "training again on the screen", terminal, [node])

        # q quits the UI (exit status 0), not the node: it keeps training
        terminal.press("q")
        wait_for(terminal.dead, "the TUI to exit", terminal, [node])
        assert terminal.exit_status() == "0"
        assert node.proc.poll() is None, "q stopped the node"
        after_quit = node.status()
        assert after_quit["state"] != "stopped"
        wait_for(lambda: node.status()["round"] >= after_quit["round"] + 2,
                 "rounds after the TUI quit", terminal, [node])


def test_start_with_tui_stops_its_node_on_quit(tmp_path, terminal):
    state_dir = tmp_path / "solo"
    terminal.run([sys.executable, "-m", "node.cli.main", "start", "--name", "solo",
                  "--state-dir", str(state_dir), "--host", "127.0.0.1", "--port", "0",
                  "--web-port", "0", "--no-mdns", *TRAINING, "--tui"])
    log = state_dir / "node.log"

    def screen_ok() -> str | None:
        s = terminal.screen()
        first = header(s)
        return s if (first.split()[:1] == ["solo"] and CONNECTED in first
                     and screen_round(s) is not None) else None

    def node_log() -> str:
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no node.log)"

    try:
        wait_for(screen_ok, "the solo node on the screen", terminal)
        pid = json.loads((state_dir / "endpoint.json").read_text())["pid"]
        node = psutil.Process(pid)
        terminal.extra.append(node)  # stopped at the end even if the TUI leaves it behind
        assert "node.cli.main" in " ".join(node.cmdline()) and "--tui" not in node.cmdline()
        first = screen_round(terminal.last_screen)
        wait_for(lambda: (r := screen_round(terminal.screen())) is not None and r >= first + 2,
                 f"the screen's round to pass {first + 1}", terminal)

        terminal.press("q")
        try:
            node.wait(timeout=60)
        except psutil.TimeoutExpired:
            raise AssertionError("the node still runs 60 s after q") from None
        wait_for(terminal.dead, "the fl-node start --tui program to exit", terminal)
        assert terminal.exit_status() == "0"
        # the node was stopped gracefully (SIGTERM), not killed
        assert not (state_dir / "endpoint.json").exists()
        assert "node solo stopped" in log.read_text(errors="replace")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- node.log\n{node_log()}") from None


def test_tui_reconnects_to_a_restarted_node(tmp_path, terminal):
    with Cluster(tmp_path) as cluster:
        node = cluster.start("phoenix", *TRAINING)
        node_id = node.status()["node_id"]
        port = node.web_port
        terminal.run(tui_command(node))
        wait_for(lambda: showing(terminal, "phoenix", node_id),
                 "the node on the screen", terminal, [node])

        node.kill()
        wait_for(lambda: DISCONNECTED in header(terminal.screen()),
                 "the disconnected indicator", terminal, [node])
        assert "disconnected: " in terminal.last_screen  # and a line in the event log

        # the same node (state dir, key) on the same web port: the TUI finds it again
        again = cluster.start("phoenix", *TRAINING, "--web-port", str(port))
        assert again.web_port == port and again.status()["node_id"] == node_id
        wait_for(lambda: showing(terminal, "phoenix", node_id),
                 "the node on the screen again", terminal, [again])
        # and the live feed flows again: the screen follows the new process's rounds
        wait_rounds_advance(terminal, again, 2, "after the reconnect")
        assert not terminal.dead()


def test_tui_shows_the_privacy_budget_of_a_dp_node(tmp_path, terminal):
    """A node training with Opacus DP-SGD: the TUI shows the epsilon it has spent against
    its target, follows it as it grows, and shows the node's own figure once it stops."""
    with Cluster(tmp_path) as cluster:
        node = cluster.start("private", *TRAINING, "--dp", "--target-epsilon", "8")
        node_id = node.status()["node_id"]
        wait_for(lambda: (node.status().get("privacy") or {}).get("epsilon", 0) > 0,
                 "some epsilon spent", terminal, [node])
        terminal.run(tui_command(node))
        wait_for(lambda: showing(terminal, "private", node_id), "the node on the screen",
                 terminal, [node])
        first = wait_for(lambda: screen_epsilon(terminal.screen()),
                         "epsilon on the screen", terminal, [node])
        assert first[1] == 8.0 and 0 < first[0] < 8, first
        assert first[0] <= node.status()["privacy"]["epsilon"] + 0.005
        # it follows the node as training spends more
        wait_for(lambda: (e := screen_epsilon(terminal.screen())) is not None
                 and e[0] > first[0], "epsilon growing on the screen", terminal, [node])
        # stopped, the figure holds still: the screen shows exactly the node's own
        terminal.press("x")
        wait_for(lambda: node.status()["state"] == "stopped", "state stopped (API)",
                 terminal, [node])
        spent = node.status()["privacy"]["epsilon"]
        wait_for(lambda: screen_epsilon(terminal.screen()) == (round(spent, 2), 8.0),
                 f"epsilon {spent:.2f}/8.00 on the screen", terminal, [node])
        terminal.press("q")
        wait_for(terminal.dead, "the TUI to exit", terminal, [node])

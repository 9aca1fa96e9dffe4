"""Real `fl-node start` processes on 127.0.0.1 for end-to-end tests, always cleaned up."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from node.cli.demo import get_json, stop_processes, wait_endpoint
from protocol.identity import Identity

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]


def fixed_identity(state_dir: Path, label: str) -> Identity:
    """Give a node a deterministic key (written before it starts) so tests are repeatable."""
    state_dir.mkdir(parents=True, exist_ok=True)
    seed = hashlib.sha256(f"fl-node-test/{label}".encode()).digest()
    key = state_dir / "node.key"
    key.write_bytes(seed)
    key.chmod(0o600)
    return Identity.from_seed(seed)


def poll_until(pred: Callable[[], T], timeout: float, what: str, nodes=(),  # noqa: ANN001
               interval: float = 0.2, *,
               not_yet: tuple[type[Exception], ...] = (OSError, ValueError, KeyError),
               extra: Callable[[], str] | None = None,
               summary: Callable[[], str] | None = None) -> T:
    """Call ``pred`` until it returns something true, and return that; on timeout fail
    with ``extra()`` (a screen, say), the nodes' recent logs, and at the end again what was
    awaited with ``summary()`` (default: each node's state in one line).

    An exception in ``not_yet`` just means: not yet (by default a node that does not
    answer yet, OSError, or answers something incomplete, ValueError and KeyError)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except not_yet as exc:
            last = exc
        time.sleep(interval)
    logs = "\n".join(f"--- {n.name}\n{n.log[-3000:]}\n{_tail(n.state_dir / 'stderr.log')}"
                     for n in nodes)
    # The cause again at the end, with the state now: a CI report that shows only the
    # head and the tail of a long failure still says what was awaited and what was seen.
    now = summary() if summary else "\n".join(_one_line(n) for n in nodes)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({last!r})\n"
                         f"{extra() + chr(10) if extra else ''}{logs}\n"
                         f"=== timed out waiting for {what}; now:\n{now}")


def _one_line(node: Any) -> str:
    """A node's state in one line, for failure reports."""
    try:
        s = node.status()
    except Exception as exc:  # noqa: BLE001 (a dead or hung node is what we report)
        return f"{node.name}: no status ({type(exc).__name__}: {exc})"
    keys = ("state", "mode", "round", "evaluated_round", "quorum", "offline_steps", "role")
    fields = " ".join(f"{k}={s.get(k)}" for k in keys if k in s)
    peers = ",".join(f"{p.get('name')}:{p.get('state')}" for p in s.get("peers", []))
    return f"{node.name}: {fields} peers=[{peers}]"


def _tail(path: Path, size: int = 1500) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


@dataclass
class NodeProc:
    """One running node process."""

    name: str
    state_dir: Path
    proc: subprocess.Popen[bytes]
    endpoint: dict[str, Any]
    identity: Identity

    @property
    def peer_address(self) -> str:
        return f"127.0.0.1:{self.endpoint['peer_port']}"

    @property
    def web_port(self) -> int:
        return int(self.endpoint["web_port"])

    @property
    def log(self) -> str:
        path = self.state_dir / "node.log"
        return path.read_text() if path.exists() else ""

    def status(self) -> dict[str, Any]:
        return get_json(self.web_port, "/api/status")

    def metrics(self) -> list[dict[str, Any]]:
        return get_json(self.web_port, "/api/metrics")["rounds"]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@dataclass
class Cluster:
    """Starts nodes and stops every one of them at the end (use as a context manager)."""

    base: Path
    nodes: list[NodeProc] = field(default_factory=list)

    def start(self, name: str, *args: str, peers: list[NodeProc] = (),
              secret: str | None = "e2e test federation secret",
              env: dict[str, str] | None = None) -> NodeProc:
        sd = self.base / name
        ident = fixed_identity(sd, name)
        cmd = [sys.executable, "-m", "node.cli.main", "start", "--name", name, "--state-dir", str(sd),
               "--host", "127.0.0.1", "--port", "0", "--web-port", "0", "--no-mdns",
               "--log-file", str(sd / "node.log"), *args]
        for p in peers:
            cmd += ["--peer", p.peer_address]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if secret is not None:
            env["FL_NODE_FEDERATION_SECRET"] = secret
        # stderr goes to a file: a pipe nobody reads would fill up and block the node.
        with open(sd / "stderr.log", "ab") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=err)
        try:
            endpoint = wait_endpoint(sd, proc)
        except Exception:
            stop_processes([proc])
            tail = (sd / "stderr.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} did not start: {tail}") from None
        node = NodeProc(name, sd, proc, endpoint, ident)
        self.nodes.append(node)
        return node

    def start_on_port(self, name: str, port: int, *args: str, **kw: object) -> NodeProc:
        """Like ``start``, on a given peer port (for a node others already dial)."""
        return self.start(name, "--port", str(port), *args, **kw)  # the later --port wins

    def wait(self, pred, timeout: float = 120.0, what: str = "condition") -> None:
        poll_until(pred, timeout, what, self.nodes, interval=0.1)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_processes([n.proc for n in self.nodes])

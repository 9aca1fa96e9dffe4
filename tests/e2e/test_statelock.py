"""One node per state dir: a second `fl-node start` on a running node's dir is refused at
once (exit 2, one line naming the running node's PID) and leaves the node alone; after a
`kill -9` of that node the next start takes the lock over."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .cluster import REPO, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ARGS = ("--open", "--dataset", "synthetic", "--model", "mlp", "--rounds", "1000")


def start_command(state_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "node.cli.main", "start", "--name", "x", "--state-dir",
            str(state_dir), "--host", "127.0.0.1", "--port", "0", "--web-port", "0",
            "--no-mdns", *ARGS, *extra]


def refused_start(state_dir: Path, *extra: str) -> tuple[int, str, float]:
    """Run a start that should be refused: its exit code, its stderr and its duration."""
    env = {k: v for k, v in os.environ.items() if k != "FL_NODE_FEDERATION_SECRET"}
    began = time.monotonic()
    done = subprocess.run(start_command(state_dir, *extra), cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    return done.returncode, done.stderr, time.monotonic() - began


def test_a_second_start_is_refused_and_a_killed_nodes_lock_is_taken_over(tmp_path):
    with Cluster(tmp_path) as cluster:
        first = cluster.start("x", *ARGS, secret=None)
        lock_file = first.state_dir / "node.lock"
        assert lock_file.read_text() == f"{first.proc.pid}\n"
        message = (f"fl-node start: state dir {first.state_dir} is in use by a running node"
                   f" (PID {first.proc.pid}); stop it first or use another --state-dir")

        second_log = first.state_dir / "second.log"
        code, err, took = refused_start(first.state_dir, "--log-file", str(second_log))
        assert (code, err.splitlines()) == (2, [message])
        assert took < 20, f"the refusal took {took:.1f} s"
        assert not second_log.exists()  # refused before its logging started
        # `start --tui` says the same, from the parent, before it starts a node
        code, err, _ = refused_start(first.state_dir, "--tui")
        assert (code, err.splitlines()) == (2, [message])

        assert first.proc.poll() is None
        assert first.status()["node_id"] == first.identity.node_id
        assert lock_file.read_text() == f"{first.proc.pid}\n"

        first.kill()  # SIGKILL: no clean-up ran, the lock file still names it
        cluster.nodes.remove(first)
        assert lock_file.read_text() == f"{first.proc.pid}\n"
        again = cluster.start("x", *ARGS, secret=None)  # waits for its own endpoint file
        assert again.proc.pid != first.proc.pid
        assert again.endpoint["pid"] == again.proc.pid
        assert lock_file.read_text() == f"{again.proc.pid}\n"
        assert again.status()["node_id"] == first.identity.node_id

"""`fl-node demo`: finishes with a table, and Ctrl-C stops it cleanly with exit code 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .cluster import REPO

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _interruptible() -> None:
    """Give the demo Ctrl-C back: a shell without job control starts background commands
    (``.ci/run &``) with SIGINT ignored, and Python keeps an inherited SIG_IGN."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_runs_to_the_end_and_prints_a_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "node.cli.main", "demo", "--rounds", "3",
                           "--base-dir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "round 3/3 done" in out
    assert "round  accuracy" in out
    table = out[out.index("round  accuracy"):].splitlines()[1:4]
    assert [line.split()[0] for line in table] == ["1", "2", "3"]
    assert "all 3 nodes hold model" in out


def test_ctrl_c_stops_the_demo_and_its_nodes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "node.cli.main", "demo", "--rounds", "500",
                             "--base-dir", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_interruptible)
    try:
        pids: list[int] = []
        deadline = time.monotonic() + 120
        while len(pids) < 3 and time.monotonic() < deadline:
            pids = []
            for i in range(1, 4):
                ep = tmp_path / f"node-{i}" / "endpoint.json"
                if ep.exists():
                    pids.append(json.loads(ep.read_text())["pid"])
            time.sleep(0.2)
        assert len(pids) == 3, "nodes did not start"
        time.sleep(2)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the demo
        proc.wait(timeout=60)
        assert proc.returncode == 0, proc.stderr.read()
        assert not [p for p in pids if _alive(p)]
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

"""Crashes and restarts lose nothing: kill -9 cycles, and a clean stop/resume."""

from __future__ import annotations

import pytest

from node.runtime.checkpoints import NodeDB

from .cluster import Cluster
from .crashloop import crash_cycles

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_fifty_kill_9_cycles_resume_from_intact_checkpoints(tmp_path):
    report = crash_cycles(tmp_path, cycles=50, seed=1)
    assert report.cycles == 50
    assert not report.problems, report.problems
    assert sum(1 for seen, got in report.resumed if got > 0) >= 25  # real progress was kept
    # the witness never took the restarted node for a replayer
    bad = {k: v for k, v in report.witness_rejections.items()
           if "sequence" in k or "replay" in k or "stale" in k}
    assert not bad, report.witness_rejections


def test_a_stopped_node_resumes_where_it_stopped(tmp_path):
    args = ("--dataset", "digits", "--min-peers", "0")
    with Cluster(tmp_path) as cluster:
        node = cluster.start("solo", *args, "--rounds", "3")
        cluster.wait(lambda: node.status()["evaluated_round"] == 3, 120, "3 rounds")
        first = node.status()
        node.proc.terminate()
        node.proc.wait(30)
        cluster.nodes.remove(node)
        again = cluster.start("solo", *args, "--rounds", "5")
        cluster.wait(lambda: again.status()["evaluated_round"] == 5, 120, "5 rounds")
        second = again.status()
        history = again.metrics()
    assert second["resumed_from"] == 3
    assert second["node_id"] == first["node_id"]
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5]  # history survived the restart
    assert history[2]["model_hash"] == first["model_hash"]
    # events reached the database (written off the event loop, flushed at stop)
    db = NodeDB(again.state_dir)
    kinds = [e["kind"] for e in db.events()]
    db.close()
    assert kinds.count("done") == 2

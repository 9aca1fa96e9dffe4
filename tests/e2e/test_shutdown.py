"""A node stops cleanly on SIGINT and SIGTERM, also in the middle of training."""

from __future__ import annotations

import signal

import pytest

from .cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_node_gracefully(tmp_path, sig):
    with Cluster(tmp_path) as cluster:
        node = cluster.start("solo", "--min-peers", "0", "--rounds", "1000",
                            "--local-epochs", "20")
        cluster.wait(lambda: node.status()["state"] == "training", 60, "training")
        node.proc.send_signal(sig)
        code = node.proc.wait(timeout=30)
        log = node.log
    assert code == 0
    assert "node solo stopped" in log
    assert "Traceback" not in log
    # the graceful path ran: the endpoint file is removed, the key kept with mode 0600
    assert not (node.state_dir / "endpoint.json").exists()
    assert (node.state_dir / "node.key").stat().st_mode & 0o777 == 0o600

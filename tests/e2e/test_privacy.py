"""Differential privacy on real nodes: one lifetime budget per node, kept across restarts,
and training stops when the next round would exceed it."""

from __future__ import annotations

import json

import pytest

from ml.privacy import PrivacyLedger

from .cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DP = ("--dataset", "digits", "--model", "mlp", "--local-epochs", "1", "--min-peers", "0",
      "--dp", "--noise-multiplier", "1.5")


def test_epsilon_continues_across_a_restart(tmp_path):
    with Cluster(tmp_path) as cluster:
        node = cluster.start("private", *DP, "--rounds", "6")
        cluster.wait(lambda: node.status()["round"] >= 2, 120, "two DP rounds")
        node.proc.terminate()  # SIGTERM: a normal stop
        node.proc.wait(timeout=60)
        ledger = PrivacyLedger.load(node.state_dir / "privacy.json")
        before = ledger.epsilon(1e-5)
        steps_before = ledger.total_steps
        assert before > 0
        again = cluster.start("private", *DP, "--rounds", "6")
        first = again.status()["privacy"]
        cluster.wait(lambda: again.status()["state"] == "done", 180, "the run to finish")
        final = again.status()["privacy"]
    # the restarted node started from the spent budget, not from zero ...
    assert first["epsilon"] >= before - 1e-9 and first["total_steps"] >= steps_before
    # ... and ended above it: one ledger for the node's whole life
    assert final["epsilon"] > before and final["total_steps"] > steps_before
    saved = json.loads((again.state_dir / "privacy.json").read_text())
    assert sum(entry[2] for entry in saved["history"]) == final["total_steps"]


def test_training_stops_before_the_budget_is_exceeded(tmp_path):
    with Cluster(tmp_path) as cluster:
        node = cluster.start("budget", *DP, "--target-epsilon", "1.2", "--rounds", "50")
        cluster.wait(lambda: node.status()["state"] == "stopped", 180, "the budget to stop it")
        status = node.status()
        rounds = status["round"]
        log = node.log
    privacy = status["privacy"]
    assert privacy["exhausted"] and privacy["epsilon"] <= 1.2
    assert "privacy budget" in status["stopped_reason"]
    assert rounds == 5  # epsilon 1.15 after 5 rounds; a 6th would reach 1.25
    assert "training stopped: privacy budget" in log

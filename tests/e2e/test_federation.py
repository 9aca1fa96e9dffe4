"""Three real `fl-node start` processes on 127.0.0.1 training digits together."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from protocol.election import elect

from .cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

COMMON = ["--dataset", "digits", "--num-partitions", "3", "--wait-peers", "2"]


def start_three(cluster: Cluster, rounds: int, *extra: str):
    a = cluster.start("alpha", *COMMON, "--partition-index", "0", "--rounds", str(rounds), *extra)
    b = cluster.start("bravo", *COMMON, "--partition-index", "1", "--rounds", str(rounds), *extra,
                      peers=[a])
    c = cluster.start("charlie", *COMMON, "--partition-index", "2", "--rounds", str(rounds),
                      *extra, peers=[a, b])
    return a, b, c


def test_three_nodes_train_digits_to_one_model(tmp_path):
    with Cluster(tmp_path) as cluster:
        nodes = start_three(cluster, 5)
        cluster.wait(lambda: all(n.status()["evaluated_round"] == 5 for n in nodes), 180,
                     "all nodes done")
        statuses = [n.status() for n in nodes]
        history = nodes[0].metrics()
        url = f"http://127.0.0.1:{nodes[0].web_port}"
        human = subprocess.run([sys.executable, "-m", "node.cli.main", "status", url],
                               capture_output=True, text=True, timeout=60)
        as_json = subprocess.run([sys.executable, "-m", "node.cli.main", "status", url, "--json"],
                                 capture_output=True, text=True, timeout=60)
    assert human.returncode == 0 and "state done  round 5/5" in human.stdout, human
    assert "bravo" in human.stdout and "charlie" in human.stdout
    assert json.loads(as_json.stdout)["model_hash"] == statuses[0]["model_hash"]
    assert [s["round"] for s in statuses] == [5, 5, 5]
    assert len({s["model_hash"] for s in statuses}) == 1
    assert all(s["accuracy"] >= 0.90 for s in statuses), [s["accuracy"] for s in statuses]
    aggregators = [r["aggregator"] for r in history]
    assert len(aggregators) == 5 and len(set(aggregators)) > 1, aggregators
    assert {p["node_id"] for p in statuses[0]["peers"]} == {statuses[1]["node_id"],
                                                             statuses[2]["node_id"]}
    # every round's model came from the node the election names for it
    keys = {n.identity.node_id: n.identity.public_key for n in nodes}
    for r in history:
        assert keys[r["aggregator"]] == elect("default", r["round"], keys.values())


def test_killing_the_aggregator_mid_round_survivors_finish(tmp_path):
    rounds, victim_round = 6, 3
    with Cluster(tmp_path) as cluster:
        nodes = start_three(cluster, rounds, "--local-epochs", "6")
        keys = {n.identity.public_key: n for n in nodes}
        victim = keys[elect("default", victim_round, keys)]
        # kill it while it is working on its round: training or collecting updates
        cluster.wait(lambda: (s := victim.status())["current_round"] == victim_round
                     and s["state"] in ("training", "collecting"), 120, "victim's round")
        victim.kill()
        survivors = [n for n in nodes if n is not victim]
        cluster.wait(lambda: all(n.status()["evaluated_round"] == rounds for n in survivors),
                     180, "survivors done")
        statuses = [n.status() for n in survivors]
        history = survivors[0].metrics()
        logs = [n.log for n in survivors]
    assert [s["round"] for s in statuses] == [rounds, rounds]
    assert statuses[0]["model_hash"] == statuses[1]["model_hash"]
    by_round = {r["round"]: r for r in history}
    assert by_round[victim_round]["aggregator"] != victim.identity.node_id
    assert set(by_round) == set(range(1, rounds + 1))
    assert any("link down" in log for log in logs)

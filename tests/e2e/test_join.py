"""A lone node below quorum trains on by itself (offline), then joins the others: its
offline model is merged into the first elected round; one model, all contributing."""

from __future__ import annotations

import socket

import pytest

from .cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_lone_node_trains_alone_then_joins_and_converges(tmp_path):
    port = free_port()
    common = ("--dataset", "digits", "--num-partitions", "3", "--rounds", "100000")
    with Cluster(tmp_path) as cluster:
        # c knows a's address, but a is not up yet: c is below its quorum of 2 and keeps
        # training offline
        lone = cluster.start("charlie", *common, "--partition-index", "2", "--min-peers", "1",
                             "--start-timeout", "1", "--peer", f"127.0.0.1:{port}")
        cluster.wait(lambda: lone.status()["offline_steps"] >= 2, 120, "offline steps")
        solo = lone.status()
        alone = lone.metrics()
        # now the others come up, alpha on the port charlie has been dialling
        a = cluster.start_on_port("alpha", port, *common, "--partition-index", "0",
                                  "--min-peers", "1")
        b = cluster.start("bravo", *common, "--partition-index", "1", "--min-peers", "1",
                          peers=[a])
        nodes = [lone, a, b]
        joint: dict[str, int] = {}

        def all_three_contributed() -> bool:
            rows = [r for r in lone.metrics() if r["contributors"] == 3]
            if rows:
                joint["round"] = rows[0]["round"]  # the first round trained together
            return bool(rows)

        cluster.wait(all_three_contributed, 180, "a round with all three")
        r = joint["round"]
        cluster.wait(lambda: all(n.status()["evaluated_round"] >= r for n in nodes), 120,
                     f"round {r} everywhere")
        rows = [{x["round"]: x for x in n.metrics()}.get(r) for n in nodes]
    # it trained alone first, offline: no global round, a model of its own, said in status
    assert solo["mode"] == "offline" and solo["state"] == "offline" and alone == []
    assert solo["quorum"] == {"need": 2, "have": 1} and solo["round"] == 0
    assert solo["model_hash"] != solo["global_model_hash"]
    assert None not in rows  # every node applied that round's model ...
    assert len({x["model_hash"] for x in rows}) == 1  # ... the same one
    assert rows[0]["contributors"] == 3  # to which all three contributed

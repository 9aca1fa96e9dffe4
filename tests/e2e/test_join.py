"""Joining a running federation: a lone node below quorum trains on by itself (offline),
then joins the others (its offline model is merged into the first elected round); and a
fourth node started with --peer to one of three members that are training joins without
stalling any round (issue 12, point 7; docs/protocol.md 9.1, 9.2)."""

from __future__ import annotations

import math
import socket

import pytest

from node.cli.demo import get_json

from .cluster import Cluster, NodeProc

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


#: --round-timeout of the federation below: a round that waited for a deadline would show
#: seconds to tens of seconds (the collect deadline's floor is 5 s, the model deadline 90 s)
#: and a deadline event.
ROUND_TIMEOUT = 60
#: A round of digits here takes well under a second; this leaves room for a loaded machine.
QUICK_S = 10.0
#: Rounds delta must have contributed to before the run is judged.
CONTRIBUTED = 5


def events(node: NodeProc) -> list[dict]:
    return get_json(node.web_port, "/api/events?limit=1000")["events"]


def test_a_fourth_node_joins_a_running_federation_and_no_round_stalls(tmp_path):
    common = ("--dataset", "digits", "--num-partitions", "4", "--rounds", "100000",
              "--round-timeout", str(ROUND_TIMEOUT), "--min-peers", "1")
    with Cluster(tmp_path) as cluster:
        a = cluster.start("alpha", *common, "--wait-peers", "2", "--partition-index", "0")
        b = cluster.start("bravo", *common, "--wait-peers", "2", "--partition-index", "1",
                          peers=[a])
        c = cluster.start("charlie", *common, "--wait-peers", "2", "--partition-index", "2",
                          peers=[a, b])
        three = [a, b, c]
        cluster.wait(lambda: all(n.status()["round"] >= 3 for n in three), 60,
                     "three rounds of the three")
        # the fourth knows one member's address only and learns the others by gossip
        d = cluster.start("delta", *common, "--partition-index", "3", peers=[a])
        joined = a.status()["round"]  # the federation's round when delta was up

        def delta_contributed() -> bool:
            rows = [r for r in a.metrics() if r["round"] > joined and r["contributors"] == 4]
            return len(rows) >= CONTRIBUTED

        cluster.wait(delta_contributed, 60, f"{CONTRIBUTED} rounds with delta's update")
        nodes = [*three, d]
        last = min(n.status()["evaluated_round"] for n in nodes)
        history = {n.name: {r["round"]: r for r in n.metrics()} for n in nodes}
        logs = {n.name: events(n) for n in nodes}
        texts = {n.name: n.log for n in nodes}
    rows = history["alpha"]
    # no round waited for a deadline: no collect or model deadline fired anywhere, no
    # node sat a round out until its deadline, and every round since the join was quick
    fired = [(name, e["kind"], e["detail"]) for name, es in logs.items() for e in es
             if "deadline" in e["detail"] or e["kind"] == "join_timeout"]
    assert fired == []
    commits = [rows[r]["committed_at"] for r in range(joined, last + 1)]
    gaps = [later - earlier for earlier, later in zip(commits, commits[1:], strict=False)]
    assert max(gaps) < QUICK_S, gaps
    # delta applied the federation's models from its catch-up on, and contributed
    mine = history["delta"]
    assert min(mine) <= joined + 3 and max(mine) >= last
    assert all(mine[r]["model_hash"] == rows[r]["model_hash"] for r in mine)
    # it did not train the rounds it missed (the catch-up model cut that training short:
    # it logged "round 1: trained ... (loss nan)"); it sat them out and caught up
    assert any(e["kind"] == "joining" for e in logs["delta"])
    assert "round 1: trained" not in texts["delta"]
    # no node had a NaN loss, in its log or its records
    assert [name for name, text in texts.items() if "nan)" in text.lower()] == []
    assert all(math.isfinite(r["loss"]) for h in history.values() for r in h.values())

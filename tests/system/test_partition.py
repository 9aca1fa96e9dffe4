"""Four namespace hosts split 2+2 for several rounds with a quorum of 3: neither side has
a quorum, so both keep training offline (local steps, gossip averaging with the node on
their side); after healing, the first elected round merges both sides and every node holds
one model hash within two rounds, no less accurate than before."""

from __future__ import annotations

import pytest

from tests.system.fleet import start_node, wait
from tests.system.netns import Hosts, require_root_and_tools

pytestmark = [pytest.mark.slow, pytest.mark.system]

SIDES = (("a", "b"), ("c", "d"))


def test_a_2_plus_2_partition_trains_on_both_sides_and_heals(tmp_path):
    require_root_and_tools()
    with Hosts(("a", "b", "c", "d")) as hosts:
        nodes = [start_node(hosts, h, tmp_path, "--num-partitions", "4", "--partition-index",
                            str(i), "--wait-peers", "3", "--min-peers", "2",
                            "--rounds", "100000", "--start-timeout", "120")
                 for i, h in enumerate("abcd")]
        wait(lambda: all(n.status()["evaluated_round"] >= 3 for n in nodes), 180,
             "3 rounds together", nodes)
        before = [n.status() for n in nodes]
        for x in SIDES[0]:
            for y in SIDES[1]:
                hosts.block(x, y)
        wait(lambda: all(n.status()["mode"] == "offline" for n in nodes), 120,
             "every node offline", nodes)
        split = [n.status() for n in nodes]
        wait(lambda: all(n.status()["offline_steps"] >= s["offline_steps"] + 3
                         for n, s in zip(nodes, split, strict=True)), 240, "3 offline steps on both sides",
             nodes)
        during = [n.status() for n in nodes]
        for x in SIDES[0]:
            for y in SIDES[1]:
                hosts.unblock(x, y)
        healed = max(s["round"] for s in during)
        wait(lambda: all(n.status()["evaluated_round"] >= healed + 2 for n in nodes), 240,
             "2 rounds after healing", nodes)
        target = healed + 2
        metrics = [{r["round"]: r for r in n.metrics()} for n in nodes]
        after = [n.status() for n in nodes]
    # both sides kept training offline: no global round, each node's model moved on
    for s, d in zip(split, during, strict=True):
        assert d["mode"] == "offline" and d["quorum"] == {"need": 3, "have": 2}
        assert d["round"] == s["round"] and d["model_hash"] != s["model_hash"]
        assert len(d["members"]) == 2
    # the first elected round after healing merged the offline models of both sides
    assert all(m[healed + 1]["contributors"] >= 3 for m in metrics)  # both sides in it
    # two rounds after healing: one model everywhere, at least as accurate as before
    hashes = {m[target]["model_hash"] for m in metrics}
    assert len(hashes) == 1, [m[target] for m in metrics]
    assert min(s["accuracy"] for s in after) >= min(s["accuracy"] for s in before) - 0.01

"""Four namespace hosts split 2+2 for several rounds: both sides keep training; after
healing, every node holds one model hash within two rounds, no less accurate than before."""

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
                            str(i), "--min-peers", "3", "--rounds", "100000",
                            "--start-timeout", "120")
                 for i, h in enumerate("abcd")]
        wait(lambda: all(n.status()["evaluated_round"] >= 3 for n in nodes), 180,
             "3 rounds together", nodes)
        before = [n.status() for n in nodes]
        for x in SIDES[0]:
            for y in SIDES[1]:
                hosts.block(x, y)
        split = [n.status()["round"] for n in nodes]
        wait(lambda: all(n.status()["round"] >= s + 4 for n, s in zip(nodes, split)), 240,
             "4 more rounds on both sides", nodes)
        k = max(split) + 2  # a round every node trained during the partition
        during = [{r["round"]: r for r in n.metrics()}.get(k) for n in nodes]
        for x in SIDES[0]:
            for y in SIDES[1]:
                hosts.unblock(x, y)
        healed = max(n.status()["round"] for n in nodes)
        wait(lambda: all(n.status()["evaluated_round"] >= healed + 2 for n in nodes), 240,
             "2 rounds after healing", nodes)
        target = healed + 2
        rows = [{r["round"]: r for r in n.metrics()}.get(target) for n in nodes]
        after = [n.status() for n in nodes]
    # both sides kept training, each side on its own model
    assert None not in during
    assert during[0]["model_hash"] == during[1]["model_hash"]
    assert during[2]["model_hash"] == during[3]["model_hash"]
    assert during[0]["model_hash"] != during[2]["model_hash"]
    assert during[0]["contributors"] == 2 and during[2]["contributors"] == 2
    # two rounds after healing: one model everywhere, at least as accurate as before
    hashes = {r["model_hash"] for r in rows if r is not None}
    assert len(hashes) == 1, rows
    assert min(s["accuracy"] for s in after) >= min(s["accuracy"] for s in before) - 0.01

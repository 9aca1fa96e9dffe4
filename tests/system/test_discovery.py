"""Three namespace hosts, no --peer anywhere: mDNS discovery, admission by a federation
secret, training to one model; Avahi sees the advertised services. And a line topology
A-B-C where A and C cannot reach each other: gossip and relays still give one model."""

from __future__ import annotations

import pytest

from tests.system.avahi import Avahi
from tests.system.fleet import PEER_PORT, start_node, wait
from tests.system.netns import Hosts, require_root_and_tools

pytestmark = [pytest.mark.slow, pytest.mark.system]

COMMON = ("--num-partitions", "3", "--wait-peers", "2", "--start-timeout", "120")


def test_three_hosts_find_each_other_by_mdns_and_train(tmp_path):
    require_root_and_tools("avahi-daemon", "avahi-browse", "dbus-daemon")
    with Hosts(("a", "b", "c")) as hosts:
        # the default: mDNS on every interface (of each namespace host)
        nodes = [start_node(hosts, h, tmp_path, *COMMON, "--partition-index", str(i),
                            "--rounds", "3", mdns_interface=False)
                 for i, h in enumerate(("a", "b", "c"))]
        with Avahi(hosts, "a") as avahi:
            wait(lambda: len(avahi.browse(timeout=5)) >= 3, 60, "avahi sees 3 services", nodes)
            services = avahi.browse(timeout=5)
        wait(lambda: all(n.status()["evaluated_round"] == 3 for n in nodes), 240,
             "3 rounds on every host", nodes)
        statuses = [n.status() for n in nodes]
    assert len({s["model_hash"] for s in statuses}) == 1
    for s in statuses:
        peers = {p["node_id"]: p for p in s["peers"]}
        others = {t["node_id"] for t in statuses if t is not s}
        assert others <= set(peers)
        for nid in others:
            assert peers[nid]["trusted"] and peers[nid]["trust"] == "federation-secret"
            assert peers[nid]["state"] == "connected" and peers[nid]["discovered"]
    # an independent mDNS client lists the three services with the documented TXT records
    by_id = {svc["txt"]["id"]: svc for svc in services if svc["txt"].get("id")}
    assert set(by_id) == {s["node_id"] for s in statuses}
    for s in statuses:
        svc = by_id[s["node_id"]]
        assert svc["port"] == PEER_PORT
        assert svc["txt"]["fed"] == "default" and svc["txt"]["v"] == "1"
        assert svc["txt"]["name"] == s["name"] and svc["txt"]["port"] == str(PEER_PORT)
        assert len(svc["txt"]["key"]) == 43


def test_a_line_a_b_c_completes_with_one_model_per_round(tmp_path):
    require_root_and_tools()
    with Hosts(("a", "b", "c")) as hosts:
        hosts.block("a", "c")
        nodes = [start_node(hosts, h, tmp_path, *COMMON, "--partition-index", str(i),
                            "--rounds", "4", "--announce-interval", "1")
                 for i, h in enumerate(("a", "b", "c"))]
        wait(lambda: all(n.status()["evaluated_round"] == 4 for n in nodes), 300,
             "4 rounds on every host", nodes)
        statuses = [n.status() for n in nodes]
        histories = [n.metrics() for n in nodes]
    a, b, c = statuses
    # a and c never linked: each sees the other as a relayed member
    pa = {p["node_id"]: p for p in a["peers"]}
    assert pa[c["node_id"]]["state"] in ("relayed", "suspect")
    assert pa[b["node_id"]]["state"] == "connected"
    # the same model hash on every node for every round
    for r in range(4):
        assert len({h[r]["model_hash"] for h in histories}) == 1, r
        assert histories[0][r]["contributors"] == 3

"""Pairing on namespace hosts with mDNS and no shared secret: the paired pair trains, a
node that discovered them but was never paired shows as untrusted and gets nothing, and
an impostor announcing a paired node's id and key from another address is refused."""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap

import pytest

from tests.e2e.cluster import REPO
from tests.system.fleet import start_node, wait
from tests.system.netns import Hosts, require_root_and_tools

pytestmark = [pytest.mark.slow, pytest.mark.system]

IMPOSTOR = textwrap.dedent("""
    import socket, sys, time
    from zeroconf import IPVersion, ServiceInfo, Zeroconf
    ip, port, node_id, key, name = sys.argv[1:6]
    zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    zc.register_service(ServiceInfo(
        "_fl-node._tcp.local.", f"{name}-fake._fl-node._tcp.local.",
        addresses=[socket.inet_aton(ip)], port=int(port),
        properties={"id": node_id, "key": key, "fed": "default", "v": "1", "port": port,
                    "name": name}, server="fake.local."))
    print("registered", flush=True)
    time.sleep(600)
""")


def cli(hosts: Hosts, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    return hosts.run(host, [sys.executable, "-m", "node.cli.main", *args], cwd=REPO, timeout=60)


def test_paired_nodes_train_and_strangers_and_impostors_get_nothing(tmp_path):
    require_root_and_tools()
    with Hosts(("a", "b", "c")) as hosts:
        common = ("--rounds", "3", "--wait-peers", "1", "--start-timeout", "600")
        a = start_node(hosts, "a", tmp_path, *common, secret=None)
        b = start_node(hosts, "b", tmp_path, *common, secret=None)
        c = start_node(hosts, "c", tmp_path, "--wait-peers", "5", "--start-timeout", "600",
                       secret=None)
        nodes = [a, b, c]
        wait(lambda: all(n.status()["node_id"] for n in nodes), 60, "started", nodes)
        code = cli(hosts, "a", "pair", "--state-dir", str(a.state_dir))
        assert code.returncode == 0, code.stderr
        uri = next(x for x in code.stdout.splitlines() if x.startswith("fl-node://"))
        added = cli(hosts, "b", "pair", "add", uri, "--state-dir", str(b.state_dir))
        assert added.returncode == 0, added.stderr
        wait(lambda: all(n.status()["evaluated_round"] == 3 for n in (a, b)), 240,
             "the paired nodes train", nodes)
        sa, sc = a.status(), c.status()
        # an impostor on host c announces a's id and key, but at c's address
        key = base64.urlsafe_b64encode(_key_of(a)).rstrip(b"=").decode()
        hosts.popen("c", [sys.executable, "-c", IMPOSTOR, hosts.ip("c"), "7700",
                          sa["node_id"], key, "alpha-twin"], cwd=REPO,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: "dropped as an impostor" in b.log, 60, "b refuses the impostor", nodes)
        sb = b.status()
    peers_a = {p["node_id"]: p for p in sa["peers"]}
    assert peers_a[sb["node_id"]]["trust"] == "paired"
    stranger = peers_a[sc["node_id"]]
    assert stranger["trusted"] is False and stranger["discovered"] is True
    assert sc["round"] == 0 and not any(p["trusted"] for p in sc["peers"])
    # b still trains with the real a only
    peers_b = {p["node_id"]: p for p in sb["peers"]}
    assert peers_b[sa["node_id"]]["state"] == "connected"
    assert peers_b[sa["node_id"]]["address"].startswith(hosts.ip("a"))


def _key_of(node) -> bytes:  # noqa: ANN001
    from node.common.state import load_or_create_identity

    return load_or_create_identity(node.state_dir).public_key

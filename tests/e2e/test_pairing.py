"""Pairing on 127.0.0.1: two nodes with no shared secret pair through the URI printed by
`fl-node pair` and train together; a third, never paired, gets nothing and shows as
untrusted; reused and expired codes and an impostor key are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .cluster import REPO, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_pairing_admits_exactly_the_paired_node(tmp_path):
    with Cluster(tmp_path) as cluster:
        common = ("--rounds", "3", "--wait-peers", "1", "--start-timeout", "600")
        a = cluster.start("alpha", *common, secret=None)
        b = cluster.start("bravo", *common, secret=None)
        stranger = cluster.start("charlie", "--wait-peers", "5", "--start-timeout", "600",
                                 peers=[a, b], secret=None)
        png = tmp_path / "code.png"
        shown = cli("pair", "--state-dir", str(a.state_dir), "--png", str(png))
        assert shown.returncode == 0, shown.stderr
        uri = next(line for line in shown.stdout.splitlines() if line.startswith("fl-node://"))
        assert "▀" in shown.stdout or "█" in shown.stdout  # the QR code, as text
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        added = cli("pair", "add", uri, "--state-dir", str(b.state_dir))
        assert added.returncode == 0, added.stderr
        assert f"paired with alpha ({a.identity.node_id})" in added.stdout

        cluster.wait(lambda: all(n.status()["evaluated_round"] == 3 for n in (a, b)), 180,
                     "the paired nodes train")
        sa, sb, sc = a.status(), b.status(), stranger.status()

        # the same code again (from the stranger): already used
        reused = cli("pair", "add", uri, "--state-dir", str(stranger.state_dir))
        # a code that has expired
        short = json.loads(cli("pair", "--state-dir", str(a.state_dir), "--ttl", "1",
                               "--json").stdout)
        time.sleep(2.5)
        expired = cli("pair", "add", short["uri"], "--state-dir", str(stranger.state_dir))
        listed = cli("pair", "list", "--state-dir", str(b.state_dir), "--json")
    assert sa["model_hash"] == sb["model_hash"]
    peers_a = {p["node_id"]: p for p in sa["peers"]}
    assert peers_a[b.identity.node_id]["trusted"] and peers_a[b.identity.node_id]["trust"] == "paired"
    assert peers_a[stranger.identity.node_id]["trusted"] is False
    assert peers_a[stranger.identity.node_id]["state"] == "untrusted"
    # the stranger got no model traffic: it is still at round 0 and trusts no one
    assert sc["round"] == 0 and not any(p["trusted"] for p in sc["peers"])
    assert reused.returncode == 1 and "pairing token already used" in reused.stderr
    assert expired.returncode == 1 and "pairing code expired" in expired.stderr
    assert [p["node_id"] for p in json.loads(listed.stdout)] == [a.identity.node_id]
    # the pairing survives a restart: it is in the trust store on disk
    offline = cli("pair", "list", "--state-dir", str(b.state_dir))
    assert a.identity.node_id in offline.stdout


def test_a_peer_answering_with_another_key_is_dropped_as_an_impostor(tmp_path):
    with Cluster(tmp_path) as cluster:
        real = cluster.start("real", "--wait-peers", "5", "--start-timeout", "600")
        impostor = cluster.start("impostor", "--wait-peers", "5", "--start-timeout", "600")
        # dial the impostor's address while expecting the real node's id
        victim = cluster.start("victim", "--wait-peers", "5", "--start-timeout", "600",
                               "--peer", f"{real.identity.node_id}@{impostor.peer_address}")
        cluster.wait(lambda: "impostor" in victim.log, 60, "the impostor check")
        status = victim.status()
    assert "dropped as an impostor" in victim.log
    assert not any(p["state"] == "connected" for p in status["peers"])

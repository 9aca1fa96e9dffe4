"""Strangers cannot grow a node (issue 12, bounded state): 2,000 handshakes with fresh
keys, half of them in 1,000 other federations, against a real `fl-node start` process.
The node keeps at most MAX_STRANGERS records, counts rejections by a fixed set of kinds,
its status stays small and its memory flat, and it trains on meanwhile."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import psutil
import pytest

from node.common.wsclose import CLOSE_GRACE
from node.peers.channel import open_dialer
from node.peers.membership import MAX_STRANGERS
from node.peers.peerstats import REJECT_KINDS
from node.peers.transport import LINK_PATH
from protocol.envelope import encode
from protocol.identity import Identity
from protocol.messages import Hello

from .cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

STRANGERS = 2000
#: Rounds of STRANGERS handshakes measured after a warm-up round. Before issue 12's fix
#: each handshake kept about 11 KB (23 MB per 2,000); RSS_BOUND allows 3 KB each, far
#: above the noise of a training node (-6 to +4 MB settled) and far below that leak.
MEASURED_ROUNDS = 2
RSS_BOUND = MEASURED_ROUNDS * STRANGERS * 3072
#: Concurrent handshakes, within the node's limit of pending connections per address.
BATCH = 12


async def knock(port: int, genesis: bytes, federation: str) -> None:
    """A full handshake from a fresh key that proves no federation secret."""
    ident = Identity.generate()
    ts = time.time_ns() // 1_000_000

    def frame(seq: int, message: Hello) -> bytes:
        return bytes(encode(ident, message, seq=seq, ts_ms=ts, federation=federation))

    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{port}{LINK_PATH}") as ws:
            channel = await open_dialer(ws)
            await channel.receive_frame()  # the node's hello
            await channel.send(frame(1, Hello("stranger", channel.ours, channel.theirs, 1,
                                              genesis, 0)))
            await ws.receive()  # closed: another federation, or not trusted


async def knock_all(port: int, genesis: bytes) -> None:
    for start in range(0, STRANGERS, BATCH):
        await asyncio.gather(*(
            knock(port, genesis, "default" if i % 2 else f"federation-{i % 1000}")
            for i in range(start, start + BATCH)))


def test_thousands_of_strangers_leave_the_node_small(tmp_path):
    with Cluster(tmp_path) as cluster:
        node = cluster.start("n", "--dataset", "digits", "--rounds", "1000",
                             "--local-epochs", "1")
        status = node.status()
        genesis = bytes.fromhex(status["genesis_hash"])
        proc = psutil.Process(node.proc.pid)
        asyncio.run(knock_all(node.endpoint["peer_port"], genesis))  # warm-up round
        before, round_before = _settled_rss(proc), node.status()["round"]
        for _ in range(MEASURED_ROUNDS):
            asyncio.run(knock_all(node.endpoint["peer_port"], genesis))
        grown = _settled_rss(proc) - before
        status = node.status()
    size = len(json.dumps(status))
    strangers = [p for p in status["peers"] if p["state"] == "untrusted"]
    reasons = status["traffic"]["rejected_reasons"]
    assert status["round"] > round_before  # it kept training meanwhile
    assert len(strangers) == MAX_STRANGERS, len(strangers)
    assert size < 64 * 1024, size
    assert len(reasons) <= 50 and set(reasons) <= set(REJECT_KINDS), reasons
    assert reasons.get("federation", 0) >= STRANGERS  # both rounds' other federations
    assert len(status["traffic"]["recent_rejections"]) <= 20
    handshakes = MEASURED_ROUNDS * STRANGERS
    print(f"RSS grew by {grown / 1e6:.1f} MB over {handshakes} handshakes")
    assert grown < RSS_BOUND, f"RSS grew by {grown / 1e6:.1f} MB over {handshakes} handshakes"


def _settled_rss(proc: psutil.Process) -> int:
    """The node's RSS once the last connections are gone: a closing link gives its peer
    CLOSE_GRACE (2 s) to answer and the connection guard sweeps every 0.5 s; then the
    least of five samples, since the node trains meanwhile and a training step's
    tensors come and go (one sample under load read 12.9 MB for what settles at 1-4)."""
    time.sleep(CLOSE_GRACE + 1.0)
    samples = []
    for _ in range(5):
        samples.append(proc.memory_info().rss)
        time.sleep(0.5)
    return min(samples)


def _open_sockets(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    return socks


def _is_closed(s: socket.socket) -> bool:
    """Whether the node closed ``s`` (end of stream or a reset), without blocking."""
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_idle_connections_are_closed_and_rounds_go_on(tmp_path):
    with Cluster(tmp_path) as cluster:
        common = ("--dataset", "digits", "--rounds", "1000", "--local-epochs", "1",
                  "--min-peers", "1")
        a = cluster.start("a", *common)
        b = cluster.start("b", *common, peers=[a])
        cluster.wait(lambda: a.status()["round"] >= 2, 120, "first rounds")
        socks = (_open_sockets(a.endpoint["peer_port"], 300)
                 + _open_sockets(a.web_port, 100))
        try:
            round_before = a.status()["round"]
            started = time.monotonic()
            open_ = socks
            while open_ and time.monotonic() - started < 30:
                time.sleep(0.5)
                open_ = [s for s in open_ if not _is_closed(s)]
            took = time.monotonic() - started
            status = a.status()
        finally:
            for s in socks:
                s.close()
        cluster.wait(lambda: a.status()["round"] >= status["round"] + 2, 60,
                     "rounds after the flood")
        linked = [p for p in b.status()["peers"] if p["state"] == "connected"]
    print(f"400 idle connections closed in {took:.1f} s; rounds {round_before} ->"
          f" {status['round']} meanwhile")
    assert not open_, f"{len(open_)} of 400 idle connections still open after {took:.0f} s"
    assert status["round"] > round_before, "no round completed while the sockets were open"
    assert len(linked) == 1

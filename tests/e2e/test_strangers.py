"""Strangers cannot grow a node (issue 12, bounded state): 2,000 handshakes with fresh
keys, half of them in 1,000 other federations, against a real `fl-node start` process.
The node keeps at most MAX_STRANGERS records, counts rejections by a fixed set of kinds,
its status stays small and its memory flat, and it trains on meanwhile."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import msgpack
import psutil
import pytest

from node.peers.membership import MAX_STRANGERS
from node.peers.peerstats import REJECT_KINDS
from protocol.envelope import encode
from protocol.identity import Identity
from protocol.messages import Hello

from .cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

STRANGERS = 2000
BATCH = 25


async def knock(port: int, genesis: bytes, federation: str) -> None:
    """A full three-hello handshake from a fresh key that proves no federation secret."""
    ident = Identity.generate()
    ts = time.time_ns() // 1_000_000

    def frame(seq: int, message: Hello) -> bytes:
        return bytes(encode(ident, message, seq=seq, ts_ms=ts, federation=federation))

    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{port}/fl/v1/link") as ws:
            await ws.send_bytes(frame(1, Hello("stranger", b"n" * 16, b"", 1, genesis, 0)))
            reply = await ws.receive()
            if reply.type != aiohttp.WSMsgType.BINARY:
                return  # refused at the first hello (another federation)
            nonce = msgpack.unpackb(msgpack.unpackb(reply.data)[0])["body"]["nonce"]
            await ws.send_bytes(frame(2, Hello("stranger", b"m" * 16, nonce, 1, genesis, 0)))
            await ws.receive()  # closed: not trusted


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
        before, round_before = proc.memory_info().rss, node.status()["round"]
        asyncio.run(knock_all(node.endpoint["peer_port"], genesis))
        time.sleep(1.0)
        grown = proc.memory_info().rss - before
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
    assert grown < 10 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"

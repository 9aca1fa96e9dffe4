"""Pairing inside an encrypted channel (/fl/v2/pair), between real in-process nodes: the
code's key must answer, the token and names never cross in the clear, a refusal comes
back with its reason, and a node of the old plain-HTTP pairing is told to upgrade."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from node.peers.pair_flow import OLD_PAIR_PATH, PAIR_PATH
from node.trust.pairing import PairingError, PairingOffer

from .test_channel import _node, _pass_through, _proxy
from .test_daemon_inprocess import running


async def test_two_nodes_pair_through_the_channel_and_link(tmp_path, no_leaked_tasks):
    a, b = _node(tmp_path, 0, federation="pairing-club"), _node(tmp_path, 1,
                                                             federation="pairing-club")
    seen: list[bytes] = []
    async with running([a, b]):
        runner, port = await _proxy(a.peer_port, _pass_through(seen), PAIR_PATH)
        try:
            offer = a.pairing.offer(60)
            via_proxy = PairingOffer(**{**offer.__dict__, "addresses": (f"127.0.0.1:{port}",)})
            node_id, name = await b.pairing.pair_with(via_proxy.to_uri())
        finally:
            await runner.cleanup()
        assert (node_id, name) == (a.node_id, "node-0")
        assert a.trust_store.get(b.core.key) and b.trust_store.get(a.core.key)
        with pytest.raises(PairingError, match="^pairing token already used$"):
            await b.pairing.pair_with(offer.to_uri())  # the reason comes back, sealed
    wire = b"".join(seen)
    assert len(seen) >= 6  # two keys, two hellos, the request, the answer
    for marker in (offer.token.encode(), b"pairing-club", b"node-0", b"node-1",
                   b"pair_request", b"pair_accept"):
        assert marker not in wire, marker


async def test_an_address_answering_with_another_key_is_an_impostor(tmp_path, no_leaked_tasks):
    a, b, c = (_node(tmp_path, i) for i in range(3))
    async with running([a, b, c]):
        offer = a.pairing.offer(60)
        elsewhere = PairingOffer(**{**offer.__dict__,
                                    "addresses": (f"127.0.0.1:{c.peer_port}",)})
        with pytest.raises(PairingError, match="refused as an impostor"):
            await b.pairing.pair_with(elsewhere.to_uri())
        assert not c.trust_store.get(b.core.key) and not b.trust_store.get(a.core.key)


async def test_the_old_plain_http_pairing_is_told_to_upgrade(tmp_path, no_leaked_tasks):
    a = _node(tmp_path, 0)
    async with running([a]), aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{a.peer_port}{OLD_PAIR_PATH}",
                                data=b"\x92") as resp:
            text = await resp.text()
    assert resp.status == 426 and PAIR_PATH in text


async def test_a_pairing_that_stalls_gives_up(tmp_path, no_leaked_tasks, monkeypatch):
    """A node that opens the channel and then says nothing costs the requester the
    pairing timeout, not forever."""
    monkeypatch.setattr("node.peers.pair_flow.PAIR_TIMEOUT", 1.0)
    a, b = _node(tmp_path, 0), _node(tmp_path, 1)

    async def silent(inner, outer) -> None:
        await asyncio.sleep(5)

    async with running([a, b]):
        runner, port = await _proxy(a.peer_port, silent, PAIR_PATH)
        try:
            offer = a.pairing.offer(60)
            stalled = PairingOffer(**{**offer.__dict__, "addresses": (f"127.0.0.1:{port}",)})
            with pytest.raises(PairingError, match="failed: TimeoutError"):
                await asyncio.wait_for(b.pairing.pair_with(stalled.to_uri()), 4)
        finally:
            await runner.cleanup()

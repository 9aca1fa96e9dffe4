"""A member that cannot build the genesis model (another implementation, without
PyTorch) gets its hash from the acceptor's hello and the model itself over the protocol
(docs/protocol.md 6.2, 9.8), against a real in-process node."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import WSMsgType

from node.peers.channel import open_dialer
from node.peers.transport import LINK_PATH
from protocol.envelope import decode, encode
from protocol.gossip import federation_key, federation_proof
from protocol.identity import Identity
from protocol.messages import Genesis, GenesisRequest, Hello
from protocol.tensors import weights_digest

from .test_channel import SECRET, _node
from .test_daemon_inprocess import running


async def _frames_until(channel, ws, within: float) -> list:
    """The frames the node sends within ``within`` seconds, decoded."""
    out = []
    try:
        async with asyncio.timeout(within):
            while True:
                msg = await ws.receive()
                if msg.type != WSMsgType.BINARY:
                    return out
                frame = channel.open(msg.data)
                if frame is not None:
                    out.append(decode(bytes(frame)))
    except TimeoutError:
        return out


async def test_a_member_without_the_genesis_model_gets_hash_and_model_over_the_protocol(
        tmp_path, monkeypatch, caplog, no_leaked_tasks):
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", SECRET)
    node = _node(tmp_path, 0)
    ident = Identity.generate()
    seq = 0

    def frame(message) -> bytes:
        nonlocal seq
        seq += 1
        return bytes(encode(ident, message, seq=seq, ts_ms=time.time_ns() // 10**6,
                            federation=node.core.federation))

    async with running([node]), aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{node.peer_port}{LINK_PATH}"
        async with session.ws_connect(url) as ws:
            channel = await open_dialer(ws)
            theirs = decode(bytes(await channel.receive_frame())).message
            assert isinstance(theirs, Hello)
            genesis_hash = theirs.genesis  # taken from the acceptor: it has no model
            key = federation_key(SECRET.encode(), node.core.federation)
            await channel.send(frame(Hello("foreign", channel.ours, channel.theirs, 1,
                                           genesis_hash, 0, federation_proof(
                                               key, node.core.federation, ident.public_key,
                                               channel.theirs))))
            with caplog.at_level(logging.WARNING):
                await channel.send(frame(GenesisRequest()))
                await channel.send(frame(GenesisRequest()))  # again at once: refused
                got = [e for e in await _frames_until(channel, ws, 2.0)
                       if isinstance(e.message, Genesis)]
    assert len(got) == 1
    [env] = got
    assert env.sender == node.core.key
    assert weights_digest(env.message.weights) == genesis_hash \
        == node.core.machine.genesis_digest
    assert "genesis_request again within a minute" in caplog.text


async def test_an_unasked_genesis_is_refused(tmp_path, monkeypatch, caplog, no_leaked_tasks):
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", SECRET)
    first = _node(tmp_path, 0)
    async with running([first]):
        second = _node(tmp_path, 1, peers=(f"127.0.0.1:{first.peer_port}",))
        async with running([second]):
            for _ in range(100):
                if first.transport.links:
                    break
                await asyncio.sleep(0.05)
            with caplog.at_level(logging.WARNING):
                assert second.transport.send(first.core.key, second.core.frame(
                    Genesis(second.core.genesis or [])))
                for _ in range(40):
                    if "genesis is not accepted on a peer link" in caplog.text:
                        break
                    await asyncio.sleep(0.05)
    assert "genesis is not accepted on a peer link" in caplog.text

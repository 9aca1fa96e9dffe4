"""The encrypted channel of a peer link (link protocol 2), against real in-process nodes:
records that do not open close the link, a man in the middle that substitutes its own
ephemeral keys fails the handshake, and what a relay of the bytes sees is ciphertext."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from node.config import NodeConfig
from node.peers.channel import Channel, open_acceptor, open_dialer
from node.peers.transport import LINK_PATH
from node.runtime.build import build_node
from node.runtime.supervisor import Node
from protocol.envelope import encode
from protocol.gossip import federation_key, federation_proof
from protocol.identity import Identity
from protocol.messages import Heartbeat, Hello
from protocol.pieces import split

from .fakes import FakeLearner
from .test_daemon_inprocess import _wait, running

SECRET = "in-process channel test federation secret"


def _node(tmp_path, i: int, peers: tuple[str, ...] = (), **kw) -> Node:
    return build_node(NodeConfig(name=f"node-{i}", state_dir=str(tmp_path / f"n{i}"),
                                 host="127.0.0.1", port=0, web_port=0, rounds=50,
                                 wait_peers=len(peers), heartbeat_interval=0.2, mdns=False,
                                 peers=peers, **kw), FakeLearner(i))


class Member:
    """A client that knows the federation secret: it is admitted, then sends records."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ident = Identity.generate()
        self.seq = 0

    def frame(self, message) -> bytes:
        self.seq += 1
        return bytes(encode(self.ident, message, seq=self.seq, ts_ms=time.time_ns() // 10**6,
                            federation=self.node.core.federation))

    def heartbeat_records(self, channel: Channel) -> list[bytes]:
        frame = self.frame(Heartbeat(0, "training", time.time_ns() // 10**6, 0))
        return channel.seal(split(frame))

    async def attack(self, records: Callable[[Channel], list[bytes]]) -> bool:
        """Join, send ``records(channel)`` as they are; whether the node closed the link."""
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{self.node.peer_port}{LINK_PATH}"
            async with session.ws_connect(url) as ws:
                channel = await open_dialer(ws)
                await channel.receive_frame()
                key = federation_key(SECRET.encode(), self.node.core.federation)
                proof = federation_proof(key, self.node.core.federation, self.ident.public_key,
                                         channel.theirs)
                await channel.send(self.frame(Hello("mallory", channel.ours, channel.theirs, 1,
                                                    self.node.core.machine.genesis_digest, 0,
                                                    proof)))
                await _wait(lambda: self.ident.public_key in self.node.transport.links, 5)
                for record in records(channel):
                    await ws.send_bytes(record)
                try:
                    async with asyncio.timeout(3):
                        while True:
                            msg = await ws.receive()
                            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                                return True
                except TimeoutError:
                    return False


def _altered(m: Member, ch: Channel) -> list[bytes]:
    [record] = m.heartbeat_records(ch)
    return [record[:20] + bytes([record[20] ^ 1]) + record[21:]]


def _replayed(m: Member, ch: Channel) -> list[bytes]:
    [record] = m.heartbeat_records(ch)
    return [record, record]


def _reordered(m: Member, ch: Channel) -> list[bytes]:
    [first], [second] = m.heartbeat_records(ch), m.heartbeat_records(ch)
    return [second, first]


def _truncated(m: Member, ch: Channel) -> list[bytes]:
    [record] = m.heartbeat_records(ch)
    return [record[:-1]]


def _stump(m: Member, ch: Channel) -> list[bytes]:
    return [m.heartbeat_records(ch)[0][:10]]


RecordAttack = Callable[[Member, Channel], list[bytes]]


@pytest.mark.parametrize("attack,reason", [
    (_altered, "does not authenticate"),
    (_replayed, "record 2 does not authenticate"),  # the hello was 0, the first copy 1
    (_reordered, "record 1 does not authenticate"),
    (_truncated, "does not authenticate"),
    (_stump, "record of 10 bytes (at least 16 expected)"),
], ids=["altered", "replayed", "reordered", "truncated", "stump"])
async def test_a_record_that_does_not_open_closes_the_link(attack: RecordAttack, reason, tmp_path,
                                                          monkeypatch, caplog, no_leaked_tasks):
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", SECRET)
    node = _node(tmp_path, 0)
    async with running([node]):
        member = Member(node)
        with caplog.at_level(logging.WARNING):
            closed = await member.attack(lambda ch: attack(member, ch))
        await _wait(lambda: member.ident.public_key not in node.transport.links, 3)
    assert closed
    assert reason in caplog.text, caplog.text
    assert "its records cannot be read" in caplog.text


async def test_well_formed_records_keep_the_link_up(tmp_path, monkeypatch, no_leaked_tasks):
    """The control for the attacks above: the same client, honest records, stays linked."""
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", SECRET)
    node = _node(tmp_path, 0)
    async with running([node]):
        member = Member(node)
        closed = await member.attack(lambda ch: member.heartbeat_records(ch)
                                     + member.heartbeat_records(ch))
    assert not closed


Relay = Callable[[web.WebSocketResponse, aiohttp.ClientWebSocketResponse], Awaitable[None]]


async def _proxy(target_port: int, relay: Relay, path: str = LINK_PATH
                 ) -> tuple[web.AppRunner, int]:
    """A man in the middle at a port of its own: each WebSocket opened on ``path`` there
    is opened on to ``target_port``, and ``relay`` moves what passes between the two."""
    session = aiohttp.ClientSession()

    async def handle(request: web.Request) -> web.StreamResponse:
        inner = web.WebSocketResponse(max_msg_size=0)
        await inner.prepare(request)
        async with session.ws_connect(f"http://127.0.0.1:{target_port}{path}",
                                      max_msg_size=0) as outer:
            try:
                await relay(inner, outer)
            except (ConnectionError, aiohttp.ClientError, ValueError):
                pass
        await inner.close()
        return inner

    app = web.Application()
    app.router.add_get(path, handle)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def _pass_through(seen: list[bytes]) -> Relay:
    async def relay(inner: web.WebSocketResponse, outer: aiohttp.ClientWebSocketResponse) -> None:
        async def pump(src, dst) -> None:
            async for msg in src:
                if msg.type != WSMsgType.BINARY:
                    break
                seen.append(msg.data)
                await dst.send_bytes(msg.data)
            await dst.close()
        await asyncio.gather(pump(inner, outer), pump(outer, inner))
    return relay


async def test_a_relay_of_the_bytes_links_the_nodes_and_sees_only_ciphertext(
        tmp_path, monkeypatch, no_leaked_tasks):
    """The control for the man in the middle below: forwarding every byte unchanged works,
    and nothing the relay sees names the federation, the nodes or a field."""
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", SECRET)
    seen: list[bytes] = []
    first = _node(tmp_path, 0, federation="secret-club")
    async with running([first]):
        runner, port = await _proxy(first.peer_port, _pass_through(seen))
        try:
            second = _node(tmp_path, 1, peers=(f"127.0.0.1:{port}",), federation="secret-club")
            async with running([second]):
                await _wait(lambda: second.core.machine.completed >= 2, 30)
        finally:
            await runner.cleanup()
    wire = b"".join(seen)
    assert len(wire) > 1000 and len(seen) > 8  # keys, hellos, heartbeats, models
    for marker in (b"secret-club", b"node-0", b"node-1", b"heartbeat", b"genesis",
                   b"weights", b"hello"):
        assert marker not in wire, marker


async def test_a_man_in_the_middle_with_its_own_ephemeral_keys_fails_the_handshake(
        tmp_path, monkeypatch, caplog, no_leaked_tasks):
    """The proxy runs a channel with each side (its own ephemeral key towards each) and
    hands each side the other's hello, re-sealed: the hellos are signed and echo keys the
    victims never sent, so neither node admits the other."""
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", SECRET)
    forwarded: list[str] = []

    async def substitute(inner: web.WebSocketResponse,
                         outer: aiohttp.ClientWebSocketResponse) -> None:
        towards_dialer = await open_acceptor(inner)
        towards_acceptor = await open_dialer(outer)
        await towards_dialer.send(await towards_acceptor.receive_frame())
        forwarded.append("acceptor's hello")
        await towards_acceptor.send(await towards_dialer.receive_frame())
        forwarded.append("dialer's hello")
        await asyncio.sleep(1)

    first = _node(tmp_path, 0)
    async with running([first]):
        runner, port = await _proxy(first.peer_port, substitute)
        try:
            second = _node(tmp_path, 1, peers=(f"127.0.0.1:{port}",))
            with caplog.at_level(logging.WARNING):
                async with running([second]):
                    await _wait(lambda: "other ephemeral keys" in caplog.text, 10)
                    await asyncio.sleep(0.5)
                    assert not first.transport.links and not second.transport.links
        finally:
            await runner.cleanup()
    assert forwarded == ["acceptor's hello"]  # the dialer refused it, sent nothing back

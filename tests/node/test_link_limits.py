"""The peer port of a real in-process node: a stranger gets a few KiB and a few seconds,
an admitted link gets the full message size (frames travel in 64 KiB pieces)."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time

import aiohttp
import pytest

from node.config import NodeConfig
from node.peers.channel import open_dialer
from node.peers.transport import LINK_PATH
from node.runtime.build import build_node
from node.runtime.supervisor import Node
from protocol.messages import Model
from protocol.pieces import PIECE_MAX
from protocol.tensors import Tensor, weights_digest

from .fakes import FakeLearner
from .test_daemon_inprocess import _wait, running

UPGRADE = (b"GET /fl/v2/link HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


def _node(tmp_path, i: int, dim: int = 16, peers: tuple[str, ...] = ()) -> Node:
    return build_node(NodeConfig(name=f"n{i}", state_dir=str(tmp_path / f"n{i}"),
                                 host="127.0.0.1", port=0, web_port=0, rounds=3,
                                 wait_peers=len(peers), heartbeat_interval=0.2, mdns=False,
                                 peers=peers), FakeLearner(i, dim=dim))


async def _upgraded(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(UPGRADE)
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    while (await reader.readline()) != b"\r\n":
        pass
    return reader, writer


def _ws_header(length: int) -> bytes:
    """A masked binary WebSocket frame header (RFC 6455) claiming ``length`` bytes."""
    return b"\x82\xff" + struct.pack(">Q", length) + os.urandom(4)


def _masked(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if len(payload) < 126:
        return bytes([0x82, 0x80 | len(payload)]) + mask + body
    return b"\x82\xfe" + struct.pack(">H", len(payload)) + mask + body \
        if len(payload) < 65536 else _ws_header(len(payload))[:-4] + mask + body


async def _close_code(reader: asyncio.StreamReader, within: float) -> int | None:
    """The code of the close frame the node sends within ``within`` s, else None."""
    async with asyncio.timeout(within):
        head = await reader.readexactly(2)
        assert head[0] == 0x88, head  # a close frame, nothing else
        body = await reader.readexactly(head[1] & 0x7F)
    return struct.unpack(">H", body[:2])[0] if len(body) >= 2 else None


async def test_a_header_claiming_128_mib_before_the_handshake_is_refused_at_once(
        tmp_path, no_leaked_tasks):
    node = _node(tmp_path, 0)
    async with running([node]):
        reader, writer = await _upgraded(node.peer_port)
        started = time.monotonic()
        writer.write(_ws_header(128 << 20))
        code = await _close_code(reader, 2.0)
        took = time.monotonic() - started
        writer.close()
    assert code == 1009 and took < 1.0, (code, took)  # MESSAGE_TOO_BIG, not a timeout


async def test_a_hello_over_the_handshake_cap_is_refused(tmp_path, no_leaked_tasks, caplog):
    node = _node(tmp_path, 0)
    async with running([node]), aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{node.peer_port}{LINK_PATH}") as ws:
            channel = await open_dialer(ws)
            await channel.receive_frame()  # the node's hello
            with caplog.at_level(logging.WARNING):
                for record in channel.seal([b"\x01" + bytes(20000)]):  # one 20 KB piece
                    await ws.send_bytes(record)
                assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
                await _wait(lambda: "exceeds the cap of 16384" in caplog.text, 2.0)


async def test_a_first_message_that_is_no_ephemeral_key_is_refused(tmp_path, no_leaked_tasks,
                                                                    caplog):
    node = _node(tmp_path, 0)
    async with running([node]):
        reader, writer = await _upgraded(node.peer_port)
        with caplog.at_level(logging.WARNING):
            writer.write(_masked(b"\x01" + bytes(200)))  # a link protocol 1 hello, say
            await _close_code(reader, 2.0)
            await _wait(lambda: "expected a 32-byte ephemeral key" in caplog.text, 2.0)
        writer.close()


async def test_link_protocol_1_is_told_to_upgrade(tmp_path, no_leaked_tasks):
    node = _node(tmp_path, 0)
    async with running([node]):
        reader, writer = await asyncio.open_connection("127.0.0.1", node.peer_port)
        writer.write(UPGRADE.replace(b"/fl/v2/link", b"/fl/v1/link"))
        status = await reader.readline()
        answer = await reader.read(4096)
        writer.close()
    assert status.startswith(b"HTTP/1.1 426"), status
    assert b"link protocol 2" in answer


async def test_a_silent_upgraded_connection_is_closed_after_the_handshake_timeout(
        tmp_path, no_leaked_tasks):
    node = _node(tmp_path, 0)
    async with running([node]):
        reader, writer = await _upgraded(node.peer_port)
        started = time.monotonic()
        await _close_code(reader, 8.0)
        took = time.monotonic() - started
        writer.close()
    assert 4.0 < took < 7.0, took  # HANDSHAKE_TIMEOUT


@pytest.mark.parametrize("port", ["peer", "web"])
async def test_a_malformed_upgrade_is_a_400_on_either_port(port, tmp_path, no_leaked_tasks,
                                                          caplog):
    node = _node(tmp_path, 0)
    async with running([node]):
        where = node.peer_port if port == "peer" else node.web_port
        path = b"/fl/v2/link" if port == "peer" else b"/ws"
        reader, writer = await asyncio.open_connection("127.0.0.1", where)
        with caplog.at_level(logging.WARNING):
            host = f"Host: 127.0.0.1:{where}".encode()  # what the web port's Host check wants
            writer.write(UPGRADE.replace(b"/fl/v2/link", path).replace(b"Host: 127.0.0.1", host)
                         .replace(b"Upgrade: websocket", b"Upgrade: web\xffsocket"))
            status = await reader.readline()
        writer.close()
    assert status.startswith(b"HTTP/1.1 400"), status
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_models_of_many_pieces_travel_over_an_admitted_link(tmp_path, no_leaked_tasks,
                                                                  monkeypatch):
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", "in-process test federation secret")
    dim = 5 * PIECE_MAX // 4 + 123  # float32: a model of five pieces and a bit
    first = _node(tmp_path, 0, dim)
    async with running([first]):
        second = _node(tmp_path, 1, dim, peers=(f"127.0.0.1:{first.peer_port}",))
        async with running([second]):
            await _wait(lambda: all(n.state == "done" for n in (first, second)), 60)
    assert first.model_hash() == second.model_hash()
    assert first.core.counters.bytes_sent > 3 * 4 * dim


async def test_a_50_mb_frame_is_refused_for_its_content_and_the_link_stays_up(
        tmp_path, no_leaked_tasks, monkeypatch):
    """A member's 50 MB model that does not fit the federation's model: refused with its
    reason (logged and counted), and the link that carried it stays up."""
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", "in-process test federation secret")
    first = _node(tmp_path, 0)
    async with running([first]):
        second = _node(tmp_path, 1, peers=(f"127.0.0.1:{first.peer_port}",))
        async with running([second]):
            await _wait(lambda: first.transport.links and second.transport.links, 30)
            [link] = first.transport.links.values()
            tensors = [Tensor("w", "float32", (12_500_000,), bytes(50_000_000))]
            frame = second.core.frame(Model(round=2, attempt=0, aggregator=second.core.key,
                                            contributors=(), num_examples=1,
                                            digest=weights_digest(tensors), weights=tensors))
            assert second.transport.send(first.core.key, frame)
            await _wait(lambda: first.core.counters.messages_received and any(
                r["peer"] == second.node_id for r in first.core.counters.recent_rejections
            ), 30)
            await asyncio.sleep(3.0)  # the link dropped about 3 s after such a frame
            assert first.transport.links.get(second.core.key) is link
    reasons = [r for r in first.core.counters.recent_rejections if r["peer"] == second.node_id]
    assert "do not match the federation's model" in str(reasons), reasons

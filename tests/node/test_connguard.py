"""Connections that prove nothing are few and short-lived (node.common.connguard), and a
malformed WebSocket upgrade gets a 400 without a traceback (node.common.wsaccept)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from node.common import connguard
from node.common.connguard import ConnectionGuard, server_options
from node.common.wsaccept import upgrade_refusal


async def _ok(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


async def _socket(request: web.Request) -> web.StreamResponse:
    refusal = upgrade_refusal(request)
    if refusal is not None:
        return refusal
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for _ in ws:
        pass
    return ws


async def _serve(guard: ConnectionGuard, **options: object) -> tuple[web.AppRunner, int]:
    app = web.Application(middlewares=[guard.middleware])
    app.router.add_get("/", _ok)
    app.router.add_get("/ws", _socket)
    runner = web.AppRunner(app, handle_signals=False, **{**server_options(), **options})
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    guard.runner = runner
    return runner, runner.addresses[0][1]


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closed the connection within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def test_silent_connections_are_closed_when_no_request_headers_come(no_leaked_tasks):
    guard = ConnectionGuard()
    runner, port = await _serve(guard, keepalive_timeout=0.5)
    try:
        conns = [await _connect(port) for _ in range(5)]
        assert not await _closed(conns[0][0], 0.2)
        assert all([await _closed(r, 2.0) for r, _ in conns])
    finally:
        await runner.cleanup()


async def test_slowloris_headers_are_cut_off_at_the_header_timeout(no_leaked_tasks):
    guard = ConnectionGuard()
    runner, port = await _serve(guard, keepalive_timeout=0.6)
    try:
        reader, writer = await _connect(port)
        dripped = 0
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60:
            writer.write(bytes([byte]))
            dripped += 1
            if await _closed(reader, 0.05):
                break
        else:
            pytest.fail("a connection dripping its headers was never closed")
        assert dripped < 40  # 0.6 s at 20 bytes a second, give or take
    finally:
        await runner.cleanup()


async def test_a_pending_connection_is_closed_at_the_deadline_whatever_it_sends(
        no_leaked_tasks):
    # An aiohttp keep-alive long enough that only the guard's deadline can close it.
    clock = [0.0]
    guard = ConnectionGuard(deadline=10.0, clock=lambda: clock[0])
    runner, port = await _serve(guard, keepalive_timeout=60)
    try:
        reader, writer = await _connect(port)
        await asyncio.sleep(0.1)
        assert guard.sweep() == 0
        clock[0] = 9.9
        assert guard.sweep() == 0
        clock[0] = 10.0
        assert guard.sweep() == 1 and guard.closed_late == 1
        assert await _closed(reader, 1.0)
    finally:
        await runner.cleanup()


async def test_settled_connections_are_kept(no_leaked_tasks):
    clock = [0.0]
    guard = ConnectionGuard(deadline=10.0, clock=lambda: clock[0])
    runner, port = await _serve(guard, keepalive_timeout=60)
    try:
        reader, writer = await _connect(port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 101")
        guard.sweep()
        clock[0] = 1000.0
        assert guard.sweep() == 0  # an upgraded socket, settled by its request
        assert not await _closed(reader, 0.2)
        writer.close()
    finally:
        await runner.cleanup()


async def test_at_most_the_limit_of_pending_connections_per_address(no_leaked_tasks):
    clock = [0.0]
    guard = ConnectionGuard(max_per_address=4, clock=lambda: clock[0])
    runner, port = await _serve(guard, keepalive_timeout=60)
    try:
        conns = [await _connect(port) for _ in range(12)]
        await asyncio.sleep(0.2)
        assert guard.sweep() == 0  # just seen: within the grace, none counts yet
        clock[0] = connguard.CROWD_GRACE
        newcomer = await _connect(port)  # a client behind the same address, late
        await asyncio.sleep(0.2)
        assert guard.sweep() == 8 and guard.closed_crowded == 8
        closed = [await _closed(r, 0.5) for r, _ in conns]
        assert closed == [True] * 8 + [False] * 4  # the oldest go first
        newcomer[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await newcomer[0].readline()).startswith(b"HTTP/1.1 200")
        for _, writer in [*conns, newcomer]:
            writer.close()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("header", [b"Upgrade", b"Connection", b"Sec-WebSocket-Key",
                                    b"Sec-WebSocket-Version", b"Sec-WebSocket-Protocol"])
@pytest.mark.parametrize("value", [b"\xff\xfe", b"web\x80socket"])
async def test_a_non_ascii_upgrade_header_is_a_400_without_a_traceback(
        header, value, caplog, no_leaked_tasks):
    guard = ConnectionGuard()
    runner, port = await _serve(guard)
    headers = {b"Host": b"x", b"Upgrade": b"websocket", b"Connection": b"Upgrade",
               b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==",
               b"Sec-WebSocket-Version": b"13", header: value}
    try:
        with caplog.at_level(logging.WARNING):
            reader, writer = await _connect(port)
            writer.write(b"GET /ws HTTP/1.1\r\n" + b"".join(
                k + b": " + v + b"\r\n" for k, v in headers.items()) + b"\r\n")
            status = await reader.readline()
            body = await reader.read(4096)
            writer.close()
    finally:
        await runner.cleanup()
    assert status.startswith(b"HTTP/1.1 400"), status
    assert b"malformed WebSocket upgrade" in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_request_that_is_no_upgrade_is_a_400(no_leaked_tasks):
    guard = ConnectionGuard()
    runner, port = await _serve(guard)
    try:
        reader, writer = await _connect(port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 400")
        writer.close()
    finally:
        await runner.cleanup()


def test_the_documented_limits():
    assert connguard.HEADER_TIMEOUT == 5.0 and connguard.PENDING_DEADLINE == 10.0
    assert connguard.MAX_PENDING_PER_ADDRESS == 16
    assert server_options()["keepalive_timeout"] == connguard.HEADER_TIMEOUT

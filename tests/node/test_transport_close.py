"""Shutting the peer transport down does not wait on peers that never answer."""

from __future__ import annotations

import asyncio

from node.transport import Link, PeerTransport


class SilentSocket:
    """A WebSocket whose peer never answers the close frame (a frozen or vanished host)."""

    def __init__(self) -> None:
        self.close_started = False

    async def close(self) -> bool:
        self.close_started = True
        await asyncio.Event().wait()  # forever
        return True


class PoliteSocket:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> bool:
        self.closed = True
        return True


def test_close_gives_each_silent_peer_the_grace_at_once_and_closes_the_rest():
    async def main() -> None:
        transport = PeerTransport(None, on_frame=None, on_link_up=None,  # type: ignore[arg-type]
                                  on_link_down=None)
        silent = [SilentSocket() for _ in range(5)]
        polite = PoliteSocket()
        for i, ws in enumerate([*silent, polite]):
            key = bytes([i]) * 32
            transport.links[key] = Link(key=key, dialer=key, address=f"10.0.0.{i}:1",
                                        ws=ws)  # type: ignore[arg-type]
        # Without the grace this never returns; with it, five silent peers cost one grace
        # (they are closed together), well within the bound below.
        await asyncio.wait_for(transport.close(grace=0.2), timeout=5)
        assert polite.closed
        assert all(ws.close_started for ws in silent)
        assert all(link.closed.is_set() for link in transport.links.values())

    asyncio.run(main())

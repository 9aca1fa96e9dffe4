"""Which link to a peer is up: the node hears of a peer's link going up and down in pairs,
so that it counts a peer as connected exactly while a link to it runs, whatever order
concurrent links (both sides dialing, re-dials after a restart) come and go in."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiohttp import WSMessage, WSMsgType

from node.peers.transport import Link, PeerTransport

from .fakes import idle_channel

KEY = b"\x07" * 32


class FakeSocket:
    """A WebSocket that carries nothing until it is closed (or its peer drops it)."""

    def __init__(self, close_takes: float = 0.0) -> None:
        self.close_takes = close_takes
        self._gone = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._gone.is_set()

    def drop(self) -> None:
        """The peer goes away (a reset, a restart)."""
        self._gone.set()

    async def receive(self, timeout: float | None = None) -> WSMessage:
        await self._gone.wait()
        return WSMessage(WSMsgType.CLOSED, None, None)

    async def close(self, **how: object) -> bool:
        await asyncio.sleep(self.close_takes)  # the peer takes its time to answer
        self._gone.set()
        return True

    async def send_bytes(self, data: bytes) -> None:
        await self._gone.wait()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self if name == "socket" else default

    # The socket under it: a reset (SO_LINGER 0, shutdown) drops the connection.
    def setsockopt(self, *args: object) -> None:
        pass

    def shutdown(self, how: int) -> None:
        self.drop()


class Recorder:
    """Plays the node behind a ``PeerTransport``: the set of peers it counts as connected,
    and what it heard, in order."""

    def __init__(self) -> None:
        self.up: set[bytes] = set()
        self.events: list[tuple[str, int]] = []
        self.transport = PeerTransport(None, on_frame=None,  # type: ignore[arg-type]
                                       on_link_up=self.link_up, on_link_down=self.link_down)

    def run(self, link: Link) -> asyncio.Task[None]:
        """Run ``link`` (its handshake done) as the transport does, in a task."""
        return asyncio.create_task(
            self.transport._run_link(link, SimpleNamespace(name="peer"), "paired"))  # noqa: SLF001

    def link_up(self, link: Link, hello: object, trust: str) -> None:
        self.up.add(link.key)
        self.events.append(("up", id(link)))

    def link_down(self, link: Link) -> None:
        self.up.discard(link.key)
        self.events.append(("down", id(link)))


def _link(ws: FakeSocket) -> Link:
    return Link(key=KEY, dialer=KEY, address="10.0.0.7:7700", ws=ws,  # type: ignore[arg-type]
                channel=idle_channel(ws))


def test_a_link_superseded_while_it_came_up_does_not_mark_the_peer_up():
    """Link B replaces A and waits for A to close; meanwhile C replaces B and dies. B must
    not then report the peer up: no link serves it, and the node would count it connected
    (and elect it, and wait on it) for good."""
    async def main() -> None:
        node = Recorder()
        transport = node.transport
        a = _link(FakeSocket(close_takes=0.3))
        b, c = _link(FakeSocket()), _link(FakeSocket())
        run_a = node.run(a)
        await asyncio.sleep(0.05)
        assert transport.links[KEY] is a and node.up == {KEY}
        run_b = node.run(b)
        await asyncio.sleep(0.05)  # B is waiting for A's close
        run_c = node.run(c)
        await asyncio.sleep(0.05)
        assert transport.links[KEY] is c
        c.ws.drop()  # type: ignore[attr-defined]
        await asyncio.wait_for(asyncio.gather(run_a, run_b, run_c), timeout=5)
        assert transport.links == {}
        assert node.up == set(), node.events  # before the fix: B said "up" last
        assert ("up", id(b)) not in node.events

    asyncio.run(main())


def test_a_replaced_link_hands_over_without_the_peer_going_down():
    """A re-dial replaces the old link: the peer stays up throughout, and goes down once,
    when the link that replaced it ends."""
    async def main() -> None:
        node = Recorder()
        transport = node.transport
        a, b = _link(FakeSocket(close_takes=0.1)), _link(FakeSocket())
        run_a = node.run(a)
        await asyncio.sleep(0.05)
        run_b = node.run(b)
        await asyncio.sleep(0.3)
        assert transport.links[KEY] is b and node.up == {KEY}
        assert node.events == [("up", id(a)), ("up", id(b))]
        b.ws.drop()  # type: ignore[attr-defined]
        await asyncio.wait_for(asyncio.gather(run_a, run_b), timeout=5)
        assert node.events[-1] == ("down", id(b)) and node.up == set()

    asyncio.run(main())


def test_a_link_whose_node_callback_fails_still_reports_its_end():
    """A failure while the node takes a link up (a bug) ends that link and reports it down,
    instead of leaving a link no one reads that counts the peer connected for good."""
    async def main() -> None:
        node = Recorder()

        def failing_up(link: Link, hello: object, trust: str) -> None:
            node.link_up(link, hello, trust)
            raise RuntimeError("bug in the node")

        node.transport.on_link_up = failing_up
        try:
            await asyncio.wait_for(node.run(_link(FakeSocket())), timeout=5)
        except RuntimeError:
            pass
        assert node.transport.links == {} and node.up == set(), node.events

    asyncio.run(main())


def test_a_link_cancelled_while_it_replaces_another_leaves_the_peer_down():
    """An undial (the peer left mDNS) cancels the dial task while its new link waits for
    the old one to close: the peer is then served by no link, and the node hears so."""
    async def main() -> None:
        node = Recorder()
        transport = node.transport
        a, b = _link(FakeSocket(close_takes=1.0)), _link(FakeSocket())
        run_a = node.run(a)
        await asyncio.sleep(0.05)
        run_b = node.run(b)
        await asyncio.sleep(0.05)  # B waits for A's close
        run_b.cancel()
        done, _ = await asyncio.wait({run_a, run_b}, timeout=5)
        assert done == {run_a, run_b} and run_b.cancelled()
        assert transport.links == {}
        assert node.up == set(), node.events

    asyncio.run(main())


def test_a_cancelled_link_task_ends_cancelled_and_reports_the_peer_down():
    """Cancelling a running link (an undial, a shutdown) ends its task for good, even when
    the cancellation lands while the link is closing, and the peer goes down once."""
    async def main() -> None:
        node = Recorder()
        transport = node.transport
        a = _link(FakeSocket(close_takes=1.0))
        run_a = node.run(a)
        await asyncio.sleep(0.05)
        run_a.cancel()
        await asyncio.sleep(0.05)  # now in the finally, closing
        run_a.cancel()
        done, _ = await asyncio.wait({run_a}, timeout=5)
        assert done == {run_a} and run_a.cancelled()
        assert transport.links == {} and node.up == set()
        assert node.events == [("up", id(a)), ("down", id(a))]

    asyncio.run(main())


class BrokenSocket(FakeSocket):
    """The connection breaks under the first send (a reset the reader has not seen yet)."""

    async def send_bytes(self, data: bytes) -> None:
        raise ConnectionResetError("Cannot write to closing transport")


def test_a_link_whose_send_fails_ends_and_reports_the_peer_down():
    """A send that fails ends the link, instead of leaving it up with no writer (and the
    peer counted as connected while nothing we queue for it leaves)."""
    async def main() -> None:
        node = Recorder()
        transport = node.transport
        a = _link(BrokenSocket())
        run_a = node.run(a)
        await asyncio.sleep(0.05)
        assert node.up == {KEY}
        assert transport.send(KEY, b"an update")
        done, _ = await asyncio.wait({run_a}, timeout=5)
        assert done == {run_a}, "the link stayed up after its send failed"
        assert transport.links == {} and node.up == set()

    asyncio.run(main())


def test_a_dialer_survives_an_unexpected_error_and_retries(monkeypatch, caplog):
    """A bug under a dial (anything but the expected network and protocol errors) is
    logged with its traceback and the dialer retries after a pause; before, the dialer
    task died and the node never dialed that address again."""
    real_sleep = asyncio.sleep
    pauses: list[float] = []

    async def quick_sleep(delay: float) -> None:
        pauses.append(delay)
        await real_sleep(0)

    async def main() -> None:
        transport = PeerTransport(None, on_frame=None,  # type: ignore[arg-type]
                                  on_link_up=None, on_link_down=None)  # type: ignore[arg-type]
        attempts: list[str] = []
        again = asyncio.Event()

        async def dial_once(address: str, expected: object = None) -> bool:
            attempts.append(address)
            if len(attempts) == 1:
                raise RuntimeError("a bug")
            again.set()
            await asyncio.Event().wait()  # the second link stays up
            return True

        transport._dial_once = dial_once  # type: ignore[method-assign]  # noqa: SLF001
        monkeypatch.setattr(asyncio, "sleep", quick_sleep)
        task = asyncio.create_task(transport.dial("10.0.0.7:7700"))
        try:
            await asyncio.wait_for(again.wait(), timeout=5)
        finally:
            task.cancel()
            await asyncio.wait({task})
        assert attempts == ["10.0.0.7:7700"] * 2
        assert pauses and pauses[0] >= 5.0  # a bug is not retried in a tight loop

    asyncio.run(main())
    assert "link to 10.0.0.7:7700 failed" in caplog.text and "RuntimeError: a bug" in caplog.text

"""The pipelined record layer (node.peers.channel): large frames are sealed and opened on
worker threads, several 1 MiB jobs at once. The records are byte for byte those of
sealing piece after piece (``Channel.seal``), ``take`` returns the frames ``open`` returns,
and a bad record raises ProtocolError with the reason ``open`` gives, no later than the
frame's last record."""

from __future__ import annotations

import asyncio
import gc
import logging
import os

import pytest

from node.peers import channel as channel_module
from node.peers.channel import (
    OPEN_BATCH,
    PIPELINE,
    RECORD_MAX,
    SEAL_BATCH,
    THREAD_OPEN_MIN,
    THREAD_SEAL_MIN,
    Channel,
)
from protocol import linkcrypto
from protocol.envelope import announced_length, encode
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.linkcrypto import Sealer
from protocol.messages import Heartbeat
from protocol.pieces import LAST, MORE, PIECE_MAX, split

from .test_channel import SECRET, Member, _node
from .test_daemon_inprocess import _wait, running

MIB = 1 << 20
KEY, OTHER = bytes(range(32)), bytes(range(32, 64))


class Wire:
    """The WebSocket a channel sends on: keeps what it is given, as bytes."""

    def __init__(self) -> None:
        self.records: list[bytes] = []

    async def send_bytes(self, data) -> None:
        self.records.append(bytes(data))


def _channel(cap: int = 64 * MIB) -> Channel:
    """A channel that sends under KEY and receives under KEY (a link to itself)."""
    return Channel(Wire(), bytes(32), bytes(32), (KEY, KEY), cap)  # type: ignore[arg-type]


def _frame(size: int, seed: int = 0) -> bytes:
    return (bytes(range(seed % 251, 251)) + bytes(range(seed % 251))) * (size // 251) \
        + bytes(size % 251)


def _records(frames: list[bytes]) -> list[bytes]:
    """The records of ``frames`` under KEY, piece after piece (the reference)."""
    sealer = Sealer(KEY)
    return [sealer.seal(piece) for frame in frames for piece in split(frame)]


SIZES = [THREAD_SEAL_MIN, THREAD_SEAL_MIN + 1, 2 * MIB, 3 * MIB + 17,
         (PIPELINE + 2) * SEAL_BATCH * PIECE_MAX + PIECE_MAX - 1]  # more jobs than in flight


async def test_send_writes_the_records_of_sealing_piece_after_piece(monkeypatch):
    monkeypatch.setattr(linkcrypto, "REKEY_RECORDS", 37)  # rekeys inside and across jobs
    frames = [_frame(size, seed) for seed, size in enumerate(SIZES)] + [b"small", b"x" * 70000]
    channel = _channel()
    for frame in frames:
        await channel.send(frame)
    expected = _records(frames)
    assert channel.ws.records == expected  # type: ignore[attr-defined]
    assert channel.records[0] == len(expected)


async def test_send_lets_the_loop_run_between_jobs():
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    jobs = 8
    await _channel().send(_frame(jobs * SEAL_BATCH * PIECE_MAX))
    task.cancel()
    assert ticks >= jobs  # at least once per job: the sealing is not on the loop


async def _take_all(channel: Channel, records: list[bytes]
                    ) -> tuple[list[bytes], tuple[int, str] | None]:
    """The frames ``take`` returns, and where and why it raised, if it did."""
    frames = []
    for i, record in enumerate(records):
        try:
            frame = await channel.take(record)
        except ProtocolError as exc:
            return frames, (i, exc.reason)
        if frame is not None:
            frames.append(bytes(frame))
    return frames, None


def _open_all(channel: Channel, records: list[bytes]
              ) -> tuple[list[bytes], tuple[int, str] | None]:
    """The same with ``open``, record after record on this thread (the reference)."""
    frames = []
    for i, record in enumerate(records):
        try:
            frame = channel.open(record)
        except ProtocolError as exc:
            return frames, (i, exc.reason)
        if frame is not None:
            frames.append(bytes(frame))
    return frames, None


async def test_take_returns_the_frames_open_returns(monkeypatch):
    monkeypatch.setattr(linkcrypto, "REKEY_RECORDS", 37)
    frames = [_frame(size, seed) for seed, size in enumerate(SIZES)]
    frames[2:2] = [b"a heartbeat", _frame(MIB - 1), b"y"]  # small ones between large ones
    records = _records(frames)
    assert await _take_all(_channel(), records) == (frames, None)
    assert _open_all(_channel(), records) == (frames, None)


async def test_a_frame_of_whole_pieces_ends_at_its_last_full_piece():
    """A frame of exactly 2 MiB ends with a full record: ``take`` must see it is the last
    one (its flag, peeked) and return the frame then, not wait for more records."""
    frame = _frame(2 * MIB)
    records = _records([frame])
    assert len(records[-1]) == RECORD_MAX
    channel = _channel()
    for record in records[:-1]:
        assert await channel.take(record) is None
    assert await channel.take(records[-1]) == frame


def _sealed(pieces: list[bytes]) -> list[bytes]:
    sealer = Sealer(KEY)
    return [sealer.seal(piece) for piece in pieces]


def _pieces(frame: bytes) -> list[bytes]:
    return list(split(frame))


FIRST = THREAD_OPEN_MIN // PIECE_MAX  # the pieces of a frame opened on the loop first
BIG = (FIRST + 2 * OPEN_BATCH) * PIECE_MAX + 17  # then two jobs, and a last short piece
K = FIRST + OPEN_BATCH + 3  # a record inside the second job


def _altered(records: list[bytes]) -> list[bytes]:
    bad = bytearray(records[K])
    bad[100] ^= 1
    return records[:K] + [bytes(bad)] + records[K + 1:]


def _with_piece(k: int, piece: bytes) -> list[bytes]:
    pieces = _pieces(_frame(BIG))
    pieces[k] = piece
    return _sealed(pieces)


ATTACKS = {
    "altered": _altered,
    "replayed": lambda r: r[:K + 1] + [r[K]] + r[K + 1:],
    "dropped": lambda r: r[:K] + r[K + 1:],
    "reordered": lambda r: r[:K] + [r[K + 1], r[K]] + r[K + 2:],
    "truncated": lambda r: r[:K] + [r[K][:-1]] + r[K + 1:],
    "stump": lambda r: r[:K] + [r[K][:10]] + r[K + 1:],
    "oversized": lambda r: r[:K] + [r[K] + b"!"] + r[K + 1:],
    "altered in the last job": lambda r: r[:-3] + [r[-3][:-1] + bytes([r[-3][-1] ^ 1])] + r[-2:],
    "bad flag": lambda r: _with_piece(K, b"\x02" + bytes(PIECE_MAX)),
    "short piece not the last": lambda r: _with_piece(K, bytes([MORE]) + bytes(100)),
    "full last piece in the middle": lambda r: _with_piece(K, bytes([LAST]) + bytes(PIECE_MAX)),
}


@pytest.mark.parametrize("attack", ATTACKS, ids=list(ATTACKS))
async def test_a_bad_record_fails_as_it_fails_record_after_record(attack):
    records = ATTACKS[attack](_records([_frame(BIG), b"after"]))
    frames, failure = await _take_all(_channel(), records)
    expected_frames, expected = _open_all(_channel(), records)
    assert frames == expected_frames
    if expected is None:  # a frame cut short by a LAST piece: both read on alike
        assert failure is None
        return
    assert failure is not None and failure[1] == expected[1]
    # Raised at the bad record, or later, but no later than the frame's last record.
    assert expected[0] <= failure[0] <= len(_pieces(_frame(BIG))), (failure, expected)


async def test_a_frame_over_the_cap_fails_at_the_piece_that_crosses_it():
    cap = 2 * MIB + 5
    records = _records([_frame(BIG)])
    frames, failure = await _take_all(_channel(cap), records)
    assert (frames, failure) == _open_all(_channel(cap), records)
    assert failure == (32, f"message exceeds the cap of {cap} bytes")  # 33 pieces > cap


async def test_the_reasons_are_those_of_docs_and_link_tests():
    """The reasons test_channel.py expects from a running link, from the pipeline."""
    records = _altered(_records([_frame(BIG)]))
    _, failure = await _take_all(_channel(), records)
    assert failure is not None
    assert failure[1] == (f"record {K} does not authenticate (altered, replayed, reordered or"
                          " from another link)")


async def test_a_failed_job_nobody_waits_for_logs_nothing(caplog):
    records = _altered(_records([_frame(BIG)]))
    channel = _channel()
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        for record in records[:FIRST + 2 * OPEN_BATCH]:  # the bad job started, not joined
            assert await channel.take(record) is None
        await asyncio.sleep(0.2)
        del channel
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_a_cancelled_take_drops_its_jobs():
    records = _records([_frame(BIG)])
    channel = _channel()
    for record in records[:FIRST + OPEN_BATCH + 4]:
        await channel.take(record)
    task = asyncio.create_task(channel.take(records[-1]))  # the last: waits for the jobs
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not channel._jobs and channel._frame is None  # noqa: SLF001


async def test_open_refuses_to_run_while_take_has_pieces_in_flight():
    records = _records([_frame(BIG)])
    channel = _channel()
    for record in records[:FIRST + 2]:
        await channel.take(record)
    with pytest.raises(RuntimeError):
        channel.open(records[FIRST + 2])


def _announcing(size: int, announced: int) -> bytes:
    """A frame of ``size`` bytes whose first bytes announce ``announced`` (as an
    envelope's msgpack headers do: ``take`` sizes its buffer from them)."""
    head = b"\x92\xc6" + (announced - 6 - 66).to_bytes(4, "big")
    return head + _frame(size - len(head))


def test_an_envelope_announces_its_length():
    ident = Identity.from_seed(bytes(32))
    for size in (10, 300, 70000, 3 * MIB):
        frame = encode(ident, Heartbeat(0, "x" * size, 1, 0), seq=1, ts_ms=1, federation="f")
        assert announced_length(frame) == announced_length(frame[:6]) == len(frame)
    assert announced_length(b"\x92\xc4") is None  # too short to tell
    assert announced_length(b"\x01" + bytes(10)) is None  # no frame


@pytest.mark.parametrize("announced", [BIG, BIG - 5 * PIECE_MAX, BIG + 7 * MIB, (1 << 32) + 71],
                         ids=["exact", "short", "long", "over the cap"])
async def test_a_frame_is_read_whatever_length_it_announces(announced):
    frames = [_announcing(BIG, announced), b"small", _frame(5 * MIB + 3)]
    records = _records(frames)
    assert await _take_all(_channel(16 * MIB), records) == (frames, None)


# -- on a running link ----------------------------------------------------------------


def _large_frame_records(member: Member, channel: Channel, alter: int | None) -> list[bytes]:
    records = channel.seal(split(os.urandom(3 * MIB)))
    if alter is not None:
        bad = bytearray(records[alter])
        bad[50] ^= 1
        records[alter] = bytes(bad)
    return records


async def test_a_bad_record_inside_a_large_frame_closes_the_link(tmp_path, monkeypatch, caplog,
                                                                no_leaked_tasks):
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", SECRET)
    node = _node(tmp_path, 0)
    async with running([node]):
        member = Member(node)
        with caplog.at_level(logging.WARNING):
            closed = await member.attack(lambda ch: _large_frame_records(member, ch, 30))
        await _wait(lambda: member.ident.public_key not in node.transport.links, 3)
    assert closed
    # The member's hello was its record 0: the frame's pieces are records 1 to 48, and its
    # altered piece, the 31st (opened on a worker thread), record 31.
    assert "record 31 does not authenticate" in caplog.text, caplog.text
    assert "its records cannot be read" in caplog.text


async def test_a_large_frame_of_good_records_keeps_the_link_up(tmp_path, monkeypatch, caplog,
                                                              no_leaked_tasks):
    """The control: the same frame unaltered is read whole (and, being no envelope, is
    rejected as one bad message: the link stays)."""
    monkeypatch.setenv("FL_NODE_FEDERATION_SECRET", SECRET)
    jobs = []

    def counted(*args):
        jobs.append(len(args[-1]))
        return open_pieces(*args)

    open_pieces = channel_module._open_pieces  # noqa: SLF001
    monkeypatch.setattr(channel_module, "_open_pieces", counted)
    node = _node(tmp_path, 0)
    async with running([node]):
        member = Member(node)
        with caplog.at_level(logging.WARNING):
            closed = await member.attack(lambda ch: _large_frame_records(member, ch, None))
    assert not closed
    assert "rejected message from" in caplog.text
    assert "does not authenticate" not in caplog.text
    # The link's reader took the records (Channel.take): of the frame's 48 pieces, all
    # but the first MiB's 16 and the last (a full one, known last by its flag, peeked)
    # were opened on worker threads.
    assert sum(jobs) == 48 - 16 - 1

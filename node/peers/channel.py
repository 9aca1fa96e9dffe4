"""The record layer of a peer link (link protocol 2, docs/protocol.md section 1.1).

A link opens with the two ephemeral X25519 keys in the clear, the dialer's first, each one
binary WebSocket message of exactly 32 bytes. From then on every WebSocket message either
side sends is one *record*: a piece (protocol.pieces) sealed with XChaCha20-Poly1305 under
the sender's direction key (protocol.linkcrypto). A ``Channel`` holds one link's keys,
counters and reassembler; the transport, pairing and the tests' attack clients all speak
through it, so there is one implementation of the record layer.

Who the peer is comes after: the signed hellos travel inside the channel and echo both
ephemeral keys (node.peers.handshake), which binds the channel to both identities.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

from aiohttp import WSMsgType

from node.common.wsclose import AnyWebSocket
from protocol.envelope import announced_length
from protocol.errors import ProtocolError
from protocol.linkcrypto import (
    PUBLIC_BYTES,
    TAG_BYTES,
    Ephemeral,
    Opener,
    Sealer,
    open_into,
    seal_into,
    session_keys,
)
from protocol.pieces import (
    HANDSHAKE_FRAME_MAX,
    LAST,
    MORE,
    PIECE_MAX,
    WS_MESSAGE_MAX,
    Reassembler,
    split,
)

#: The longest WebSocket message on a link: a sealed piece.
RECORD_MAX = WS_MESSAGE_MAX + TAG_BYTES
#: The ``max_msg_size`` to give aiohttp (it refuses a message of exactly its limit).
WS_LIMIT = RECORD_MAX + 1
#: Frames at least this long are sealed on worker threads, this many pieces (2 MiB) per
#: job, so that a large model neither blocks the event loop nor is copied whole; likewise,
#: once a frame being received has this many bytes, its further full pieces are opened on
#: worker threads, this many per job, straight into the frame.
THREAD_SEAL_MIN = 1 << 20
SEAL_BATCH = (2 << 20) // PIECE_MAX
THREAD_OPEN_MIN = THREAD_SEAL_MIN
OPEN_BATCH = SEAL_BATCH
#: Jobs of one channel and direction in flight at once, besides the one the event loop is
#: sending or filling (at most 6 MiB of records): enough to keep two cores busy. Jobs of
#: 2 MiB in twos were 5-10% faster on 2 cores than jobs of 1 MiB in threes (fewer hand-
#: overs of the GIL between the loop and the workers); 4 MiB ones a few % more, for twice
#: the memory.
PIPELINE = 2

_FLAGS = {MORE: bytes([MORE]), LAST: bytes([LAST])}
_TAG_SPACE = bytes(TAG_BYTES)

_T = TypeVar("_T")
_pool: ThreadPoolExecutor | None = None


def _in_pool(fn: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
    """Run ``fn(*args)`` on the record layer's threads, one per core (up to 8): the jobs
    spend their time in libsodium, without the GIL, and more threads than cores only queue
    for it (the event loop's default executor has cores + 4 threads: on 2 cores, jobs in
    6 threads sealed 10-20% slower than in 2)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2))
    return asyncio.get_running_loop().run_in_executor(_pool, fn, *args)


# The one way to lengthen a bytearray without writing its new bytes: a frame being received
# is given room for the rest up front, and libsodium writes each piece there once, on a
# worker thread (the first write to a page is a page fault, the costliest part of a copy
# into fresh memory: paid there without the GIL), instead of opening pieces aside and the
# event loop copying them in.
_bytearray_resize = ctypes.pythonapi.PyByteArray_Resize
_bytearray_resize.argtypes = (ctypes.py_object, ctypes.c_ssize_t)
_bytearray_resize.restype = ctypes.c_int


def _resize(buffer: bytearray, size: int) -> None:
    """Set ``len(buffer)`` to ``size``; new bytes are not written (their values are
    undefined until written). BufferError while a view of ``buffer`` exists."""
    _bytearray_resize(buffer, size)


class Channel:
    """One link's two directions: ``send`` seals a frame's pieces, ``take`` (``open`` in
    the handshake) takes one record and returns a frame when its last piece has arrived
    (ProtocolError on any record that does not authenticate or any framing error: the
    link must close).

    Large frames go through worker threads, in 2 MiB jobs, two at a time: a sender's
    pieces are sealed while the records before them are sent, and a receiver's full
    pieces are opened, straight into the frame, while the records after them arrive. The
    records are exactly those of sealing piece after piece (the nonces are the same
    counters, taken in order), and the checks and reasons those of ``open``."""

    def __init__(self, ws: AnyWebSocket, ours: bytes, theirs: bytes, keys: tuple[bytes, bytes],
                 cap: int = HANDSHAKE_FRAME_MAX) -> None:
        self.ws = ws
        #: Our ephemeral public key and the peer's: the hellos' nonce and echo.
        self.ours = ours
        self.theirs = theirs
        tx, rx = keys
        self._sealer = Sealer(tx)
        self._opener = Opener(rx)
        self._pieces = Reassembler(cap)
        #: The frame whose pieces ``take`` opens on worker threads (detached from the
        #: reassembler, its length the room it has) and where its next piece goes.
        self._frame: bytearray | None = None
        self._end = 0
        #: Pieces taken but not yet handed to a job (each record with what
        #: ``Opener.reserve`` took for it), and the jobs, in order.
        self._batch: list[tuple[bytes | bytearray, tuple[int, bytes, bytes]]] = []
        self._jobs: deque[asyncio.Future[ProtocolError | None]] = deque()

    def admit(self, cap: int) -> None:
        """The peer is admitted: frames may now be up to ``cap`` bytes."""
        self._pieces = Reassembler(cap)

    # -- receiving --------------------------------------------------------------------

    def open(self, record: bytes | bytearray) -> bytearray | None:
        """Decrypt ``record`` and feed its piece, on this thread; the frame once complete."""
        if self._frame is not None:
            raise RuntimeError("Channel.open while take has a frame's pieces in flight")
        if len(record) > RECORD_MAX:
            raise ProtocolError(f"record of {len(record)} bytes (at most {RECORD_MAX})")
        return self._pieces.feed(self._opener.open(record))

    async def take(self, record: bytes | bytearray) -> bytearray | None:
        """``open`` for a running link: the frame ``record`` completes, if any, with the
        same checks and reasons, raised in the order of the records.

        A full piece that continues a frame past its first MiB (its flag, peeked, says
        more follow) is opened on a worker thread, with the others of its 2 MiB job,
        straight into the frame; every other record is opened here, once the pieces before
        it are in. So ``take`` returns None for a record still being opened only when
        more pieces of its frame must follow; a failure among such records is raised by a
        later ``take``, at the latest the one of the frame's last piece. Cancelled, it
        drops what is in flight."""
        try:
            return await self._take(record)
        except asyncio.CancelledError:
            self._drop()
            raise

    async def _take(self, record: bytes | bytearray) -> bytearray | None:
        while self._jobs and self._jobs[0].done():
            self._settle(self._jobs.popleft().result())
        if self._parallel(record):
            frame = self._frame if self._frame is not None else self._detach()
            if self._end + PIECE_MAX > len(frame):
                await self._grow(frame)
            self._batch.append((record, self._opener.reserve()))
            self._end += PIECE_MAX
            if len(self._batch) == OPEN_BATCH:
                self._start_job()
                while len(self._jobs) > PIPELINE:
                    self._settle(await self._jobs.popleft())
            return None
        await self._attach()
        return self.open(record)

    def _drop(self) -> None:
        """Give up the frame whose pieces are being opened (a record failed, or ``take``
        was cancelled): cancel the jobs not started, and let those running finish into a
        frame nobody reads. Nothing after it can be read from this channel."""
        for job in self._jobs:
            job.cancel()
        self._jobs.clear()
        self._batch = []
        self._frame = None

    def _parallel(self, record: bytes | bytearray) -> bool:
        """Whether ``record`` may be opened on a worker thread: a full piece, not the
        last, of a frame past its first MiB and still within the cap."""
        if len(record) != RECORD_MAX:
            return False
        so_far = self._pieces.joined if self._frame is None else self._end
        return (THREAD_OPEN_MIN <= so_far <= self._pieces.limit - PIECE_MAX
                and self._opener.peek(record) == MORE)

    def _detach(self) -> bytearray:
        """Take the frame in progress from the reassembler and give it room for the rest:
        what it announces (an envelope's header), else twice what it has, within the cap."""
        frame = self._pieces.detach()
        self._end = len(frame)
        announced = announced_length(frame) or 0
        room = announced if self._end < announced <= self._pieces.limit else 2 * self._end
        _resize(frame, min(room, self._pieces.limit))
        self._frame = frame
        return frame

    async def _grow(self, frame: bytearray) -> None:
        """The frame outgrew its room: double it, once no job is writing into it."""
        while self._jobs:
            self._settle(await self._jobs.popleft())
        _resize(frame, min(2 * len(frame), self._pieces.limit))

    async def _attach(self) -> None:
        """Open the pieces taken so far and give the frame back to the reassembler."""
        if self._frame is None:
            return
        if self._batch:
            self._start_job()
        while self._jobs:
            self._settle(await self._jobs.popleft())
        frame, self._frame = self._frame, None
        _resize(frame, self._end)
        self._pieces.attach(frame)

    def _start_job(self) -> None:
        assert self._frame is not None
        batch, self._batch = self._batch, []
        at = self._end - len(batch) * PIECE_MAX
        self._jobs.append(_in_pool(_open_pieces, self._frame, at, batch))

    def _settle(self, failure: ProtocolError | None) -> None:
        if failure is not None:
            self._drop()
            raise failure

    async def receive_frame(self) -> bytearray:
        """The next whole frame (handshake and pairing use; a running link reads in the
        transport's loop). ConnectionError if the peer closes."""
        while True:
            frame = self.open(await _receive_binary(self.ws))
            if frame is not None:
                return frame

    # -- sending ----------------------------------------------------------------------

    def seal(self, pieces: Iterable[bytes]) -> list[bytes]:
        """The records of ``pieces``, in order (one sender at a time: the counter)."""
        return [self._sealer.seal(piece) for piece in pieces]

    async def send(self, frame: bytes | bytearray) -> None:
        """Send ``frame`` as sealed pieces, in order. Callers serialise their sends (the
        link's writer task, or the handshake before the writer starts)."""
        if len(frame) < THREAD_SEAL_MIN:
            for record in self.seal(split(frame)):
                await self.ws.send_bytes(record)
            return
        view = memoryview(frame).cast("B")
        step = SEAL_BATCH * PIECE_MAX
        jobs: deque[asyncio.Future[list[memoryview]]] = deque()
        try:
            for start in range(0, view.nbytes, step):
                part = view[start:start + step]
                taken = [self._sealer.reserve() for _ in range(0, part.nbytes, PIECE_MAX)]
                last = start + step >= view.nbytes
                jobs.append(_in_pool(_seal_pieces, part, last, taken))
                if len(jobs) >= PIPELINE:
                    await self._send_records(await jobs.popleft())
            while jobs:
                await self._send_records(await jobs.popleft())
        finally:
            for job in jobs:
                job.cancel()

    async def _send_records(self, records: list[memoryview]) -> None:
        for record in records:
            # aiohttp takes any bytes-like message (it checks bytes | bytearray |
            # memoryview), though it annotates bytes.
            await self.ws.send_bytes(cast(bytes, record))

    @property
    def records(self) -> tuple[int, int]:
        """Records sent and received so far (received: taken, if still being opened)."""
        return self._sealer.records, self._opener.records


def _seal_pieces(part: memoryview, last: bool,
                 taken: list[tuple[int, bytes, bytes]]) -> list[memoryview]:
    """The records of a part of a frame cut on piece boundaries (a worker thread's job).
    The pieces are copied once, each with its flag before it and room for its tag after
    it, into one buffer, where each is sealed in place; the records are views of it. Only
    the frame's last part ends with a ``LAST`` piece."""
    chunks: list[bytes | memoryview] = []
    for i in range(len(taken)):
        flag = LAST if last and i == len(taken) - 1 else MORE
        chunks += (_FLAGS[flag], part[i * PIECE_MAX:(i + 1) * PIECE_MAX], _TAG_SPACE)
    buffer = memoryview(bytearray().join(chunks))
    records = []
    for i, (_, key, nonce) in enumerate(taken):
        record = buffer[i * RECORD_MAX:(i + 1) * RECORD_MAX]
        seal_into(record, key, nonce)
        records.append(record)
    return records


def _open_pieces(frame: bytearray, at: int,
                 batch: list[tuple[bytes | bytearray, tuple[int, bytes, bytes]]]
                 ) -> ProtocolError | None:
    """Open full ``MORE`` pieces into ``frame`` from offset ``at`` (a worker thread's job).
    Each piece but the first is opened in place, over the last byte of the one before (its
    flag lands there, is checked, and that byte is put back); the first, whose byte before
    is another job's, is opened aside and copied. The first failure is returned, not
    raised: a job nobody waits for must not log an error."""
    first = bytearray(PIECE_MAX + 1)
    for i, (record, taken) in enumerate(batch):
        where = at + i * PIECE_MAX
        try:
            if i == 0:
                open_into(first, 0, record, taken)
                flag = first[0]
                memoryview(frame)[where:where + PIECE_MAX] = memoryview(first)[1:]
            else:
                kept = frame[where - 1]
                open_into(frame, where - 1, record, taken)
                flag, frame[where - 1] = frame[where - 1], kept
        except ProtocolError as exc:
            return exc
        if flag != MORE:  # the peek said MORE: an authentic record cannot differ
            return ProtocolError(f"bad piece flag 0x{flag:02x}")
    return None


async def open_dialer(ws: AnyWebSocket) -> Channel:
    """The dialer's side of the key exchange: send ours, take the acceptor's."""
    ephemeral = Ephemeral.generate()
    await ws.send_bytes(ephemeral.public)
    theirs = await _receive_key(ws)
    keys = session_keys(ephemeral, theirs, dialer=True)
    return Channel(ws, ephemeral.public, theirs, keys)


async def open_acceptor(ws: AnyWebSocket) -> Channel:
    """The acceptor's side of the key exchange: take the dialer's key, send ours."""
    theirs = await _receive_key(ws)
    ephemeral = Ephemeral.generate()
    keys = session_keys(ephemeral, theirs, dialer=False)
    await ws.send_bytes(ephemeral.public)
    return Channel(ws, ephemeral.public, theirs, keys)


async def _receive_key(ws: AnyWebSocket) -> bytes:
    data = await _receive_binary(ws)
    if len(data) != PUBLIC_BYTES:
        raise ProtocolError(f"expected a 32-byte ephemeral key, got {len(data)} bytes (the"
                            " peer does not speak link protocol 2)")
    return data


async def _receive_binary(ws: AnyWebSocket) -> bytes:
    msg = await ws.receive()
    if msg.type == WSMsgType.BINARY:
        data: bytes = msg.data
        return data
    if msg.type == WSMsgType.TEXT:
        raise ProtocolError("text frame on a peer link")
    if msg.type == WSMsgType.ERROR:
        raise ProtocolError(f"websocket error ({msg.data})")
    raise ConnectionError("link closed during handshake")

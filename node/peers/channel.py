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
from collections.abc import Iterable

from aiohttp import WSMsgType

from node.common.wsclose import AnyWebSocket
from protocol.errors import ProtocolError
from protocol.linkcrypto import PUBLIC_BYTES, TAG_BYTES, Ephemeral, Opener, Sealer, session_keys
from protocol.pieces import HANDSHAKE_FRAME_MAX, PIECE_MAX, WS_MESSAGE_MAX, Reassembler, split

#: The longest WebSocket message on a link: a sealed piece.
RECORD_MAX = WS_MESSAGE_MAX + TAG_BYTES
#: The ``max_msg_size`` to give aiohttp (it refuses a message of exactly its limit).
WS_LIMIT = RECORD_MAX + 1
#: Frames at least this long are sealed on a worker thread, this many pieces at a time
#: (1 MiB), so that a large model neither blocks the event loop nor is copied whole.
THREAD_SEAL_MIN = 1 << 20
SEAL_BATCH = (1 << 20) // PIECE_MAX


class Channel:
    """One link's two directions: ``send`` seals a frame's pieces, ``open`` takes one
    record and returns a frame when its last piece has arrived (ProtocolError on any
    record that does not authenticate or any framing error: the link must close)."""

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

    def admit(self, cap: int) -> None:
        """The peer is admitted: frames may now be up to ``cap`` bytes."""
        self._pieces = Reassembler(cap)

    # -- receiving --------------------------------------------------------------------

    def open(self, record: bytes) -> bytearray | None:
        """Decrypt ``record`` and feed its piece; the frame once complete."""
        if len(record) > RECORD_MAX:
            raise ProtocolError(f"record of {len(record)} bytes (at most {RECORD_MAX})")
        return self._pieces.feed(self._opener.open(record))

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
        view = memoryview(frame)
        step = SEAL_BATCH * PIECE_MAX
        for start in range(0, len(frame), step):
            chunk = view[start:start + step]
            last = start + step >= len(frame)
            records = await asyncio.to_thread(self.seal, _pieces_of(chunk, last))
            for record in records:
                await self.ws.send_bytes(record)

    @property
    def records(self) -> tuple[int, int]:
        """Records sent and received so far."""
        return self._sealer.records, self._opener.records


def _pieces_of(chunk: memoryview, last: bool) -> list[bytes]:
    """The pieces of a part of a frame, cut on piece boundaries; only the frame's last
    part ends with a last piece."""
    pieces = list(split(chunk))
    if not last:
        pieces[-1] = bytes([0x00]) + pieces[-1][1:]
    return pieces


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

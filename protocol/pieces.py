"""Link framing: a frame travels as pieces of at most 64 KiB, one WebSocket message each.

A piece is one flag byte, ``MORE`` (0x00: more pieces of this frame follow) or ``LAST``
(0x01), then 1 to ``PIECE_MAX`` bytes of the frame (docs/protocol.md section 1). Splitting
keeps every WebSocket message small, so a receiver can refuse a large message at its
header before a peer is admitted (the handshake needs about a kilobyte) and grant the
full ``max_message_size`` only to an admitted link: the limit is the reassembler's, and
it can change when the handshake is done, while the WebSocket library's cannot.
"""

from __future__ import annotations

from collections.abc import Iterator

from protocol.errors import ProtocolError

#: Largest number of frame bytes in one piece.
PIECE_MAX = 65536
#: Largest WebSocket message on a link (a full piece and its flag byte).
WS_MESSAGE_MAX = PIECE_MAX + 1
MORE = 0x00
LAST = 0x01
#: Largest frame a node takes before the handshake is done (a hello is about 300 bytes).
HANDSHAKE_FRAME_MAX = 16384


def split(frame: bytes | bytearray | memoryview) -> Iterator[bytes]:
    """The pieces of ``frame``, in order (each one WebSocket binary message)."""
    view = memoryview(frame).cast("B")
    if view.nbytes == 0:
        raise ValueError("an empty frame has no pieces")
    last = (view.nbytes - 1) // PIECE_MAX * PIECE_MAX
    for start in range(0, view.nbytes, PIECE_MAX):
        flag = b"\x01" if start == last else b"\x00"
        yield flag + view[start:start + PIECE_MAX]


class Reassembler:
    """Joins pieces back into frames, refusing any frame longer than ``limit`` as soon as
    the piece that crosses it arrives (``limit`` may be raised between frames)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, piece: bytes) -> bytearray | None:
        """The complete frame if ``piece`` ends one, else None; ProtocolError if the
        piece is malformed or the frame too long (the link is then unusable)."""
        if not 2 <= len(piece) <= WS_MESSAGE_MAX:
            raise ProtocolError(f"piece of {len(piece)} bytes (1 flag byte and 1 to"
                                f" {PIECE_MAX} frame bytes expected)")
        flag = piece[0]
        if flag not in (MORE, LAST):
            hint = " (a whole frame: the peer does not split frames into pieces)" \
                if flag == 0x92 else ""
            raise ProtocolError(f"bad piece flag 0x{flag:02x}{hint}")
        if len(self._buffer) + len(piece) - 1 > self.limit:
            raise ProtocolError(f"message exceeds the cap of {self.limit} bytes")
        if flag == MORE and len(piece) - 1 != PIECE_MAX:
            raise ProtocolError("a piece other than the last one must be full")
        if flag == LAST and not self._buffer:
            return bytearray(memoryview(piece)[1:])
        self._buffer += memoryview(piece)[1:]
        if flag == MORE:
            return None
        frame, self._buffer = self._buffer, bytearray()
        return frame

    @property
    def joined(self) -> int:
        """Bytes of the frame in progress joined so far (0 between frames)."""
        return len(self._buffer)

    def detach(self) -> bytearray:
        """Hand over the frame in progress, its bytes so far, to be continued elsewhere
        (node.peers.channel opens whole pieces straight into it on worker threads); this
        reassembler holds nothing until ``attach``."""
        buffer, self._buffer = self._buffer, bytearray()
        return buffer

    def attach(self, buffer: bytearray) -> None:
        """Take back the frame in progress, ``buffer`` its bytes so far: the detached one
        continued with whole ``MORE`` pieces (checked elsewhere), within the cap."""
        if self._buffer or len(buffer) % PIECE_MAX or len(buffer) > self.limit:
            raise ValueError("attach takes a frame of whole pieces within the cap")
        self._buffer = buffer

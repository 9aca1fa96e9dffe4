"""Link framing (protocol.pieces; docs/protocol.md section 1): a frame travels as pieces of
at most 64 KiB, and the reassembler refuses a frame over its cap at the piece that
crosses it, before the rest arrives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol.errors import ProtocolError
from protocol.pieces import (
    HANDSHAKE_FRAME_MAX,
    PIECE_MAX,
    WS_MESSAGE_MAX,
    Reassembler,
    split,
)

from .test_envelope import WORKED_EXAMPLE_HEX

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.mark.parametrize("size", [1, 207, PIECE_MAX - 1, PIECE_MAX, PIECE_MAX + 1,
                                  3 * PIECE_MAX, 3 * PIECE_MAX + 17])
def test_pieces_join_back_into_the_frame(size):
    frame = bytes(i % 251 for i in range(size))
    pieces = list(split(frame))
    assert len(pieces) == -(-size // PIECE_MAX)
    assert all(len(p) <= WS_MESSAGE_MAX for p in pieces)
    assert [p[0] for p in pieces] == [0] * (len(pieces) - 1) + [1]
    assert all(len(p) == WS_MESSAGE_MAX for p in pieces[:-1])
    joiner = Reassembler(max(size, 3))
    out = [joiner.feed(p) for p in pieces]
    assert out[:-1] == [None] * (len(pieces) - 1)
    assert out[-1] == frame
    # the reassembler is ready for the next frame
    assert [joiner.feed(p) for p in split(b"xyz")] == [b"xyz"]


def test_the_worked_example_is_one_piece_its_flag_then_its_bytes():
    frame = bytes.fromhex(WORKED_EXAMPLE_HEX)
    assert list(split(frame)) == [b"\x01" + frame]


def test_a_frame_over_the_cap_is_refused_at_the_piece_that_crosses_it():
    joiner = Reassembler(2 * PIECE_MAX)
    pieces = split(bytes(5 * PIECE_MAX))
    assert joiner.feed(next(pieces)) is None
    assert joiner.feed(next(pieces)) is None
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        joiner.feed(next(pieces))


def test_before_the_handshake_a_single_full_piece_is_already_too_much():
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        Reassembler(HANDSHAKE_FRAME_MAX).feed(b"\x00" + bytes(PIECE_MAX))


@pytest.mark.parametrize("piece, reason", [
    (b"", "piece of 0 bytes"),
    (b"\x01", "piece of 1 bytes"),
    (b"\x01" + bytes(PIECE_MAX + 1), f"piece of {PIECE_MAX + 2} bytes"),
    (b"\x02abc", "bad piece flag 0x02"),
    (b"\x92\xc4\x01x", "bad piece flag 0x92 (a whole frame"),
    (b"\x00abc", "a piece other than the last one must be full"),
])
def test_malformed_pieces_are_refused_with_a_reason(piece, reason):
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        Reassembler(1 << 20).feed(piece)


def test_the_limit_may_be_raised_between_frames():
    joiner = Reassembler(HANDSHAKE_FRAME_MAX)
    assert joiner.feed(b"\x01hello") == b"hello"
    joiner.limit = 4 * PIECE_MAX
    big = bytes(2 * PIECE_MAX + 5)
    assert [joiner.feed(p) for p in split(big)][-1] == big


def test_the_document_states_the_same_limits():
    text = DOCS.read_text()
    section = text[text.index("## 1. Transport"):text.index("## 2. Frame layout")]
    assert "65 536" in section and f"{PIECE_MAX:,}".replace(",", " ") == "65 536"
    assert "65 537" in section and WS_MESSAGE_MAX == 65537
    assert "16 384" in section and HANDSHAKE_FRAME_MAX == 16384

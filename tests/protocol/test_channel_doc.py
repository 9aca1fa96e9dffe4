"""docs/protocol.md prints the channel's vectors (section 14) and the limits of section 1
as the code has them: a second implementation is written from that text."""

from __future__ import annotations

import re
from pathlib import Path

from node.peers.channel import RECORD_MAX
from protocol.envelope import encode
from protocol.identity import Identity
from protocol.linkcrypto import REKEY_CONTEXT, REKEY_RECORDS
from protocol.messages import NONCE_LEN, GenesisRequest, PairRefuse

from . import test_linkcrypto as vectors

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _text() -> str:
    return DOCS.read_text()


def _joined(after: str) -> str:
    """The hex string printed in backquoted parts right after ``after``."""
    text = _text()
    tail = text[text.index(after) + len(after):]
    parts = re.match(r"[^`]*((?:`[0-9a-f]+`\s*)+)", tail)
    assert parts, after
    return "".join(re.findall(r"`([0-9a-f]+)`", parts.group(1)))


def test_the_channel_vectors_are_the_tested_ones():
    text = _text()
    for name in ("DIALER_PUBLIC", "ACCEPTOR_PUBLIC", "DIALER_SEND", "ACCEPTOR_SEND",
                 "NEXT_OF_ZERO_KEY"):
        assert getattr(vectors, name) in text, name
    for record in vectors.RECORDS:
        assert f"`{record}`" in text


def test_the_pair_refuse_vector():
    frame = bytes(encode(Identity.from_seed(bytes(32)), PairRefuse("pairing token expired"),
                         seq=1, ts_ms=1_700_000_000_000, federation="demo"))
    assert _joined('federation `"demo"`, 190 bytes:') == frame.hex()
    assert len(frame) == 190


def test_the_genesis_request_vector():
    frame = bytes(encode(Identity.from_seed(bytes(32)), GenesisRequest(), seq=1,
                         ts_ms=1_700_000_000_000, federation="demo"))
    assert _joined('federation `"demo"`, 165 bytes:') == frame.hex()


def test_the_documented_limits_are_the_code_s():
    text = _text()
    assert f"at most **{RECORD_MAX:,}** bytes".replace(",", " ") in text
    assert f"After 2^{REKEY_RECORDS.bit_length() - 1} (" in text
    assert f'"{REKEY_CONTEXT.decode()}"' in text
    assert f"exactly {NONCE_LEN} bytes: the sender's ephemeral public key" in text

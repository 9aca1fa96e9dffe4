"""The key agreement and record layer of encrypted links (protocol.linkcrypto; issue 13):
matching keys on both sides, records that open only once, in order, unaltered, on their
own link; fixed vectors from seeded key pairs."""

from __future__ import annotations

import hashlib

import pytest

from protocol import linkcrypto
from protocol.errors import ProtocolError
from protocol.linkcrypto import Ephemeral, Opener, Sealer, next_key, session_keys

DIALER = Ephemeral.from_seed(bytes(32))
ACCEPTOR = Ephemeral.from_seed(bytes([1]) * 32)

# Vectors (libsodium crypto_kx, XChaCha20-Poly1305 IETF, BLAKE2b), for docs/protocol.md.
DIALER_PUBLIC = "557e23d7346f213ec5a23713b2a2497eef35354d5b52088ac6a5993a5fdb091e"
ACCEPTOR_PUBLIC = "ab2fca32898322c208fb2dab5048bd43c355c6430f588897cb574961cfa9806f"
DIALER_SEND = "cb77fbb99a88735dd9c07ff1ed00c509cd6643016f4376beb18f49eb1424dea8"
ACCEPTOR_SEND = "0ca5d27868e7ed3b87f75b1764984cd4ff8f327a2107de4ffbac6ee667b2a5e9"
RECORDS = ["7392e9e9330034df225fb03a9d4316e4139048e09c3af3",
           "66f6c60e5ac3ef2eba206022211c10392d906f8153eda4"]
NEXT_OF_ZERO_KEY = "cf6dfa11085dbbbcce5ba90321655d30fa3c0679acc9985b472f148d7f882e8f"


def _pair() -> tuple[Sealer, Opener, Sealer, Opener]:
    """(dialer's sealer, acceptor's opener, acceptor's sealer, dialer's opener)."""
    d_tx, d_rx = session_keys(DIALER, ACCEPTOR.public, dialer=True)
    a_tx, a_rx = session_keys(ACCEPTOR, DIALER.public, dialer=False)
    return Sealer(d_tx), Opener(a_rx), Sealer(a_tx), Opener(d_rx)


def test_the_vectors():
    assert DIALER.public.hex() == DIALER_PUBLIC and ACCEPTOR.public.hex() == ACCEPTOR_PUBLIC
    d_tx, d_rx = session_keys(DIALER, ACCEPTOR.public, dialer=True)
    assert d_tx.hex() == DIALER_SEND and d_rx.hex() == ACCEPTOR_SEND
    sealer = Sealer(d_tx)
    assert [sealer.seal(b"fl-node").hex() for _ in RECORDS] == RECORDS
    assert next_key(bytes(32)).hex() == NEXT_OF_ZERO_KEY
    # the rekey is plain keyed BLAKE2b-256, as any library computes it
    assert NEXT_OF_ZERO_KEY == hashlib.blake2b(b"fl-node/v2/rekey", key=bytes(32),
                                               digest_size=32).hexdigest()


def test_both_sides_agree_and_each_direction_has_its_own_key():
    d_seal, a_open, a_seal, d_open = _pair()
    for i in range(5):
        assert a_open.open(d_seal.seal(b"to the acceptor %d" % i)) == b"to the acceptor %d" % i
        assert d_open.open(a_seal.seal(b"to the dialer %d" % i)) == b"to the dialer %d" % i
    # a record sent one way does not open as the other way's
    d_seal, a_open, a_seal, d_open = _pair()
    with pytest.raises(ProtocolError, match="does not authenticate"):
        d_open.open(d_seal.seal(b"reflected"))


@pytest.mark.parametrize("attack", ["altered", "replayed", "reordered", "dropped",
                                    "truncated"])
def test_a_record_opens_only_once_in_order_and_unaltered(attack):
    d_seal, a_open, _, _ = _pair()
    records = [d_seal.seal(b"record %d" % i) for i in range(3)]
    assert a_open.open(records[0]) == b"record 0"
    if attack == "altered":
        bad = bytearray(records[1])
        bad[3] ^= 1
        received = bytes(bad)
    elif attack == "replayed":
        received = records[0]
    elif attack in ("reordered", "dropped"):
        received = records[2]
    else:
        received = records[1][:-1]
    with pytest.raises(ProtocolError, match="does not authenticate"):
        a_open.open(received)


def test_a_man_in_the_middle_with_its_own_ephemeral_key_gets_other_keys():
    mallory = Ephemeral.from_seed(bytes([2]) * 32)
    d_tx, _ = session_keys(DIALER, mallory.public, dialer=True)  # D thinks it talks to A
    _, a_rx = session_keys(ACCEPTOR, mallory.public, dialer=False)
    with pytest.raises(ProtocolError):
        Opener(a_rx).open(Sealer(d_tx).seal(b"secret"))


@pytest.mark.parametrize("key", [bytes(32), b"\x01" + bytes(31), bytes(31)])
def test_low_order_or_short_ephemeral_keys_are_refused(key):
    with pytest.raises(ProtocolError):
        session_keys(DIALER, key, dialer=True)


def test_keys_change_every_rekey_interval_on_both_sides(monkeypatch):
    monkeypatch.setattr(linkcrypto, "REKEY_RECORDS", 4)
    d_seal, a_open, _, _ = _pair()
    records = [d_seal.seal(b"x") for _ in range(10)]
    assert [a_open.open(r) for r in records] == [b"x"] * 10
    # record 4 is sealed under the next key, with the counter back at 0
    key = next_key(bytes.fromhex(DIALER_SEND))
    assert Opener(key).open(records[4]) == b"x"
    assert d_seal.records == a_open.records == 10


def test_fresh_ephemerals_differ():
    assert Ephemeral.generate().public != Ephemeral.generate().public
    e = Ephemeral.generate()
    assert e.secret.hex() not in repr(e) and repr(e.secret) not in repr(e)


# -- the in-place primitives the pipelined channel uses (node.peers.channel) ------------


def test_seal_into_writes_the_record_seal_makes(monkeypatch):
    monkeypatch.setattr(linkcrypto, "REKEY_RECORDS", 3)  # reserve follows the rekeys too
    d_tx, _ = session_keys(DIALER, ACCEPTOR.public, dialer=True)
    sealer, reserved = Sealer(d_tx), Sealer(d_tx)
    for i, size in enumerate([0, 1, 7, 65537, 100, 65537, 3]):
        plaintext = bytes((i + j) % 256 for j in range(size))
        record = bytearray(plaintext + bytes(linkcrypto.TAG_BYTES))
        number, key, nonce = reserved.reserve()
        linkcrypto.seal_into(memoryview(record), key, nonce)
        assert number == i
        assert bytes(record) == sealer.seal(plaintext)
    assert reserved.records == sealer.records == 7
    assert [reserved.seal(b"x")] == [sealer.seal(b"x")]  # the counters stayed in step


def test_open_into_opens_what_open_opens_with_the_same_reasons(monkeypatch):
    monkeypatch.setattr(linkcrypto, "REKEY_RECORDS", 3)
    d_seal, a_open, _, _ = _pair()
    d_tx, _ = session_keys(DIALER, ACCEPTOR.public, dialer=True)
    reserved = Opener(d_tx)
    records = [d_seal.seal(b"piece %d" % i) for i in range(7)]
    for i, record in enumerate(records):
        out = bytearray(b"<" + bytes(40) + b">")
        linkcrypto.open_into(out, 1, record, reserved.reserve())
        assert bytes(out[1:1 + len(record) - 16]) == a_open.open(record) == b"piece %d" % i
        assert out[0:1] == b"<" and out[-1:] == b">"  # nothing written outside its place
    bad = bytearray(d_seal.seal(b"next"))
    bad[5] ^= 1
    with pytest.raises(ProtocolError) as sequential:
        a_open.open(bytes(bad))
    with pytest.raises(ProtocolError) as in_place:
        linkcrypto.open_into(bytearray(64), 0, bytes(bad), reserved.reserve())
    assert in_place.value.reason == sequential.value.reason == (
        "record 7 does not authenticate (altered, replayed, reordered or from another link)")
    with pytest.raises(ProtocolError, match=r"record of 10 bytes \(at least 16 expected\)"):
        linkcrypto.open_into(bytearray(64), 0, bytes(10), reserved.reserve())
    with pytest.raises(ValueError):
        linkcrypto.open_into(bytearray(3), 0, records[0], (0, d_tx, bytes(24)))


def test_peek_is_the_first_plaintext_byte_of_the_next_record_and_takes_nothing():
    d_seal, a_open, _, _ = _pair()
    for first in (0x00, 0x01, 0x92, 0xFF):
        record = d_seal.seal(bytes([first]) + b"rest of the piece")
        assert a_open.peek(record) == first
        assert a_open.peek(record) == first  # still the next record
        assert a_open.open(record)[0] == first
    assert a_open.peek(b"") == -1

"""Signed envelopes: every message type survives the trip, and the frame is plain msgpack."""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import msgpack
import pytest

from protocol.envelope import DOMAIN, PROTOCOL_VERSION, decode, encode
from protocol.identity import Identity, verify
from protocol.messages import Heartbeat, Hello, Model, Update
from protocol.tensors import Tensor, weights_digest

from .wire import FED, TS, f32, identity

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

ALL_DTYPES = [
    Tensor("f32", "float32", (2, 2), struct.pack("<4f", 1.0, -2.0, 3.5, 0.0)),
    Tensor("f64", "float64", (1,), struct.pack("<d", 3.141592653589793)),
    Tensor("f16", "float16", (3,), struct.pack("<3e", 1.0, 0.5, -0.25)),
    Tensor("i64", "int64", (2,), struct.pack("<2q", -1, 2**62)),
    Tensor("i32", "int32", (1, 1, 1), struct.pack("<i", -7)),
    Tensor("i16", "int16", (2,), struct.pack("<2h", 1, -1)),
    Tensor("i8", "int8", (3,), bytes([1, 255, 128])),
    Tensor("u8", "uint8", (0,), b""),
    Tensor("flag", "bool", (2,), b"\x00\x01"),
    Tensor("scalar", "float32", (), struct.pack("<f", 42.0)),
]


def _messages() -> list:
    agg = identity(1).public_key
    model_weights = [f32("w", [0.25, 0.5, 0.75]), f32("b", [1.0])]
    return [
        Hello(name="alice", nonce=bytes(range(32)), echo=bytes(32), port=7700,
              genesis=b"\x11" * 32, round=3),
        Hello(name="bob", nonce=b"\x22" * 32, echo=b"\x44" * 32, port=0, genesis=b"\x33" * 32, round=0),
        Update(round=4, attempt=1, base=b"\x44" * 32, num_examples=128, loss=0.125,
               train_seconds=2.5, weights=ALL_DTYPES),
        Model(round=4, attempt=0, aggregator=agg, contributors=(agg, identity(2).public_key),
              num_examples=256, digest=weights_digest(model_weights), weights=model_weights),
        Heartbeat(round=4, state="waiting_model", ping_ts=TS, echo_ts=TS - 15),
    ]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_every_message_type_survives_encode_and_decode(message):
    ident = identity(1)
    frame = encode(ident, message, seq=42, ts_ms=TS, federation=FED)
    env = decode(bytes(frame))
    assert env.message == message
    assert env.type == message.TYPE
    assert env.sender == ident.public_key
    assert (env.version, env.seq, env.ts_ms, env.federation) == (PROTOCOL_VERSION, 42, TS, FED)
    assert env.size == len(frame)


def test_tensors_of_every_allowed_dtype_keep_name_dtype_shape_and_bytes():
    frame = encode(identity(1), _messages()[2], seq=1, ts_ms=TS, federation=FED)
    got = decode(frame).message.weights
    assert [(t.name, t.dtype, t.shape, bytes(t.data)) for t in got] == [
        (t.name, t.dtype, t.shape, bytes(t.data)) for t in ALL_DTYPES]


@pytest.mark.parametrize("nbytes", [64 * 1024, 5 * 1024 * 1024])
def test_large_tensors_survive_the_zero_copy_and_parallel_hash_paths(nbytes):
    data = bytes(range(256)) * (nbytes // 256)
    weights = [Tensor("big", "uint8", (len(data),), memoryview(data))]
    model = Model(round=1, attempt=0, aggregator=identity(1).public_key, contributors=(),
                  num_examples=1, digest=weights_digest(weights), weights=weights)
    env = decode(encode(identity(1), model, seq=1, ts_ms=TS, federation=FED))
    assert bytes(env.message.weights[0].data) == data
    assert weights_digest(env.message.weights) == model.digest


def test_decode_accepts_bytes_bytearray_and_memoryview():
    frame = encode(identity(1), _messages()[4], seq=1, ts_ms=TS, federation=FED)
    for form in (bytes(frame), bytearray(frame), memoryview(bytes(frame))):
        assert decode(form).message == _messages()[4]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_a_frame_is_plain_msgpack_an_array_of_payload_and_64_byte_signature(message):
    ident = identity(1)
    frame = bytes(encode(ident, message, seq=7, ts_ms=TS, federation=FED))
    outer = msgpack.unpackb(frame)
    assert isinstance(outer, list) and len(outer) == 2
    payload, signature = outer
    assert isinstance(payload, bytes) and isinstance(signature, bytes)
    assert len(signature) == 64
    # the signature is Ed25519 over DOMAIN || SHA-256(payload bytes)
    verify(ident.public_key, DOMAIN + hashlib.sha256(payload).digest(), signature)
    inner = msgpack.unpackb(payload)
    assert inner["v"] == 1 and inner["type"] == message.TYPE
    assert inner["from"] == ident.public_key and inner["seq"] == 7 and inner["ts"] == TS
    assert inner["fed"] == FED and inner["body"] == msgpack.unpackb(
        msgpack.packb(message.to_body(), use_bin_type=True))


def test_a_frame_packed_by_plain_msgpack_decodes_like_our_own():
    # A node written elsewhere packs with an ordinary msgpack library; widths may differ.
    ident = identity(2)
    message = _messages()[0]
    payload = msgpack.packb({"body": message.to_body(), "fed": FED, "from": ident.public_key,
                             "seq": 9, "ts": TS, "type": "hello", "v": 1}, use_bin_type=True)
    signature = ident.sign(DOMAIN + hashlib.sha256(payload).digest())
    # bin 16 for the payload header, as a library that always uses wide headers would
    frame = b"\x92\xc5" + struct.pack(">H", len(payload)) + payload + b"\xc4\x40" + signature
    assert decode(frame).message == message
    assert decode(msgpack.packb([payload, signature], use_bin_type=True)).message == message


def test_the_signature_input_is_the_domain_and_sha256_of_the_payload():
    assert DOMAIN == b"fl-node/v1/envelope\x00"


WORKED_EXAMPLE_HEX = (
    "92c48a87a17601a474797065a9686561727462656174a466726f6dc4203b6a27bcceb6a42d62a3a8d02a6f0d"
    "73653215771de243a63ac048a18b59da29a373657101a27473cf0000018bcfe56800a3666564a464656d6f"
    "a4626f647984a5726f756e6400a57374617465a8747261696e696e67a770696e675f7473cf0000018bcfe5"
    "6800a76563686f5f747300c440043e70826b2835f26cbb958c2f7ee14b56385ecf9dfaca060331c47877df"
    "7bb975642b569c365eb8f9f3128ce8561667763d99c0879456d184302e05c413f70a"
)


def test_the_worked_example_frame_is_reproducible_byte_for_byte():
    ident = Identity.from_seed(bytes(32))
    hb = Heartbeat(round=0, state="training", ping_ts=TS, echo_ts=0)
    frame = encode(ident, hb, seq=1, ts_ms=TS, federation="demo")
    assert bytes(frame).hex() == WORKED_EXAMPLE_HEX
    assert decode(bytes.fromhex(WORKED_EXAMPLE_HEX)).message == hb


def test_the_worked_example_in_the_docs_matches_the_code():
    text = DOCS.read_text()
    hex_in_docs = "".join(re.findall(r"^\s*([0-9a-f]{2}(?: [0-9a-f]{2})*)\s*(?:#.*)?$",
                                     _section(text, "Worked example"), re.M)).replace(" ", "")
    assert hex_in_docs == WORKED_EXAMPLE_HEX


def _section(text: str, title: str) -> str:
    heading = re.search(rf"^## (?:\d+\. )?{title}$", text, re.M)
    assert heading, f"docs/protocol.md has no section {title!r}"
    end = text.find("\n## ", heading.end())
    return text[heading.start():] if end < 0 else text[heading.start():end]

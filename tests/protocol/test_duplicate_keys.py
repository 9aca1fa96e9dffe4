"""No parser differentials: a msgpack map with a repeated key is refused at every depth
(docs/protocol.md, section 2.2), and the refused frame printed in section 14 is refused.

msgpack-python keeps the last value of a repeated key and other decoders keep the first,
so a signed frame with one would be two different messages to two implementations. The
frames here are signed exactly as protocol/envelope.py signs, so only the duplicate-key
rule can refuse them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

from protocol.envelope import DOMAIN, PROTOCOL_VERSION, decode, encode
from protocol.errors import ProtocolError
from protocol.identity import Identity, verify
from protocol.messages import Heartbeat, Relay

from .test_envelope import WORKED_EXAMPLE_HEX
from .wire import FED, TS, heartbeat_body, identity, sign_payload, tensor_map, update_body

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
SIGNER = identity(1)


class Pairs(list[tuple[Any, Any]]):
    """A map written as its (key, value) pairs, so a key may appear twice."""


class Raw(bytes):
    """Already packed msgpack, spliced in as is."""


def pack(obj: Any) -> bytes:
    """Plain msgpack, except that ``Pairs`` are packed in their order, repeats included."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if isinstance(obj, dict):
        obj = Pairs(obj.items())
    if isinstance(obj, Pairs):
        return _header(len(obj), 0x80, 0xDE) + b"".join(pack(k) + pack(v) for k, v in obj)
    if isinstance(obj, list):
        return _header(len(obj), 0x90, 0xDC) + b"".join(pack(v) for v in obj)
    return msgpack.packb(obj, use_bin_type=True)


def _header(n: int, fix: int, h16: int) -> bytes:
    return bytes((fix | n,)) if n < 16 else bytes((h16,)) + n.to_bytes(2, "big")


def payload_pairs(mtype: str, body: Any, *extra: tuple[Any, Any]) -> Pairs:
    return Pairs([("v", PROTOCOL_VERSION), ("type", mtype), ("from", SIGNER.public_key),
                  ("seq", 1), ("ts", TS), ("fed", FED), ("body", body), *extra])


def refusal(frame: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    return info.value.reason


def test_the_packer_writes_what_msgpack_writes():
    # guards every test below: without repeats, the frames are ordinary valid frames
    body = update_body()
    assert pack(body) == msgpack.packb(body, use_bin_type=True)
    assert decode(sign_payload(SIGNER, pack(payload_pairs("update", body)))).type == "update"


@pytest.mark.parametrize(("where", "mtype", "body", "extra", "key"), [
    ("payload", "heartbeat", heartbeat_body(), [("seq", 2)], "seq"),
    ("payload, the same value twice", "heartbeat", heartbeat_body(), [("seq", 1)], "seq"),
    ("payload, the signer twice", "heartbeat", heartbeat_body(),
     [("from", identity(2).public_key)], "from"),
    ("body", "heartbeat", Pairs([*heartbeat_body().items(), ("round", 1)]), [], "round"),
    ("tensor map inside the body's weights", "update",
     update_body(weights=[Pairs([*tensor_map().items(), ("name", "v")])]), [], "name"),
    ("a map inside a map", "update",
     {"outer": Pairs([("a", 1), ("a", 1)])}, [], "a"),
])
def test_a_repeated_key_at_any_depth_refuses_a_properly_signed_frame(
        where: str, mtype: str, body: Any, extra: list[tuple[Any, Any]], key: str) -> None:
    frame = sign_payload(SIGNER, pack(payload_pairs(mtype, body, *extra)))
    assert refusal(frame) == f"duplicate map key {key!r}"


def test_a_repeated_bin_key_is_refused_and_str_and_bin_keys_are_different_keys():
    frame = sign_payload(SIGNER, pack(payload_pairs(
        "heartbeat", Pairs([*heartbeat_body().items(), (b"k", 1), (b"k", 1)]))))
    assert refusal(frame) == "duplicate map key b'k'"
    # "round" and b"round" are two keys; the bin one is an unknown field of the body
    frame = sign_payload(SIGNER, pack(payload_pairs(
        "heartbeat", Pairs([*heartbeat_body().items(), (b"round", 1)]))))
    assert refusal(frame).startswith("heartbeat: bad fields")


def test_header_width_does_not_make_two_keys_different():
    body = pack(heartbeat_body())
    repeated = b"\x85" + body[1:] + b"\xd9\x05round" + b"\x01"  # str 8 header, not fixstr
    frame = sign_payload(SIGNER, pack(payload_pairs("heartbeat", Raw(repeated))))
    assert refusal(frame) == "duplicate map key 'round'"


def test_a_carried_frame_with_a_repeated_key_is_refused_when_it_is_decoded():
    inner = sign_payload(identity(2), pack(payload_pairs(
        "heartbeat", Pairs([*heartbeat_body().items(), ("state", "done")]))))
    relay = decode(bytes(encode(SIGNER, Relay(ttl=8, to=b"", frame=inner), seq=5, ts_ms=TS,
                                federation=FED)))
    assert isinstance(relay.message, Relay)
    assert refusal(relay.message.frame) == "duplicate map key 'state'"


# -- the vector of docs/protocol.md, section 14 ------------------------------------------


def build_vector() -> bytes:
    """The worked example's heartbeat with a fifth body entry repeating ``round`` (as 1)."""
    ident = Identity.from_seed(bytes(32))
    body = Pairs([*Heartbeat(round=0, state="training", ping_ts=TS,
                             echo_ts=0).to_body().items(), ("round", 1)])
    payload = Pairs([("v", 1), ("type", "heartbeat"), ("from", ident.public_key),
                     ("seq", 1), ("ts", TS), ("fed", "demo"), ("body", body)])
    return sign_payload(ident, pack(payload))


def vector_in_docs() -> bytes:
    text = re.sub(r"`\s*\n\s*`", "", DOCS.read_text())  # a hex split over lines is one
    section = text[text.index("## 14. Test vectors"):text.index("## 15. ")]
    found = re.search(r"must be refused\*\*.*?`([0-9a-f]{128,})`", section, re.S)
    assert found, "docs/protocol.md section 14 lost the frame that must be refused"
    return bytes.fromhex(found[1])


def test_the_docs_vector_is_the_documented_frame_and_is_validly_signed():
    frame = vector_in_docs()
    assert frame == build_vector() and len(frame) == 214
    assert frame[:3] == bytes.fromhex("92c491") and frame[-66:-64] == b"\xc4\x40"
    payload = frame[3:-66]
    assert len(payload) == 145 and payload.endswith(bytes.fromhex("a5726f756e6401"))
    verify(Identity.from_seed(bytes(32)).public_key,
           DOMAIN + hashlib.sha256(payload).digest(), frame[-64:])
    # the differential the rule closes: keep-last and keep-first read different rounds
    keep_last = msgpack.unpackb(payload)["body"]["round"]
    keep_first = msgpack.unpackb(payload, object_pairs_hook=lambda pairs: {
        k: v for k, v in reversed(pairs)})["body"]["round"]
    assert (keep_last, keep_first) == (1, 0)
    # and without the repeat it is the worked example's heartbeat, which decodes
    assert decode(bytes.fromhex(WORKED_EXAMPLE_HEX)).type == "heartbeat"


def test_the_docs_vector_is_refused():
    assert refusal(vector_in_docs()) == "duplicate map key 'round'"

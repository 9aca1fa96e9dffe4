"""Gossip and trust primitives (protocol.gossip) and the wire forms added with them.

Pins the byte-level test vectors of docs/protocol.md ("Federation secret" in section 6.4,
"Test vectors"): the HMAC inputs are rebuilt here by hand from the documented layout and
checked against the code, and every vector printed in the docs is checked to be the one
tested here.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import re
from pathlib import Path

import pytest

from node.peers.discovery import key_from_txt
from node.trust.pairing import PairingOffer
from protocol.envelope import decode, encode
from protocol.errors import ProtocolError
from protocol.gossip import (
    CREDENTIAL_DOMAIN,
    DEFAULT_FANOUT,
    DEFAULT_TTL,
    PROOF_DOMAIN,
    SeenCache,
    check_federation_proof,
    choose_fanout,
    federation_credential,
    federation_key,
    federation_proof,
    frame_id,
)
from protocol.identity import Identity
from protocol.messages import (
    Announce,
    Hello,
    PairAccept,
    PairRequest,
    Relay,
)

from .test_envelope import WORKED_EXAMPLE_HEX
from .wire import FED, TS, identity

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

ZERO_KEY = Identity.from_seed(bytes(32)).public_key
SECRET = b"correct horse battery staple"
CHALLENGE = bytes(range(32))  # the verifier's ephemeral key on a link

K_MESSAGE = "666c2d6e6f64652f76312f66656465726174696f6e2d6b65790064656d6f"
K = "adc2f35c609af29b9354e44abdc823ed14540c431b7c4ee731bb666ebe5bf753"
PROOF_MESSAGE = (
    "666c2d6e6f64652f76312f66656465726174696f6e2d70726f6f660064656d6f00"
    "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
)
PROOF = "2abc2c3b756fffa2bef1ceb9bb91de7b364796f3285433125735e02b3e481cd8"
CREDENTIAL_MESSAGE = (
    "666c2d6e6f64652f76312f66656465726174696f6e2d63726564656e7469616c0064656d6f00"
    "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
)
CREDENTIAL = "02ddd23fc4dff97dd2a49f8cffec696f222717c45a4e3246fde4a74f80e5a18c"

RELAY_PAYLOAD_SHA256 = "b4f3ef0f541d17dc5d85281ec82bf994ce1f9ed0eb366ef748caa8bd3aed2694"
RELAY_SIGNATURE = (
    "b72ce25d7433b9e1bec9d7e6ddaf84080770e05e85e8f8125e3c437f5c38cd3e"
    "f8c3272f78ad091dc8e289343813c4772b5d06b7ecf80452e37772a1a9be400e"
)
PAIRING_URI = (
    "fl-node://pair?v=1&key=O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik&name=alice&fed=demo"
    "&addr=192.168.1.20:7700,%5Bfd00::1%5D:7700&token=AAAAAAAAAAAAAAAAAAAAAA&exp=1700000600"
)


# -- federation secret: key, proof, credential ----------------------------------------


def test_the_domains_are_the_documented_bytes():
    assert PROOF_DOMAIN == b"fl-node/v1/federation-proof\x00" and len(PROOF_DOMAIN) == 28
    assert CREDENTIAL_DOMAIN == b"fl-node/v1/federation-credential\x00"
    assert len(CREDENTIAL_DOMAIN) == 33


def test_federation_key_vector():
    message = b"fl-node/v1/federation-key\x00" + b"demo"
    assert message.hex() == K_MESSAGE and len(message) == 30
    assert hmac.new(SECRET, message, hashlib.sha256).hexdigest() == K
    assert federation_key(SECRET, "demo").hex() == K


def test_federation_proof_vector():
    key = bytes.fromhex(K)
    message = PROOF_DOMAIN + b"demo" + b"\x00" + ZERO_KEY + CHALLENGE
    assert message.hex() == PROOF_MESSAGE and len(message) == 97
    assert hmac.new(key, message, hashlib.sha256).hexdigest() == PROOF
    assert federation_proof(key, "demo", ZERO_KEY, CHALLENGE).hex() == PROOF


def test_federation_credential_vector():
    key = bytes.fromhex(K)
    message = CREDENTIAL_DOMAIN + b"demo" + b"\x00" + ZERO_KEY
    assert message.hex() == CREDENTIAL_MESSAGE and len(message) == 70
    assert hmac.new(key, message, hashlib.sha256).hexdigest() == CREDENTIAL
    assert federation_credential(key, "demo", ZERO_KEY).hex() == CREDENTIAL


def test_a_proof_is_bound_to_the_secret_federation_prover_and_challenge():
    key = bytes.fromhex(K)
    proof = bytes.fromhex(PROOF)
    assert check_federation_proof(key, "demo", ZERO_KEY, CHALLENGE, proof)
    other = identity(1).public_key
    assert not check_federation_proof(federation_key(SECRET + b"!", "demo"), "demo",
                                      ZERO_KEY, CHALLENGE, proof)
    assert not check_federation_proof(federation_key(SECRET, "demo2"), "demo2",
                                      ZERO_KEY, CHALLENGE, proof)
    assert not check_federation_proof(key, "demo", other, CHALLENGE, proof)
    assert not check_federation_proof(key, "demo", ZERO_KEY, bytes(32), proof)
    assert not check_federation_proof(key, "demo", ZERO_KEY, CHALLENGE, b"")
    assert not check_federation_proof(key, "demo", ZERO_KEY, CHALLENGE, proof[:31])


def test_a_credential_is_not_a_proof():
    key = bytes.fromhex(K)
    assert federation_credential(key, "demo", ZERO_KEY) != federation_proof(
        key, "demo", ZERO_KEY, b"")


# -- frame ids, seen-cache, fan-out ---------------------------------------------------


def test_frame_id_is_the_signature():
    frame = bytes.fromhex(WORKED_EXAMPLE_HEX)
    assert frame_id(frame) == frame[-64:]
    assert frame_id(bytearray(frame)) == frame_id(memoryview(frame)) == frame[-64:]
    assert frame_id(frame).hex().startswith("043e70826b28")


def test_seen_cache_remembers_the_latest_ids_and_reports_duplicates():
    cache = SeenCache(capacity=3)
    assert cache.add(b"a") and cache.add(b"b") and cache.add(b"c")
    assert not cache.add(b"a")  # a duplicate, and now the most recent
    assert cache.add(b"d")  # evicts b, the least recently added
    assert b"b" not in cache and b"a" in cache and len(cache) == 3
    assert SeenCache().capacity == 8192


def test_defaults():
    assert DEFAULT_TTL == 8 and DEFAULT_FANOUT == 4


def test_choose_fanout_picks_at_most_fanout_never_excluded_and_is_reproducible():
    keys = [bytes([i]) * 32 for i in range(10)]
    exclude = (keys[0], keys[1])
    picked = choose_fanout(random.Random(1), keys, 4, exclude=exclude)
    assert len(picked) == 4 and len(set(picked)) == 4
    assert not set(picked) & set(exclude)
    assert picked == choose_fanout(random.Random(1), reversed(keys), 4, exclude=exclude)
    assert choose_fanout(random.Random(1), keys[:3], 4) == sorted(keys[:3])
    assert choose_fanout(random.Random(1), [], 4) == []


# -- the new wire forms ---------------------------------------------------------------


def test_the_relay_vector_of_the_docs():
    ident = Identity.from_seed(bytes(32))
    inner = bytes.fromhex(WORKED_EXAMPLE_HEX)
    frame = bytes(encode(ident, Relay(ttl=8, to=b"", frame=inner), seq=2, ts_ms=TS,
                         federation="demo"))
    assert len(frame) == 381 and frame[:4] == bytes.fromhex("92c50137")
    payload = frame[4:-66]
    assert len(payload) == 311 and frame[-66:-64] == b"\xc4\x40"
    head = bytes.fromhex("87a17601a474797065a572656c6179a466726f6dc420") + ZERO_KEY + bytes.fromhex(
        "a373657102a27473cf0000018bcfe56800a3666564a464656d6fa4626f6479")
    body = bytes.fromhex("83a374746c08a2746fc400a56672616d65c4cf")
    assert len(head) == 85 and payload == head + body + inner
    assert hashlib.sha256(payload).hexdigest() == RELAY_PAYLOAD_SHA256
    assert frame[-64:].hex() == RELAY_SIGNATURE
    env = decode(frame)
    assert env.message == Relay(ttl=8, to=b"", frame=inner)
    assert decode(env.message.frame).type == "heartbeat"


def test_a_relay_adds_at_most_216_bytes_plus_the_federation_name():
    ident = identity(1)
    for fed in ("d", "d" * 31, "d" * 64):
        for size in (207, 70_000):
            frame = encode(ident, Relay(ttl=64, to=b"\x01" * 32, frame=b"x" * size),
                           seq=2**63 - 1, ts_ms=2**63 - 1, federation=fed)
            assert len(frame) - size <= 216 + len(fed)


NEW_MESSAGES = [
    Hello(name="alice", nonce=bytes(32), echo=CHALLENGE, port=7700, genesis=b"\x11" * 32,
          round=2, proof=bytes.fromhex(PROOF)),
    Relay(ttl=0, to=ZERO_KEY, frame=bytes.fromhex(WORKED_EXAMPLE_HEX)),
    Announce(name="alice", addresses=("10.0.0.5:7700",), links=(ZERO_KEY,), round=3,
             state="training", credential=bytes.fromhex(CREDENTIAL)),
    Announce(name="bob", addresses=(), links=(), round=0, state="", credential=b""),
    PairRequest(token="A" * 22, name="bob", addresses=("10.0.0.6:7700",)),
    PairAccept(name="alice", requester=ZERO_KEY),
]


@pytest.mark.parametrize("message", NEW_MESSAGES, ids=lambda m: type(m).__name__)
def test_new_messages_survive_encode_and_decode(message):
    env = decode(bytes(encode(identity(1), message, seq=3, ts_ms=TS, federation=FED)))
    assert env.message == message and env.type == message.TYPE


def test_the_body_keys_are_the_documented_ones():
    keys = {type(m).TYPE: set(m.to_body()) for m in NEW_MESSAGES}
    assert keys == {
        "hello": {"name", "nonce", "echo", "port", "genesis", "round", "proof"},
        "relay": {"ttl", "to", "frame"},
        "announce": {"name", "addrs", "links", "round", "state", "cred"},
        "pair_request": {"token", "name", "addrs"},
        "pair_accept": {"name", "requester"},
    }


def _body(message, **changes):
    body = message.to_body()
    body.update(changes)
    return body


@pytest.mark.parametrize("message,changes", [
    (NEW_MESSAGES[0], {"proof": b"\x00" * 31}),
    (NEW_MESSAGES[0], {"proof": b"\x00" * 33}),
    (NEW_MESSAGES[1], {"ttl": 65}),
    (NEW_MESSAGES[1], {"ttl": -1}),
    (NEW_MESSAGES[1], {"to": b"\x00" * 31}),
    (NEW_MESSAGES[1], {"ttl": True}),
    (NEW_MESSAGES[2], {"cred": b"\x00" * 16}),
    (NEW_MESSAGES[2], {"name": ""}),
    (NEW_MESSAGES[2], {"name": "n" * 65}),
    (NEW_MESSAGES[2], {"state": "s" * 33}),
    (NEW_MESSAGES[2], {"addrs": ["a"] * 17}),
    (NEW_MESSAGES[2], {"addrs": ["a" * 65]}),
    (NEW_MESSAGES[2], {"links": [b"\x00" * 32] * 1025}),
    (NEW_MESSAGES[2], {"links": [b"\x00" * 31]}),
    (NEW_MESSAGES[4], {"token": ""}),
    (NEW_MESSAGES[4], {"token": "t" * 65}),
    (NEW_MESSAGES[4], {"addrs": ["a"] * 9}),
    (NEW_MESSAGES[5], {"requester": b"\x00" * 31}),
    (NEW_MESSAGES[5], {"name": ""}),
])
def test_new_bodies_refuse_out_of_range_fields(message, changes):
    with pytest.raises(ProtocolError):
        type(message).from_body(_body(message, **changes))


@pytest.mark.parametrize("message", NEW_MESSAGES, ids=lambda m: type(m).__name__)
def test_new_bodies_refuse_missing_and_unknown_fields(message):
    body = message.to_body()
    with pytest.raises(ProtocolError):
        type(message).from_body({**body, "extra": 1})
    with pytest.raises(ProtocolError):
        type(message).from_body({k: v for k, v in list(body.items())[1:]})


def test_the_limits_themselves_are_accepted():
    Relay.from_body({"ttl": 64, "to": b"", "frame": b""})
    Announce.from_body(_body(NEW_MESSAGES[2], addrs=["a" * 64] * 16,
                             links=[b"\x00" * 32] * 1024, name="n" * 64, state="s" * 32))
    PairRequest.from_body(_body(NEW_MESSAGES[4], token="t" * 64, addrs=["a" * 64] * 8))


# -- pairing code and mDNS ------------------------------------------------------------


def test_the_pairing_code_vector_of_the_docs():
    offer = PairingOffer(ZERO_KEY, "alice", "demo", ("192.168.1.20:7700", "[fd00::1]:7700"),
                         "A" * 22, 1_700_000_600)
    assert offer.to_uri() == PAIRING_URI
    assert PairingOffer.from_uri(PAIRING_URI, check_expiry=False) == offer


def test_the_mdns_key_must_match_the_announced_id():
    key_text = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik"
    assert key_from_txt({"id": "COPD-SQHG-JNKJ-C4RA-4", "key": key_text}) == ZERO_KEY
    assert key_from_txt({"id": identity(1).node_id, "key": key_text}) is None
    assert key_from_txt({"id": "COPD-SQHG-JNKJ-C4RA-4", "key": key_text[:-2]}) is None
    assert key_from_txt({"id": "COPD-SQHG-JNKJ-C4RA-4"}) is None


def test_the_mdns_instance_label_is_name_and_short_id():
    # node.peers.discovery builds f"{name}-{short}" with short = node id without dashes, 8 chars,
    # lower case; the docs print it for the all-zero seed
    short = Identity.from_seed(bytes(32)).node_id.replace("-", "")[:8].lower()
    assert f"alice-{short}._fl-node._tcp.local." == "alice-copdsqhg._fl-node._tcp.local."


# -- the docs print these vectors -----------------------------------------------------


def _docs_text() -> str:
    # Hex split over several backquoted lines is one string in the docs: join them.
    text = DOCS.read_text()
    return re.sub(r"`\s*\n\s*`", "", text)


@pytest.mark.parametrize("value", [
    K_MESSAGE, K, PROOF_MESSAGE, PROOF, CREDENTIAL_MESSAGE, CREDENTIAL,
    WORKED_EXAMPLE_HEX[-128:], RELAY_PAYLOAD_SHA256, RELAY_SIGNATURE, PAIRING_URI,
    "alice-copdsqhg._fl-node._tcp.local.", "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik",
])
def test_the_docs_print_the_tested_vectors(value):
    assert value in _docs_text()


def test_the_docs_print_the_relay_bytes():
    text = " ".join(_docs_text().split())
    for fragment in ("87 a1 76 01 a4 74 79 70 65 a5 72 65 6c 61 79 a4 66 72 6f 6d c4 20",
                     "a3 73 65 71 02 a2 74 73 cf 00 00 01 8b cf e5 68 00 a3 66 65 64 a4 64 65 6d"
                     " 6f a4 62 6f 64 79",
                     "83 a3 74 74 6c 08 a2 74 6f c4 00 a5 66 72 61 6d 65 c4 cf",
                     "92 c5 01 37"):
        assert fragment in text

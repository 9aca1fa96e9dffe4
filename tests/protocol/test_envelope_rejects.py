"""Bad input of every kind raises ProtocolError, and nothing else.

Frames that need a valid signature to reach the check under test are signed here exactly
as protocol/envelope.py signs (see wire.sign_payload), so only that check can reject them.
"""

from __future__ import annotations

import random

import msgpack
import pytest

from protocol.envelope import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import Heartbeat, Model, Update
from protocol.tensors import weights_digest

from .wire import (
    FED,
    TS,
    f32,
    heartbeat_body,
    hello_body,
    identity,
    model_body,
    payload,
    sign_payload,
    tensor_map,
    update_body,
)

SIGNER = identity(1)


def reason_of(frame, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frame, **kwargs)
    return info.value.reason


def signed(mtype: str, body, **changes) -> bytes:
    return sign_payload(SIGNER, payload(SIGNER, mtype, body, **changes))


def small_update_frame() -> bytes:
    update = Update(round=2, attempt=0, base=b"\x01" * 32, num_examples=5, loss=0.25,
                    train_seconds=1.0, weights=[f32("w", [1.0, 2.0]), f32("b", [3.0])])
    return bytes(encode(SIGNER, update, seq=3, ts_ms=TS, federation=FED))


def test_the_helper_builds_frames_that_decode():
    # guards every test below: their frames fail only for the reason they are built for
    for mtype, body in (("hello", hello_body()), ("update", update_body()),
                        ("heartbeat", heartbeat_body()),
                        ("model", model_body(SIGNER.public_key))):
        assert decode(signed(mtype, body)).type == mtype


# ---- size and framing -----------------------------------------------------------------


def test_a_frame_over_the_cap_is_refused_for_its_size_before_parsing():
    garbage = bytes([0xC1]) * 1001  # 0xc1 is never valid msgpack
    assert "exceeds the cap" in reason_of(garbage, max_size=1000)


def test_a_valid_frame_over_the_cap_is_refused_and_one_at_the_cap_accepted():
    frame = small_update_frame()
    assert "exceeds the cap" in reason_of(frame, max_size=len(frame) - 1)
    assert decode(frame, max_size=len(frame)).type == "update"


def test_every_truncation_of_a_valid_frame_is_refused():
    frame = small_update_frame()
    for n in range(len(frame)):
        with pytest.raises(ProtocolError):
            decode(frame[:n])


def test_trailing_bytes_after_the_signature_are_refused():
    frame = small_update_frame()
    reason_of(frame + b"\x00")


@pytest.mark.parametrize("frame", [
    b"", b"\x92", b"\x93\xc4\x00\xc4\x40" + bytes(64), b"\x91\xc4\x00",
    b"\x92\xa0" + b"\xc4\x40" + bytes(64),          # payload as str, not bin
    b"\x92\xc4\x00\xc5\x00\x40" + bytes(64),        # signature header not bin8(64)
    b"\x92\xc4\x00\xc4\x3f" + bytes(63),            # 63-byte signature
    b"\x92\xc4\x00\xc4\x40" + bytes(64),            # empty payload
    b"\x92\xc4\x01\xc0\xc4\x40" + bytes(64),        # payload is nil, not a map
])
def test_malformed_frames_are_refused(frame):
    reason_of(frame)


def test_non_binary_input_is_refused():
    with pytest.raises(ProtocolError):
        decode("a text frame")  # type: ignore[arg-type]


def test_random_garbage_never_raises_anything_but_protocol_error():
    rng = random.Random(20240601)
    for i in range(400):
        n = rng.randrange(0, 300)
        data = bytes(rng.randrange(256) for _ in range(n))
        if i % 2:  # half of them get past the first byte checks
            data = b"\x92\xc4" + bytes([max(0, n - 3 - 66)]) + data
        with pytest.raises(ProtocolError):
            decode(data)


def test_garbage_payloads_with_a_valid_signature_raise_only_protocol_error():
    rng = random.Random(7)
    for _ in range(300):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        with pytest.raises(ProtocolError):
            decode(sign_payload(SIGNER, body))


def test_single_bit_flips_of_a_valid_frame_never_escape_as_another_exception():
    frame = small_update_frame()
    original = decode(frame)
    decoded_same = 0
    for pos in range(len(frame)):
        for bit in range(8):
            mutated = bytearray(frame)
            mutated[pos] ^= 1 << bit
            try:
                env = decode(bytes(mutated))
            except ProtocolError:
                continue
            # a flip may only ever yield the same message (never a different one)
            assert (env.sender, env.seq, env.ts_ms, env.message) == (
                original.sender, original.seq, original.ts_ms, original.message)
            decoded_same += 1
    assert decoded_same == 0  # in practice no flip survives the signature


def test_random_byte_replacements_of_a_valid_frame_raise_only_protocol_error():
    frame = small_update_frame()
    rng = random.Random(99)
    for _ in range(300):
        mutated = bytearray(frame)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if bytes(mutated) == frame:
            continue
        with pytest.raises(ProtocolError):
            decode(bytes(mutated))


# ---- authenticity ---------------------------------------------------------------------


def test_a_flipped_signature_byte_is_a_bad_signature():
    frame = bytearray(small_update_frame())
    frame[-10] ^= 0x01
    assert "signature" in reason_of(bytes(frame))


def test_a_body_changed_after_signing_is_a_bad_signature():
    frame = small_update_frame()
    # change one float in the tensor data: same length, still well-formed msgpack
    needle = f32("w", [1.0, 2.0]).data
    assert needle in frame
    tampered = frame.replace(needle, f32("w", [1.0, 2.5]).data)
    assert msgpack.unpackb(msgpack.unpackb(tampered)[0])  # still parses
    assert "signature" in reason_of(tampered)


def test_a_frame_signed_by_another_key_than_its_sender_is_refused():
    body = payload(SIGNER, "heartbeat", heartbeat_body())  # says it is from SIGNER
    frame = sign_payload(identity(2), body)  # but identity 2 signed it
    assert "signature" in reason_of(frame)


@pytest.mark.parametrize("sender", [None, b"", bytes(31), bytes(33), "a" * 32, 5])
def test_a_missing_or_malformed_sender_key_is_refused(sender):
    reason_of(signed("heartbeat", heartbeat_body(), **{"from": sender}))


# ---- msgpack extension types ----------------------------------------------------------


@pytest.mark.parametrize("where", ["body", "payload", "tensor", "list"])
@pytest.mark.parametrize("ext", [msgpack.ExtType(5, b"abc"), msgpack.ExtType(0, b""),
                                 msgpack.ExtType(127, bytes(16))], ids=["ext5", "ext0", "ext127"])
def test_a_msgpack_extension_anywhere_is_refused_even_when_properly_signed(where, ext):
    if where == "body":
        p = payload(SIGNER, "heartbeat", heartbeat_body(state=ext))
    elif where == "payload":
        p = payload(SIGNER, "heartbeat", heartbeat_body(), ts=ext)
    elif where == "tensor":
        p = payload(SIGNER, "update", update_body(weights=[tensor_map(data=ext)]))
    else:
        p = payload(SIGNER, "update", update_body(weights=[tensor_map(shape=[2, ext])]))
    reason = reason_of(sign_payload(SIGNER, p))
    assert "ext" in reason.lower() and "signature" not in reason


@pytest.mark.parametrize("raw", [
    b"\xd6\xff" + bytes(4),                  # timestamp 32
    b"\xd7\xff" + bytes(8),                  # timestamp 64
    b"\xc7\x0c\xff" + bytes(12),             # timestamp 96
    b"\xc7\x00\xff",                         # ext 8, type -1, empty
    b"\xd4\x80\x00",                         # fixext 1, type -128
])
def test_the_timestamp_extension_and_negative_ext_types_are_refused(raw):
    packed = msgpack.packb(payload(SIGNER, "heartbeat", heartbeat_body(state="PLACEHOLDER")),
                           use_bin_type=True)
    packed = packed.replace(msgpack.packb("PLACEHOLDER"), raw)
    reason = reason_of(sign_payload(SIGNER, packed)).lower()
    # msgpack parses type -1 as a timestamp first: an empty one fails as "invalid timestamp"
    assert ("ext" in reason or "timestamp" in reason) and "signature" not in reason


def test_a_timestamp_object_packed_by_msgpack_is_refused():
    p = payload(SIGNER, "heartbeat", heartbeat_body(state=msgpack.Timestamp(1, 0)))
    assert "ext" in reason_of(sign_payload(SIGNER, p)).lower()


# ---- envelope fields (properly signed) ------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 255, -1, True, 1.0, "1", None])
def test_an_unknown_protocol_version_is_refused(version):
    assert "version" in reason_of(signed("heartbeat", heartbeat_body(), v=version))


@pytest.mark.parametrize("mtype", ["gossip", "", "Hello", "HEARTBEAT", 1, None, b"hello"])
def test_an_unknown_message_type_is_refused(mtype):
    assert "type" in reason_of(signed("heartbeat", heartbeat_body(), type=mtype))


@pytest.mark.parametrize("seq", [0, -1, 2**63, True, 1.0, "1", None])
def test_a_bad_sequence_number_is_refused(seq):
    assert "seq" in reason_of(signed("heartbeat", heartbeat_body(), seq=seq))


@pytest.mark.parametrize("ts", [-1, 2**63, False, 1.5, "now"])
def test_a_bad_timestamp_is_refused(ts):
    assert "ts" in reason_of(signed("heartbeat", heartbeat_body(), ts=ts))


@pytest.mark.parametrize("fed", [None, 1, b"fed", "x" * 129])
def test_a_bad_federation_is_refused(fed):
    assert "fed" in reason_of(signed("heartbeat", heartbeat_body(), fed=fed))


def test_a_payload_with_a_missing_or_extra_field_is_refused():
    p = payload(SIGNER, "heartbeat", heartbeat_body())
    del p["ts"]
    assert "fields" in reason_of(sign_payload(SIGNER, p))
    assert "fields" in reason_of(signed("heartbeat", heartbeat_body(), extra=1))


@pytest.mark.parametrize("inner", [[1, 2], "map", 5, None])
def test_a_payload_that_is_not_a_map_is_refused(inner):
    reason_of(sign_payload(SIGNER, msgpack.packb(inner)))


def test_a_payload_with_non_string_map_keys_is_refused():
    packed = msgpack.packb({1: 2, "from": SIGNER.public_key})
    reason_of(sign_payload(SIGNER, packed))


# ---- bodies (properly signed) ---------------------------------------------------------

BODIES = {
    "hello": hello_body,
    "update": update_body,
    "heartbeat": heartbeat_body,
    "model": lambda **kw: model_body(kw.pop("aggregator", SIGNER.public_key), **kw),
}


@pytest.mark.parametrize("mtype", sorted(BODIES))
def test_a_body_with_a_missing_field_is_refused(mtype):
    body = BODIES[mtype]()
    for key in list(body):
        short = {k: v for k, v in body.items() if k != key}
        assert "fields" in reason_of(signed(mtype, short)), key


@pytest.mark.parametrize("mtype", sorted(BODIES))
def test_a_body_with_an_extra_field_is_refused(mtype):
    assert "fields" in reason_of(signed(mtype, BODIES[mtype](extra=0)))


@pytest.mark.parametrize("mtype", sorted(BODIES))
def test_a_body_that_is_not_a_map_is_refused(mtype):
    assert "map" in reason_of(signed(mtype, [1, 2, 3]))


@pytest.mark.parametrize("mtype,field", [
    ("hello", "port"), ("hello", "round"), ("update", "round"), ("update", "attempt"),
    ("update", "n"), ("update", "loss"), ("update", "secs"), ("model", "round"),
    ("model", "n"), ("heartbeat", "round"), ("heartbeat", "ping_ts"), ("heartbeat", "echo_ts"),
])
def test_a_bool_where_a_number_is_expected_is_refused(mtype, field):
    assert "bool" in reason_of(signed(mtype, BODIES[mtype](**{field: True})))


@pytest.mark.parametrize("mtype,field,value", [
    ("hello", "name", 5), ("hello", "nonce", "x" * 32), ("hello", "port", 1.0),
    ("update", "round", 1.0), ("update", "base", "b" * 32), ("update", "weights", {}),
    ("model", "contributors", b""), ("model", "digest", None), ("heartbeat", "state", 0),
    ("heartbeat", "ping_ts", "1"),
])
def test_a_field_of_the_wrong_type_is_refused(mtype, field, value):
    assert "wrong type" in reason_of(signed(mtype, BODIES[mtype](**{field: value})))


@pytest.mark.parametrize("mtype,field,value", [
    ("hello", "name", ""), ("hello", "name", "x" * 65), ("hello", "nonce", bytes(15)),
    ("hello", "echo", bytes(8)), ("hello", "port", 65536), ("hello", "port", -1),
    ("hello", "genesis", bytes(31)), ("hello", "round", -1), ("hello", "round", 2**53 + 1),
    ("update", "round", 0), ("update", "attempt", -1), ("update", "base", bytes(33)),
    ("update", "n", -5), ("model", "round", 0), ("model", "aggregator", bytes(16)),
    ("model", "contributors", [bytes(31)]), ("model", "contributors", ["k" * 32]),
    ("model", "digest", bytes(16)), ("heartbeat", "state", "s" * 33),
    ("heartbeat", "ping_ts", -1), ("heartbeat", "echo_ts", 2**63 + 1),
])
def test_a_field_out_of_range_is_refused(mtype, field, value):
    reason_of(signed(mtype, BODIES[mtype](**{field: value})))


@pytest.mark.parametrize("field", ["loss", "secs"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_loss_or_training_time_is_refused(field, value):
    assert "finite" in reason_of(signed("update", update_body(**{field: value})))


def test_integer_loss_and_seconds_are_accepted_as_numbers():
    env = decode(signed("update", update_body(loss=1, secs=0)))
    assert env.message.loss == 1.0 and env.message.train_seconds == 0.0


# ---- tensors (properly signed) --------------------------------------------------------


def tensor_reason(*tensors) -> str:
    return reason_of(signed("update", update_body(weights=list(tensors))))


@pytest.mark.parametrize("dtype", ["object", "complex64", "complex128", "float128", "<f4",
                                   "str", "", "FLOAT32", 5, None])
def test_a_tensor_dtype_outside_the_allowlist_is_refused(dtype):
    assert "tensor" in tensor_reason(tensor_map(dtype=dtype))


@pytest.mark.parametrize("shape,nbytes", [((2,), 7), ((2,), 9), ((3,), 8), ((2, 2), 8),
                                          ((0,), 4), ((), 0), ((1,), 0)])
def test_a_tensor_whose_shape_times_itemsize_is_not_its_byte_length_is_refused(shape, nbytes):
    assert "bytes" in tensor_reason(tensor_map(shape=shape, data=bytes(nbytes)))


def test_a_shape_that_would_overflow_is_refused_without_allocating():
    assert "bytes" in tensor_reason(tensor_map(shape=[2**39] * 8, data=bytes(8)))


@pytest.mark.parametrize("shape", [[-1], [2, -2], [True, 2], [False], [2.0], ["2"], [None],
                                   [2**40], [1] * 9, "2", {"0": 2}])
def test_a_negative_bool_float_huge_or_too_deep_dimension_is_refused(shape):
    t = tensor_map()
    t["shape"] = shape
    assert "shape" in tensor_reason(t)


@pytest.mark.parametrize("name", ["", 5, None, b"w", "n" * 257])
def test_a_bad_tensor_name_is_refused(name):
    assert "name" in tensor_reason(tensor_map(name=name))


@pytest.mark.parametrize("data", ["x" * 8, [0] * 8, None, 8])
def test_tensor_data_that_is_not_binary_is_refused(data):
    assert "binary" in tensor_reason(tensor_map(data=data))


def test_duplicate_tensor_names_are_refused():
    assert "duplicate" in tensor_reason(tensor_map(), tensor_map())


@pytest.mark.parametrize("tensor", [
    {"name": "w", "dtype": "float32", "shape": [2]},
    {"name": "w", "dtype": "float32", "shape": [2], "data": bytes(8), "order": "C"},
    ["w", "float32", [2], bytes(8)],
    "w",
])
def test_a_tensor_with_missing_or_extra_fields_is_refused(tensor):
    assert "tensor" in tensor_reason(tensor)


def test_tensors_are_refused_in_a_model_body_too():
    reason = reason_of(signed("model", model_body(SIGNER.public_key,
                                                  weights=[tensor_map(dtype="object")])))
    assert "dtype" in reason


def test_an_empty_weight_list_is_well_formed():
    # the decoder does not know the federation's model; the round machine checks the spec
    assert decode(signed("update", update_body(weights=[]))).message.weights == []


def test_a_model_whose_digest_is_wrong_still_decodes_for_the_round_machine_to_refuse():
    # the envelope does not recompute digests; protocol.rounds does (see test_rounds)
    weights = [f32("w", [1.0, 2.0])]
    body = model_body(SIGNER.public_key, digest=b"\x00" * 32,
                      weights=[tensor_map(data=weights[0].data)])
    env = decode(signed("model", body))
    assert isinstance(env.message, Model)
    assert env.message.digest != weights_digest(env.message.weights)


def test_heartbeat_decodes_with_the_limits_inclusive():
    env = decode(signed("heartbeat", heartbeat_body(state="s" * 32, ping_ts=2**63,
                                                    echo_ts=2**63)))
    assert isinstance(env.message, Heartbeat) and env.message.ping_ts == 2**63

"""Tensors on the wire and the model hash (weights_digest)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from protocol.errors import ProtocolError
from protocol.tensors import (
    DTYPE_ITEMSIZE,
    Tensor,
    tensor_from_wire,
    tensor_to_wire,
    weights_digest,
    weights_from_wire,
    weights_to_wire,
)

from .wire import f32

BASE = [f32("layer.weight", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3)), f32("layer.bias", [0.5, -0.5])]


def replace(i: int, **changes) -> list[Tensor]:
    out = list(BASE)
    t = out[i]
    out[i] = Tensor(changes.get("name", t.name), changes.get("dtype", t.dtype),
                    changes.get("shape", t.shape), changes.get("data", t.data))
    return out


def test_the_digest_is_stable_for_the_same_weights():
    copy = [Tensor(t.name, t.dtype, t.shape, bytes(t.data)) for t in BASE]
    assert weights_digest(copy) == weights_digest(BASE)
    assert len(weights_digest(BASE)) == 32


def test_the_digest_changes_when_any_single_byte_changes():
    seen = {weights_digest(BASE)}
    for i, t in enumerate(BASE):
        for pos in range(len(t.data)):
            data = bytearray(t.data)
            data[pos] ^= 0x01
            seen.add(weights_digest(replace(i, data=bytes(data))))
    assert len(seen) == 1 + sum(len(t.data) for t in BASE)


def test_the_digest_changes_when_a_name_changes():
    assert weights_digest(replace(0, name="layer.weighT")) != weights_digest(BASE)


def test_the_digest_changes_when_the_dtype_changes_with_identical_bytes():
    assert weights_digest(replace(0, dtype="int32")) != weights_digest(BASE)


def test_the_digest_changes_when_the_shape_changes_with_identical_bytes():
    assert weights_digest(replace(0, shape=(3, 2))) != weights_digest(BASE)
    assert weights_digest(replace(0, shape=(6,))) != weights_digest(BASE)
    assert weights_digest(replace(0, shape=(1, 2, 3))) != weights_digest(BASE)


def test_the_digest_changes_when_tensors_are_reordered():
    assert weights_digest(BASE[::-1]) != weights_digest(BASE)


def test_moving_bytes_between_name_and_data_changes_the_digest():
    # length prefixes keep one layout from hashing like another
    a = [Tensor("ab", "uint8", (1,), b"c")]
    b = [Tensor("a", "uint8", (2,), b"bc")]
    assert weights_digest(a) != weights_digest(b)


def test_the_digest_follows_the_documented_canonical_form():
    h = hashlib.sha256()
    for t in BASE:
        name, dtype = t.name.encode(), t.dtype.encode()
        h.update(struct.pack(">I", len(name)) + name)
        h.update(struct.pack(">I", len(dtype)) + dtype)
        h.update(struct.pack(">I", len(t.shape)))
        for d in t.shape:
            h.update(struct.pack(">Q", d))
        h.update(struct.pack(">Q", len(t.data)))
        h.update(t.data)
    assert weights_digest(BASE) == h.digest()


def test_the_documented_test_vector_digest():
    # docs/protocol.md, "Test vectors"
    assert weights_digest([]).hex() == hashlib.sha256(b"").hexdigest()
    assert weights_digest(BASE).hex() == (
        "1bd14af8024d4e857db2ff55a147525ee87fba780bc39bba851a9182f93c91b9")


def test_a_memoryview_hashes_like_the_bytes_it_shows():
    view = [Tensor(t.name, t.dtype, t.shape, memoryview(bytes(t.data))) for t in BASE]
    assert weights_digest(view) == weights_digest(BASE)


def test_tensor_wire_round_trip():
    for t in BASE:
        assert tensor_from_wire(tensor_to_wire(t)) == t
    assert weights_from_wire(weights_to_wire(BASE)) == BASE


def test_the_allowlist_is_exactly_the_documented_dtypes():
    assert dict(DTYPE_ITEMSIZE) == {"float32": 4, "float64": 8, "float16": 2, "int64": 8,
                                    "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def test_a_scalar_has_one_element_and_an_empty_dimension_none():
    assert tensor_from_wire(tensor_to_wire(Tensor("s", "float64", (), bytes(8)))).shape == ()
    assert tensor_from_wire(tensor_to_wire(Tensor("e", "float64", (3, 0), b""))).shape == (3, 0)


def test_too_many_tensors_are_refused():
    with pytest.raises(ProtocolError):
        weights_from_wire([tensor_to_wire(Tensor(f"t{i}", "uint8", (0,), b""))
                           for i in range(4097)])

"""Weights: model state to numpy and back, and the pickle-free safetensors byte format."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from ml.models import build_model
from ml.weights import get_weights, set_weights, weights_from_bytes, weights_to_bytes


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", (1, 8, 8), 10)


def pack(header: dict, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


def sample_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "f64": np.array([np.pi, -0.0, np.inf, -np.inf, np.nan, 5e-324]),
        "f16": np.array([[1.5, -2.25], [65504.0, 6e-8]], np.float16),
        "i64": np.array([-(2**63), 2**63 - 1, 0], np.int64),
        "i32": np.array([-(2**31), 7], np.int32),
        "i16": np.array([-(2**15), 2**15 - 1], np.int16),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.arange(256, dtype=np.uint8).reshape(16, 16),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
    }


# ---- model <-> numpy -----------------------------------------------------------------


def test_get_then_set_weights_makes_two_models_identical() -> None:
    a, b = make_model(0), make_model(1)
    x = torch.randn(4, 1, 8, 8)
    assert not torch.equal(a(x), b(x))
    wa = get_weights(a)
    assert list(wa) == list(a.state_dict())
    assert all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in wa.values())
    set_weights(b, wa)
    assert torch.equal(a(x), b(x))
    for k, v in get_weights(b).items():
        np.testing.assert_array_equal(v, wa[k])


def test_get_weights_returns_copies_not_views_of_the_model() -> None:
    model = make_model(0)
    w = get_weights(model)
    key = next(iter(w))
    before = model.state_dict()[key].clone()
    w[key][...] = 123.0
    assert torch.equal(model.state_dict()[key], before)
    set_weights(model, w)
    w[key][...] = -1.0  # mutating after set_weights must not reach the model either
    assert float(model.state_dict()[key].flatten()[0]) == 123.0


def test_set_weights_with_a_missing_key_names_it() -> None:
    model = make_model(0)
    w = get_weights(model)
    del w["head.3.bias"]
    with pytest.raises(ValueError, match=r"missing \['head\.3\.bias'\]"):
        set_weights(model, w)


def test_set_weights_with_an_extra_key_names_it() -> None:
    model = make_model(0)
    w = get_weights(model)
    w["surprise"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=r"extra \['surprise'\]"):
        set_weights(model, w)


def test_set_weights_with_a_wrong_shape_names_the_key() -> None:
    model = make_model(0)
    w = get_weights(model)
    w["head.3.weight"] = np.zeros((5, 64), np.float32)
    before = get_weights(model)
    with pytest.raises(ValueError,
                       match=r"head\.3\.weight has shape \(5, 64\), expected \(10, 64\)"):
        set_weights(model, w)
    for k, v in get_weights(model).items():  # nothing half-loaded
        np.testing.assert_array_equal(v, before[k])


# ---- bytes ---------------------------------------------------------------------------


def test_bytes_round_trip_keeps_names_order_dtypes_and_bits() -> None:
    w = sample_weights()
    out = weights_from_bytes(weights_to_bytes(w))
    assert list(out) == list(w)
    for k, v in w.items():
        assert out[k].dtype == v.dtype, k
        assert out[k].shape == v.shape, k
        assert out[k].tobytes() == v.tobytes(), k
        assert out[k].flags.writeable and out[k].flags.c_contiguous


def test_bytes_round_trip_keeps_scalar_tensors_scalar() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.temperature = nn.Parameter(torch.tensor(2.0))
            self.fc = nn.Linear(3, 2)

    model = Scaled()
    w = get_weights(model)
    assert w["temperature"].shape == ()
    out = weights_from_bytes(weights_to_bytes(w))
    assert out["temperature"].shape == ()
    set_weights(model, out)


def test_bytes_round_trip_of_a_real_model() -> None:
    a, b = make_model(0), make_model(1)
    set_weights(b, weights_from_bytes(weights_to_bytes(get_weights(a))))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(a(x), b(x))


def test_non_contiguous_arrays_serialise_by_value() -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = weights_from_bytes(weights_to_bytes({"t": base.T}))
    np.testing.assert_array_equal(out["t"], base.T)


def test_byte_format_is_safetensors_layout_with_a_json_header_not_pickle() -> None:
    data = weights_to_bytes(sample_weights())
    assert not data.startswith(b"\x80")
    (n,) = struct.unpack_from("<Q", data)
    assert (8 + n) % 8 == 0  # header padded so tensor data is 8-byte aligned
    header = json.loads(data[8 : 8 + n])
    assert header["conv.weight"] == {"dtype": "F32", "shape": [4, 1, 3, 3],
                                     "data_offsets": [0, 4 * 36]}
    assert header["flags"]["dtype"] == "BOOL" and header["u8"]["shape"] == [16, 16]
    assert max(e["data_offsets"][1] for e in header.values()) == len(data) - 8 - n
    # Little-endian raw bytes, as safetensors readers expect.
    begin, end = header["i32"]["data_offsets"]
    assert data[8 + n + begin : 8 + n + end] == struct.pack("<2i", -(2**31), 7)


def test_metadata_entry_is_ignored() -> None:
    data = pack({"__metadata__": {"format": "pt"},
                 "x": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\xff")
    assert weights_from_bytes(data)["x"].tolist() == [1, -1]


def test_unsupported_dtype_is_refused_when_writing() -> None:
    with pytest.raises(ValueError, match="complex64 not supported"):
        weights_to_bytes({"z": np.zeros(2, np.complex64)})


GOOD = weights_to_bytes({"a": np.arange(3, dtype=np.float32), "b": np.ones(2, np.int64)})
(GOOD_N,) = struct.unpack_from("<Q", GOOD)
F32_3 = np.arange(3, dtype="<f4").tobytes()

CORRUPT = {
    "empty": b"",
    "shorter than the length field": GOOD[:5],
    "truncated tensor data": GOOD[:-1],
    "truncated inside the header": GOOD[: 8 + GOOD_N // 2],
    "header length beyond the data": struct.pack("<Q", len(GOOD)) + GOOD[8:],
    "header length absurd": struct.pack("<Q", 2**62) + GOOD[8:],
    "header not JSON": struct.pack("<Q", 9) + b"{not json" + F32_3,
    "header not UTF-8": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
    "header a list": pack([1, 2]),  # type: ignore[arg-type]
    "entry not a map": pack({"a": "F32"}),
    "entry missing dtype": pack({"a": {"shape": [3], "data_offsets": [0, 12]}}, F32_3),
    "unknown dtype": pack({"a": {"dtype": "Q7", "shape": [3], "data_offsets": [0, 12]}}, F32_3),
    "offsets not contiguous (gap)": pack(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, F32_3),
    "offsets not contiguous (overlap)": pack(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, F32_3),
    "offsets reversed": pack({"a": {"dtype": "F32", "shape": [0], "data_offsets": [12, 0]}},
                             F32_3),
    "offsets past the end": pack(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32_3),
    "byte length does not match shape": pack(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, F32_3),
    "negative dimension": pack(
        {"a": {"dtype": "F32", "shape": [-3], "data_offsets": [0, 12]}}, F32_3),
    "non-integer dimension": pack(
        {"a": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 12]}}, F32_3),
    "three offsets": pack(
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12, 12]}}, F32_3),
    "trailing bytes": GOOD + b"\x00",
    "data but no tensors": pack({}, b"\x00\x00\x00\x00"),
}


@pytest.mark.parametrize("data", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_bytes_are_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="weights"):
        weights_from_bytes(data)


def test_good_bytes_used_by_the_corruption_cases_are_valid() -> None:
    out = weights_from_bytes(GOOD)
    assert out["a"].tolist() == [0.0, 1.0, 2.0] and out["b"].tolist() == [1, 1]
    assert weights_from_bytes(pack({"a": {"dtype": "F32", "shape": [3],
                                          "data_offsets": [0, 12]}}, F32_3))["a"].tolist() \
        == [0.0, 1.0, 2.0]


def test_huge_dimension_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        weights_from_bytes(pack({"a": {"dtype": "F32", "shape": [2**64],
                                       "data_offsets": [0, 0]}}))


def test_deeply_nested_header_is_a_value_error() -> None:
    head = b"[" * 100_000
    with pytest.raises(ValueError):
        weights_from_bytes(struct.pack("<Q", len(head)) + head)


# ---- interoperability with other safetensors writers ---------------------------------


def test_data_laid_out_in_another_order_than_the_header_is_read() -> None:
    # The safetensors reference writer orders data by dtype, not by header order; a
    # compatible reader must accept any order as long as the tensors tile the buffer.
    a, b = np.arange(3, dtype="<f4").tobytes(), np.array([7, -7], "<i8").tobytes()
    data = pack({"a": {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]},
                 "b": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, b + a)
    out = weights_from_bytes(data)
    assert list(out) == ["a", "b"]
    assert out["a"].tolist() == [0.0, 1.0, 2.0] and out["b"].tolist() == [7, -7]


@pytest.mark.parametrize(("header", "body"), [
    ('{"a":{"dtype":"I8","shape":[1],"data_offsets":[0,1]},'
     '"a":{"dtype":"I8","shape":[1],"data_offsets":[1,2]}}', b"\x01\x02"),
    ('{"a":{"dtype":"I8","shape":[true],"data_offsets":[0,1]}}', b"\x01"),
    ('{"a":{"dtype":"I8","shape":[1],"data_offsets":[false,true]}}', b"\x01"),
    ('{"a":{"dtype":"I8","shape":[1.0],"data_offsets":[0,1]}}', b"\x01"),
], ids=["duplicate name", "boolean dimension", "boolean offsets", "float dimension"])
def test_ambiguous_headers_are_a_value_error(header: str, body: bytes) -> None:
    head = header.encode()
    with pytest.raises(ValueError, match="weights"):
        weights_from_bytes(struct.pack("<Q", len(head)) + head + body)


def test_big_endian_arrays_are_written_little_endian() -> None:
    w = {"f": np.array([1.5, -2.0], ">f4"), "i": np.array([1, 256], ">i8")}
    data = weights_to_bytes(w)
    out = weights_from_bytes(data)
    assert out["f"].tolist() == [1.5, -2.0] and out["i"].tolist() == [1, 256]
    assert np.array([1.5, -2.0], "<f4").tobytes() in data


def test_get_weights_sends_float32_and_keeps_integer_buffers() -> None:
    model = nn.Sequential(nn.Linear(3, 2).double(), nn.BatchNorm1d(2), nn.Linear(2, 2))
    model[2].to(torch.bfloat16)  # numpy has no bfloat16: it must still export
    w = get_weights(model)
    assert w["0.weight"].dtype == np.float32 and w["2.weight"].dtype == np.float32
    assert w["1.num_batches_tracked"].dtype == np.int64 and w["1.num_batches_tracked"].shape == ()
    # The model keeps its own dtypes when the weights come back, through bytes too.
    set_weights(model, weights_from_bytes(weights_to_bytes(w)))
    assert model[0].weight.dtype == torch.float64 and model[2].weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(model[0].weight.detach().numpy().astype(np.float32),
                                  w["0.weight"])


def test_set_weights_refuses_non_numeric_arrays() -> None:
    model = nn.Linear(2, 1)
    w = get_weights(model)
    w["bias"] = np.array(["x"], dtype=object)
    with pytest.raises(ValueError, match="bias has dtype object"):
        set_weights(model, w)

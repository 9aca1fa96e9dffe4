"""node.weights: numpy weights to wire tensors and back."""

from __future__ import annotations

import numpy as np
import pytest

from node.common.weights import from_tensors, to_tensors


def test_weights_round_trip_with_their_dtypes_and_shapes_including_empty_ones():
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.float32(2.5),
               "steps": np.array([7], np.int64), "empty": np.zeros((0, 3), np.float32),
               "big_endian": np.arange(3, dtype=">f4")}
    back = from_tensors(to_tensors(weights))
    assert list(back) == list(weights)
    for name, arr in weights.items():
        np.testing.assert_array_equal(back[name], np.asarray(arr))
        assert back[name].shape == np.asarray(arr).shape
    assert back["big_endian"].dtype == np.dtype("<f4")


def test_a_dtype_that_cannot_travel_is_refused():
    with pytest.raises(ValueError, match="complex"):
        to_tensors({"c": np.zeros(2, np.complex64)})

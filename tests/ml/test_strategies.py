"""FedAvg: example-weighted mean, exact on simple inputs, strict about shapes."""

from __future__ import annotations

import numpy as np
import pytest

from ml.strategies import fedavg


def test_fedavg_weights_by_example_count_exactly() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, -2.0], np.float32)}
    out = fedavg([(a, 10), (b, 30)])
    assert out["w"].dtype == np.float32
    assert out["w"].tolist() == [2.5, -1.0]


def test_fedavg_of_one_update_is_that_update() -> None:
    rng = np.random.default_rng(0)
    w = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5)}
    out = fedavg([(w, 17)])
    for k in w:
        assert out[k].dtype == w[k].dtype
        np.testing.assert_array_equal(out[k], w[k])


def test_fedavg_of_identical_updates_is_unchanged_bit_for_bit() -> None:
    w = {"a": np.random.default_rng(1).normal(size=100).astype(np.float32)}
    out = fedavg([(w, 3), (w, 5), (w, 11)])
    np.testing.assert_array_equal(out["a"], w["a"])


def test_integer_tensors_stay_integer_and_round() -> None:
    a = {"count": np.array([0, 4], np.int64), "w": np.zeros(2, np.float32)}
    b = {"count": np.array([4, 8], np.int64), "w": np.ones(2, np.float32)}
    out = fedavg([(a, 1), (b, 3)])
    assert out["count"].dtype == np.int64
    assert out["count"].tolist() == [3, 7]
    out = fedavg([(a, 2), (b, 1)])  # [1.333, 5.333] -> nearest integer
    assert out["count"].tolist() == [1, 5]
    assert out["w"].dtype == np.float32


def test_fedavg_does_not_modify_its_inputs() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, -2.0], np.float32)}
    fedavg([(a, 1), (b, 1)])
    assert a["w"].tolist() == [1.0, 2.0] and b["w"].tolist() == [3.0, -2.0]


def test_fedavg_with_no_updates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no updates"):
        fedavg([])


def test_fedavg_with_zero_examples_is_an_error() -> None:
    w = {"w": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="no examples"):
        fedavg([(w, 0), (w, 0)])


def test_fedavg_with_mismatched_tensor_names_is_an_error() -> None:
    a = {"w": np.ones(2, np.float32)}
    b = {"v": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="different tensors"):
        fedavg([(a, 1), (b, 1)])
    with pytest.raises(ValueError, match="different tensors"):
        fedavg([(a, 1), ({**a, "extra": np.ones(1)}, 1)])


def test_fedavg_with_mismatched_shapes_is_an_error() -> None:
    a = {"w": np.ones(2, np.float32)}
    b = {"w": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"w has shape \(3,\), expected \(2,\)"):
        fedavg([(a, 1), (b, 1)])


def test_fedavg_with_a_negative_example_count_is_an_error() -> None:
    # A peer claiming -10 examples would otherwise push the average away from honest ones.
    w = {"w": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="negative example count"):
        fedavg([(w, 20), (w, -10)])


def test_boolean_tensors_take_the_weighted_majority() -> None:
    a = {"mask": np.array([True, True, False])}
    b = {"mask": np.array([False, True, True])}
    assert fedavg([(a, 3), (b, 1)])["mask"].tolist() == [True, True, False]
    assert fedavg([(a, 1), (b, 3)])["mask"].tolist() == [False, True, True]

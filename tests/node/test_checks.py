"""node.peers.checks.check_finite: every float value finite and at most MAX_ABS_WEIGHT in
magnitude, whichever sign and wherever it sits; integer tensors are not bounded."""

from __future__ import annotations

import numpy as np
import pytest

from node.common.weights import to_tensors
from node.peers.checks import MAX_ABS_WEIGHT, check_finite
from protocol.errors import ProtocolError


def tensors(value: float, dtype: str = "float32") -> list:
    w = np.zeros(1000, dtype)
    w[517] = value
    return to_tensors({"ok": np.ones(3, np.float32), "w": w})


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, MAX_ABS_WEIGHT * 2,
                                   -MAX_ABS_WEIGHT * 2])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_a_bad_value_anywhere_is_refused_naming_the_tensor(value, dtype):
    if dtype == "float16" and abs(value) > 65504 and np.isfinite(value):
        value = np.inf  # float16 cannot hold it: it is infinite there
    with pytest.raises(ProtocolError, match="'w'"):
        check_finite(tensors(value, dtype), "update")


def test_values_within_the_bound_pass():
    check_finite(tensors(MAX_ABS_WEIGHT), "model")
    check_finite(tensors(-MAX_ABS_WEIGHT), "model")
    check_finite(to_tensors({"steps": np.array([10**9], np.int64)}), "model")

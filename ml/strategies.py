"""Aggregation strategies: pure functions over (weights, example count) pairs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Weights = dict[str, np.ndarray]


def fedavg(updates: Sequence[tuple[Weights, int]]) -> Weights:
    """Mean of the updates weighted by example counts (FedAvg), accumulated in float64.

    Float tensors keep their dtype. Integer tensors (e.g. counters in buffers) take the
    weighted mean rounded to the nearest integer.
    """
    if not updates:
        raise ValueError("fedavg: no updates")
    total = sum(int(n) for _, n in updates)
    if total <= 0:
        raise ValueError("fedavg: the updates carry no examples")
    keys = list(updates[0][0])
    out: Weights = {}
    for key in keys:
        ref = np.asarray(updates[0][0][key])
        acc = np.zeros(ref.shape, dtype=np.float64)
        for weights, n in updates:
            if set(weights) != set(keys):
                raise ValueError("fedavg: updates have different tensors")
            arr = np.asarray(weights[key])
            if arr.shape != ref.shape:
                raise ValueError(f"fedavg: {key} has shape {arr.shape}, expected {ref.shape}")
            acc += arr.astype(np.float64) * (int(n) / total)
        if np.issubdtype(ref.dtype, np.integer):
            out[key] = np.rint(acc).astype(ref.dtype)
        else:
            out[key] = acc.astype(ref.dtype)
    return out

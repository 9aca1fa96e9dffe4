"""Aggregation strategies: pure functions over (weights, example count) pairs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Weights = dict[str, np.ndarray]


def fedavg(updates: Sequence[tuple[Weights, int]]) -> Weights:
    """Mean of the updates weighted by example counts (FedAvg), accumulated in float64.

    Every tensor keeps the dtype of the first update. Float tensors get the weighted mean.
    Integer tensors (counters in buffers, e.g. BatchNorm's ``num_batches_tracked``) get
    the weighted mean rounded to the nearest integer (halves to even), and boolean
    tensors the weighted majority. ``ValueError`` for no updates, a negative or all-zero
    example count, or updates whose tensor names or shapes differ.
    """
    if not updates:
        raise ValueError("fedavg: no updates")
    counts = [int(n) for _, n in updates]
    if any(n < 0 for n in counts):
        raise ValueError(f"fedavg: negative example count in {counts}")
    total = sum(counts)
    if total <= 0:
        raise ValueError("fedavg: the updates carry no examples")
    first = updates[0][0]
    keys = set(first)
    for weights, _ in updates[1:]:
        if set(weights) != keys:
            raise ValueError("fedavg: updates have different tensors:"
                             f" {sorted(keys ^ set(weights))[:3]}")
    out: Weights = {}
    for key in first:
        ref = np.asarray(first[key])
        acc = np.zeros(ref.shape, dtype=np.float64)
        for (weights, _), n in zip(updates, counts):
            arr = np.asarray(weights[key])
            if arr.shape != ref.shape:
                raise ValueError(f"fedavg: {key} has shape {arr.shape}, expected {ref.shape}")
            acc += arr.astype(np.float64) * (n / total)
        if ref.dtype.kind in "biu":
            out[key] = np.rint(acc).astype(ref.dtype)
        else:
            out[key] = acc.astype(ref.dtype)
    return out

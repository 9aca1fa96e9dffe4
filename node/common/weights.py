"""numpy weights <-> wire tensors, without copies."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocol.tensors import DTYPE_ITEMSIZE, Tensor

Weights = dict[str, np.ndarray]


def to_tensors(weights: Mapping[str, np.ndarray]) -> list[Tensor]:
    """View each array as a little-endian wire tensor (no copy for contiguous arrays)."""
    out = []
    for name, arr in weights.items():
        arr = np.asarray(arr, order="C")  # keeps 0-d tensors 0-d
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        dtype = str(arr.dtype)
        if dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"{name}: dtype {dtype} cannot travel on the wire")
        # A view avoids a copy of large tensors; an empty one cannot be cast (zero shape).
        data = arr.data.cast("B") if arr.size else b""
        out.append(Tensor(name, dtype, tuple(arr.shape), data))
    return out


def from_tensors(tensors: list[Tensor]) -> Weights:
    """Read-only numpy views over wire tensors (validated by the decoder already)."""
    return {
        t.name: np.frombuffer(t.data, dtype=np.dtype(t.dtype).newbyteorder("<")).reshape(t.shape)
        for t in tensors
    }

"""Model weights as plain numpy arrays, and to/from bytes without pickle.

The byte format is the safetensors layout: an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the raw
little-endian tensor bytes. It is read with strict checks, so a corrupt file is an error,
never code execution.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import torch
from torch import nn

Weights = dict[str, np.ndarray]

_TO_CODE = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("float16"): "F16",
            np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16",
            np.dtype("int8"): "I8", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL"}
_FROM_CODE = {v: k for k, v in _TO_CODE.items()}
MAX_HEADER = 16 * 1024 * 1024


def get_weights(model: nn.Module) -> Weights:
    """The model's state dict as C-contiguous numpy copies, in state-dict order."""
    return {k: v.detach().cpu().numpy().copy(order="C") for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Weights) -> None:
    """Load ``weights`` into ``model``; ValueError naming the first key that does not fit."""
    state = model.state_dict()
    missing = [k for k in state if k not in weights]
    extra = [k for k in weights if k not in state]
    if missing or extra:
        raise ValueError(f"weights do not fit the model: missing {missing[:3]}, extra {extra[:3]}")
    new = {}
    for k, ref in state.items():
        arr = np.asarray(weights[k])
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"weights do not fit the model: {k} has shape {arr.shape},"
                             f" expected {tuple(ref.shape)}")
        new[k] = torch.from_numpy(np.array(arr, dtype=arr.dtype, copy=True)).to(ref.dtype)
    model.load_state_dict(new)


def weights_to_bytes(weights: Weights) -> bytes:
    """Serialise in the safetensors layout."""
    header: dict[str, object] = {}
    blobs = []
    offset = 0
    for name, arr in weights.items():
        arr = np.asarray(arr, order="C")  # keeps 0-d tensors 0-d
        native = arr.dtype.newbyteorder("=")
        if native not in _TO_CODE:
            raise ValueError(f"{name}: dtype {arr.dtype} not supported")
        data = arr.astype(native.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _TO_CODE[native], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def weights_from_bytes(data: bytes) -> Weights:
    """Parse ``weights_to_bytes`` output; ValueError on anything corrupt or truncated."""
    if len(data) < 8:
        raise ValueError("weights: truncated (no header length)")
    (n,) = struct.unpack_from("<Q", data)
    if n > MAX_HEADER or 8 + n > len(data):
        raise ValueError("weights: header length out of range")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"weights: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("weights: header is not a map")
    body = memoryview(data)[8 + n :]
    out: Weights = {}
    expected = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _FROM_CODE[meta["dtype"]]
            shape = [int(d) for d in meta["shape"]]
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"weights: bad header entry for {name!r}") from None
        if any(d < 0 for d in shape) or begin != expected or end < begin or end > len(body):
            raise ValueError(f"weights: bad offsets or shape for {name!r}")
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise ValueError(f"weights: {name!r} byte length does not match its shape")
        out[name] = np.frombuffer(body[begin:end], dtype=dtype.newbyteorder("<")).reshape(shape).copy()
        expected = end
    if expected != len(body):
        raise ValueError("weights: trailing or missing bytes")
    return out

"""Model weights as plain numpy arrays, and to/from bytes in the safetensors layout.

The byte format is the safetensors layout: an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (plus an optional
``"__metadata__"`` map of strings), then the raw little-endian tensor bytes. It is read
with strict checks, so a corrupt or hostile input is a ``ValueError``, never code
execution: the header must lie within the data, every dtype must be known, every shape
must match its byte length, and the tensors must tile the data buffer exactly (no gaps,
no overlaps, no trailing bytes), as the safetensors specification requires.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import torch
from torch import nn

Weights = dict[str, np.ndarray]
"""Named arrays, in ``model.state_dict()`` order."""

_TO_CODE: dict[np.dtype[Any], str] = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16",
    np.dtype("int8"): "I8", np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL"}
_FROM_CODE = {v: k for k, v in _TO_CODE.items()}
MAX_HEADER = 16 * 1024 * 1024
"""Largest JSON header accepted (the safetensors reference reader uses 100 MB)."""


def get_weights(model: nn.Module) -> Weights:
    """The model's state dict (parameters and buffers) as C-contiguous numpy copies.

    Floating-point tensors (including float16/bfloat16/float64) come out as float32, so
    every node exchanges the same dtype; integer buffers keep their dtype.
    """
    out: Weights = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        out[name] = np.array(t.numpy(), order="C", copy=True)
    return out


def set_weights(model: nn.Module, weights: Weights) -> None:
    """Load ``weights`` into ``model``, casting to the model's dtypes.

    Strict: a missing or extra name, a shape mismatch or a non-numeric array is a
    ``ValueError`` naming the tensor, and the model is left untouched.
    """
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
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"weights do not fit the model: {k} has dtype {arr.dtype}")
        # A copy: later changes to the caller's arrays must not reach the model.
        new[k] = torch.from_numpy(np.array(arr, order="C", copy=True)).to(ref.dtype)
    model.load_state_dict(new)


def weights_to_bytes(weights: Weights) -> bytes:
    """Serialise in the safetensors layout, tensors in ``weights`` order.

    The header is padded with spaces so that tensor data starts 8-byte aligned.
    """
    header: dict[str, object] = {}
    blobs = []
    offset = 0
    for name, value in weights.items():
        arr = np.asarray(value, order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
        native = arr.dtype.newbyteorder("=")  # a big-endian input is written little-endian
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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"weights: duplicate header entry {key!r}")
        out[key] = value
    return out


def _int(value: object) -> int:
    # JSON true/false are Python bools, and bool is an int: refuse them too.
    if type(value) is not int:
        raise TypeError(value)
    return value


def weights_from_bytes(data: bytes) -> Weights:
    """Parse safetensors-layout bytes into fresh, writable arrays in header order.

    ``ValueError`` on anything corrupt or truncated.
    """
    if len(data) < 8:
        raise ValueError("weights: truncated (no header length)")
    (n,) = struct.unpack_from("<Q", data)
    if n > MAX_HEADER or 8 + n > len(data):
        raise ValueError("weights: header length out of range")
    try:
        header = json.loads(bytes(data[8 : 8 + n]), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"weights: header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("weights: header is not a map")
    body = memoryview(data)[8 + n :]
    entries: list[tuple[int, int, str, np.dtype, tuple[int, ...]]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _FROM_CODE[meta["dtype"]]
            shape = tuple(_int(d) for d in meta["shape"])
            begin, end = (_int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"weights: bad header entry for {name!r}") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= len(body):
            raise ValueError(f"weights: bad offsets or shape for {name!r}")
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise ValueError(f"weights: {name!r} byte length does not match its shape")
        entries.append((begin, end, name, dtype, shape))
    # The tensors must tile the buffer exactly: sorted by offset, each starts where the
    # previous one ended (safetensors writers may order data differently from the header).
    expected = 0
    for begin, end, name, _, _ in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin != expected:
            raise ValueError(f"weights: {name!r} leaves a gap or overlaps another tensor")
        expected = end
    if expected != len(body):
        raise ValueError("weights: trailing or missing bytes")
    out: Weights = {}
    for begin, end, name, dtype, shape in entries:
        le = np.frombuffer(body[begin:end], dtype=dtype.newbyteorder("<"))
        out[name] = le.astype(dtype, copy=True).reshape(shape)
    return out

"""Tensors on the wire: raw little-endian bytes with a dtype from an allowlist and a shape.

This module is pure (no numpy, no torch): a tensor is its dtype name, its shape and its
bytes. ``node`` converts to numpy with ``numpy.frombuffer`` (zero copy).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

#: dtype name -> item size in bytes. Anything else is refused.
DTYPE_ITEMSIZE: Mapping[str, int] = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
MAX_NDIM = 8
MAX_TENSORS = 4096


@dataclass(frozen=True)
class Tensor:
    """One named tensor: little-endian ``data`` of ``dtype`` with ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @property
    def nbytes(self) -> int:
        """Length of the raw data."""
        return len(self.data) if isinstance(self.data, bytes) else self.data.nbytes


def expected_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """shape x itemsize, the only byte length a tensor of this kind may have."""
    n = DTYPE_ITEMSIZE[dtype]
    for dim in shape:
        n *= dim
    return n


def tensor_to_wire(t: Tensor) -> dict[str, Any]:
    """The msgpack-ready map of one tensor."""
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "data": t.data}


def tensor_from_wire(obj: Any) -> Tensor:
    """Validate one decoded tensor map; raise ProtocolError on anything wrong."""
    if not isinstance(obj, dict) or set(obj) != {"name", "dtype", "shape", "data"}:
        raise ProtocolError("tensor: expected a map with name, dtype, shape, data")
    name, dtype, shape, data = obj["name"], obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(name, str) or not name or len(name) > 256:
        raise ProtocolError("tensor: bad name")
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
        raise ProtocolError(f"tensor {name!r}: dtype {str(dtype)[:32]!r} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d < 2**40 for d in shape)
    ):
        raise ProtocolError(f"tensor {name!r}: bad shape")
    if not isinstance(data, bytes):
        raise ProtocolError(f"tensor {name!r}: data must be binary")
    want = expected_nbytes(dtype, shape)
    if want != len(data):
        raise ProtocolError(
            f"tensor {name!r}: shape {shape} x {DTYPE_ITEMSIZE[dtype]} = {want} bytes,"
            f" got {len(data)}"
        )
    return Tensor(name, dtype, tuple(shape), data)


def weights_to_wire(tensors: Iterable[Tensor]) -> list[dict[str, Any]]:
    """A model's tensors, in order, as a msgpack-ready list."""
    return [tensor_to_wire(t) for t in tensors]


def weights_from_wire(obj: Any) -> list[Tensor]:
    """Validate a decoded list of tensors (names unique)."""
    if not isinstance(obj, list) or len(obj) > MAX_TENSORS:
        raise ProtocolError("weights: expected a list of tensors")
    out = [tensor_from_wire(item) for item in obj]
    if len({t.name for t in out}) != len(out):
        raise ProtocolError("weights: duplicate tensor name")
    return out


def weights_digest(tensors: Iterable[Tensor]) -> bytes:
    """SHA-256 over the canonical form of a model (see docs/protocol.md, "Model hash").

    For each tensor in order: u32 length + UTF-8 name, u32 length + dtype, u32 ndim,
    u64 per dim, u64 byte length, raw bytes. All integers big-endian.
    """
    h = hashlib.sha256()
    for t in tensors:
        name = t.name.encode()
        dtype = t.dtype.encode()
        h.update(struct.pack(">I", len(name)) + name + struct.pack(">I", len(dtype)) + dtype)
        h.update(struct.pack(">I", len(t.shape)) + b"".join(struct.pack(">Q", d) for d in t.shape))
        h.update(struct.pack(">Q", t.nbytes))
        h.update(t.data)
    return h.digest()

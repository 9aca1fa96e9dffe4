"""Compressed update deltas (``--compress none|fp16|int8|topk:FRACTION``), pure numpy.

A member that trained from the round's global model ``base`` sends
``delta = update - base`` (``weights_delta``) encoded by a codec; the aggregator decodes it
against the federation's tensor spec and adds it back to its own copy of ``base``
(``apply_delta``). Codecs work tensor by tensor, and every wire name is the tensor's name
plus a two-character reserved suffix, so wire names never collide:

=========  ==========================================================================
codec      payload per floating-point tensor ``<name>``
=========  ==========================================================================
``none``   ``<name>#r``: the delta unchanged, in its own dtype (lossless; a node
           using ``none`` normally sends a full ``update`` instead of a ``delta``)
``fp16``   ``<name>#h``: float16, same shape (round to nearest even)
``int8``   ``<name>#q``: int8 in [-127, 127], same shape, and ``<name>#s``: float32,
           shape ``(1,)``, the per-tensor scale ``max|x| / 127`` (0 for an all-zero
           tensor); symmetric quantization, round to nearest, so every element is off
           by at most ``scale / 2``
``topk:F`` ``<name>#i``: int32 flat (C-order) indices and ``<name>#v``: float32 values
           of the ``k = max(1, ceil(F * size))`` elements of largest magnitude (``k = 0``
           for an empty tensor), sent in increasing index order (any order of distinct
           indices decodes); the others decode to 0
=========  ==========================================================================

Integer and boolean tensors (buffers such as counters) are never compressed: every codec
sends them exactly as given, as ``<name>#r`` in their own dtype.

``Codec.decode`` is the receive path for a peer's bytes, so it trusts nothing but the
spec: a missing or extra name, a wrong dtype or shape, an index out of range or repeated,
an int8 value of -128, a negative or non-finite scale, or a non-finite value (also one
that overflows the target dtype) is a ``ValueError`` naming the tensor, and a fresh dense
delta is returned only when the whole payload is valid. The caller turns the
``ValueError`` into a protocol rejection.

``ErrorFeedback`` keeps what a lossy codec dropped and adds it to the next delta (error
feedback, Stich et al. 2018, Karimireddy et al. 2019), which lets top-k converge where
plain top-k stalls.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import numpy as np

from node.common.weights import from_tensors
from protocol.errors import ProtocolError
from protocol.messages import Delta

Weights = dict[str, np.ndarray]
Spec = Mapping[str, tuple[str, tuple[int, ...]]]
"""Tensor name -> (dtype name, shape), in model order: what a decoded delta must be."""

RAW, HALF, QUANT, SCALE, INDEX, VALUE = "#r", "#h", "#q", "#s", "#i", "#v"
"""The reserved wire-name suffixes."""

_FLOAT_KINDS = "f"
_EXACT_KINDS = "biu"
_FRACTION = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_MAX_INDEXED = 2**31 - 1  # int32 flat indices


def _le(dtype: np.dtype) -> np.dtype:
    # Byte order does not matter for equality: wire arrays are little-endian views.
    return dtype.newbyteorder("<")


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n[:80]) for n in sorted(names)[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def spec_of(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The spec (name -> (dtype name, shape)) of a set of weights or a delta."""
    return {name: (np.asarray(a).dtype.name, tuple(np.shape(a))) for name, a in weights.items()}


def _aligned(base: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
             what: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, base tensor, other tensor) in ``base``'s order; ``ValueError`` if the names
    or shapes differ."""
    if set(other) != set(base):
        raise ValueError(f"delta: {what} and base differ in"
                         f" {_names(list(set(other) ^ set(base)))}")
    out = []
    for name, ref in base.items():
        b, o = np.asarray(ref), np.asarray(other[name])
        if o.shape != b.shape:
            raise ValueError(f"delta: {name} has shape {o.shape}, base has {b.shape}")
        out.append((name, b, o))
    return out


def weights_delta(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Weights:
    """``update - base`` tensor by tensor, in ``base``'s dtypes and order.

    Floating-point tensors are subtracted in their dtype; integer tensors with wrap-around
    and boolean tensors by exclusive-or, so that ``apply_delta`` restores them exactly.
    ``ValueError`` if the names or shapes differ.
    """
    out: Weights = {}
    for name, b, u in _aligned(base, update, "update"):
        if b.dtype.kind == "b":
            out[name] = np.logical_xor(u.astype(bool), b)
        else:
            with np.errstate(over="ignore"):  # integer wrap-around is intended
                out[name] = np.asarray(np.subtract(u.astype(b.dtype), b, dtype=b.dtype))
    return out


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Weights:
    """``base + delta`` (the inverse of ``weights_delta``), in ``base``'s dtypes and order."""
    out: Weights = {}
    for name, b, d in _aligned(base, delta, "delta"):
        if b.dtype.kind == "b":
            out[name] = np.logical_xor(b, d.astype(bool))
        else:
            with np.errstate(over="ignore"):
                out[name] = np.asarray(np.add(b, d.astype(b.dtype), dtype=b.dtype))
    return out


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data in a payload (what ``--compress`` saves; names and framing
    are extra)."""
    return sum(int(np.asarray(a).nbytes) for a in payload.values())


def _check_spec(spec: Spec) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    out = []
    for name, (dtype, shape) in spec.items():
        dt = np.dtype(dtype)
        if dt.kind not in _FLOAT_KINDS + _EXACT_KINDS:
            raise ValueError(f"spec: {name} has dtype {dt}, not a number")
        out.append((name, dt, tuple(int(d) for d in shape)))
    return out


def _part(payload: Mapping[str, np.ndarray], wire: str, dtype: str,
          shape: tuple[int, ...]) -> np.ndarray:
    arr = payload[wire]
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{wire}: not an array")
    if _le(arr.dtype) != _le(np.dtype(dtype)):
        raise ValueError(f"{wire}: dtype {arr.dtype.name}, expected {dtype}")
    if arr.shape != shape:
        raise ValueError(f"{wire}: shape {arr.shape}, expected {shape}")
    return arr


def _finite(wire: str, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{wire}: non-finite value")


class Codec(ABC):
    """One way to put a delta on the wire. ``name`` is the canonical ``--compress`` spec."""

    name: str
    #: Wire-name suffixes of each floating-point tensor's arrays.
    suffixes: ClassVar[tuple[str, ...]]

    @property
    def lossy(self) -> bool:
        """Whether ``decode(encode(d))`` can differ from ``d`` (use ``ErrorFeedback``)."""
        return True

    @abstractmethod
    def _encode_float(self, name: str, x: np.ndarray) -> Weights:
        """Wire arrays for one finite floating-point tensor."""

    @abstractmethod
    def _decode_float(self, name: str, payload: Mapping[str, np.ndarray], dtype: np.dtype,
                      shape: tuple[int, ...]) -> np.ndarray:
        """The dense tensor (float64, or already ``dtype``) from its wire arrays (all
        present, nothing else checked yet)."""

    def encode(self, delta: Mapping[str, np.ndarray]) -> Weights:
        """The arrays to send for ``delta`` (see the module docstring for names).

        ``ValueError`` for a non-numeric tensor, a non-finite value, or one the codec
        cannot represent (beyond float16's range for ``fp16``).
        """
        out: Weights = {}
        for name, value in delta.items():
            x = np.asarray(value)
            if x.dtype.kind in _EXACT_KINDS:
                out[name + RAW] = np.array(x, order="C", copy=True)
            elif x.dtype.kind in _FLOAT_KINDS:
                if not np.isfinite(x).all():
                    raise ValueError(f"{name}: the delta has a non-finite value")
                out.update(self._encode_float(name, np.asarray(x, order="C")))
            else:
                raise ValueError(f"{name}: dtype {x.dtype} cannot be compressed")
        return out

    def decode(self, payload: Mapping[str, np.ndarray], spec: Spec) -> Weights:
        """The dense delta, with ``spec``'s names (in its order), dtypes and shapes.

        Strict, for a payload from a peer: ``ValueError`` unless ``payload`` holds exactly
        the arrays this codec produces for ``spec``, each valid.
        """
        tensors = _check_spec(spec)
        expected: set[str] = set()
        for name, dt, _shape in tensors:
            if dt.kind in _EXACT_KINDS:
                expected.add(name + RAW)
            else:
                expected.update(name + s for s in self.suffixes)
        got = set(payload)
        if got != expected:
            missing, extra = list(expected - got), list(got - expected)
            parts = ([f"missing {_names(missing)}"] if missing else []) + (
                [f"unexpected {_names(extra)}"] if extra else [])
            raise ValueError(f"{self.name} payload: {'; '.join(parts)}")
        out: Weights = {}
        for name, dt, shape in tensors:
            if dt.kind in _EXACT_KINDS:
                out[name] = np.array(_part(payload, name + RAW, dt.name, shape), dtype=dt,
                                     order="C", copy=True)
                continue
            with np.errstate(over="ignore"):  # overflow is caught just below
                dense = np.array(self._decode_float(name, payload, dt, shape), dtype=dt,
                                 order="C", copy=True)
            if not np.isfinite(dense).all():
                raise ValueError(f"{name}: the decoded delta overflows {dt.name}")
            out[name] = dense
        return out

    def __repr__(self) -> str:
        return f"parse_codec({self.name!r})"


@dataclass(frozen=True, repr=False)
class Identity(Codec):
    """``none``: every tensor as given, under ``<name>#r`` (lossless)."""

    name: str = field(default="none", init=False)
    suffixes = (RAW,)

    @property
    def lossy(self) -> bool:
        return False

    def _encode_float(self, name: str, x: np.ndarray) -> Weights:
        return {name + RAW: np.array(x, order="C", copy=True)}

    def _decode_float(self, name: str, payload: Mapping[str, np.ndarray], dtype: np.dtype,
                      shape: tuple[int, ...]) -> np.ndarray:
        # Raw floats must already have the spec's dtype: a silent cast could hide a mismatch.
        arr = _part(payload, name + RAW, dtype.name, shape)
        _finite(name + RAW, arr)
        return arr


@dataclass(frozen=True, repr=False)
class Float16(Codec):
    """``fp16``: each float tensor rounded to float16 (half the bytes of float32)."""

    name: str = field(default="fp16", init=False)
    suffixes = (HALF,)

    def _encode_float(self, name: str, x: np.ndarray) -> Weights:
        with np.errstate(over="ignore"):
            h = np.asarray(x, order="C").astype(np.float16)
        if not np.isfinite(h).all():
            raise ValueError(f"{name}: the delta exceeds float16's range (use int8)")
        return {name + HALF: h}

    def _decode_float(self, name: str, payload: Mapping[str, np.ndarray], dtype: np.dtype,
                      shape: tuple[int, ...]) -> np.ndarray:
        h = _part(payload, name + HALF, "float16", shape)
        _finite(name + HALF, h)
        return h.astype(np.float64)


@dataclass(frozen=True, repr=False)
class Int8(Codec):
    """``int8``: symmetric per-tensor quantization to [-127, 127], round to nearest.

    Nearest (not stochastic) rounding keeps encoding deterministic; its bias is what
    ``ErrorFeedback`` removes when it is used.
    """

    name: str = field(default="int8", init=False)
    suffixes = (QUANT, SCALE)

    @staticmethod
    def scale_for(x: np.ndarray) -> np.float32:
        """The float32 scale sent for ``x``: the smallest float32 ``s`` with
        ``127 * s >= max|x|``, so that no element is clipped."""
        peak = float(np.max(np.abs(x), initial=0.0))
        scale = np.float32(peak / 127.0)
        while float(scale) * 127.0 < peak:  # float32 rounding went down: one ulp up
            scale = np.nextafter(scale, np.float32(np.inf))
        if not np.isfinite(scale):
            raise ValueError("the delta exceeds int8 quantization's range")
        return scale

    def _encode_float(self, name: str, x: np.ndarray) -> Weights:
        scale = self.scale_for(x)
        if scale > 0:
            q = np.clip(np.rint(x.astype(np.float64) / float(scale)), -127, 127)
        else:
            q = np.zeros(x.shape)
        return {name + QUANT: np.asarray(q, dtype=np.int8),
                name + SCALE: np.array([scale], np.float32)}

    def _decode_float(self, name: str, payload: Mapping[str, np.ndarray], dtype: np.dtype,
                      shape: tuple[int, ...]) -> np.ndarray:
        q = _part(payload, name + QUANT, "int8", shape)
        s = _part(payload, name + SCALE, "float32", (1,))
        scale = float(s[0])
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"{name + SCALE}: scale {scale} is not finite and >= 0")
        if q.size and int(q.min()) < -127:
            raise ValueError(f"{name + QUANT}: value -128 is outside [-127, 127]")
        return q.astype(np.float64) * scale


@dataclass(frozen=True, repr=False)
class TopK(Codec):
    """``topk:F``: per tensor, the ``max(1, ceil(F * size))`` entries of largest magnitude.

    ``F`` is read as the exact decimal it is written as, so every node computes the same
    ``k``. Ties in magnitude go to the lower flat index.
    """

    fraction: float
    name: str = field(default="", init=False)
    suffixes = (INDEX, VALUE)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"topk fraction must be in (0, 1], got {self.fraction}")
        object.__setattr__(self, "name", f"topk:{self.fraction!r}")

    def k_for(self, size: int) -> int:
        """How many entries a tensor of ``size`` elements keeps."""
        if size == 0:
            return 0
        return max(1, min(size, math.ceil(Fraction(repr(self.fraction)) * size)))

    def _encode_float(self, name: str, x: np.ndarray) -> Weights:
        flat = np.asarray(x, order="C").reshape(-1)
        if flat.size > _MAX_INDEXED:
            raise ValueError(f"{name}: {flat.size} elements are too many for int32 indices")
        k = self.k_for(flat.size)
        mag = np.abs(flat)
        if k == flat.size:
            keep = np.arange(k)
        else:
            # Linear-time selection around the k-th largest magnitude; among equal
            # magnitudes at the threshold the lower indices win, so encoding is deterministic.
            threshold = np.partition(mag, flat.size - k)[flat.size - k]
            above = np.flatnonzero(mag > threshold)
            tied = np.flatnonzero(mag == threshold)[: k - above.size]
            keep = np.sort(np.concatenate([above, tied]))
        with np.errstate(over="ignore"):
            values = flat[keep].astype(np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: the delta exceeds float32's range")
        return {name + INDEX: keep.astype(np.int32), name + VALUE: values}

    def _decode_float(self, name: str, payload: Mapping[str, np.ndarray], dtype: np.dtype,
                      shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        k = self.k_for(size)
        idx = _part(payload, name + INDEX, "int32", (k,))
        val = _part(payload, name + VALUE, "float32", (k,))
        _finite(name + VALUE, val)
        if k and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise ValueError(f"{name + INDEX}: index out of range 0..{size - 1}")
        if np.unique(idx).size != k:
            raise ValueError(f"{name + INDEX}: repeated index")
        dense = np.zeros(size, np.float64)
        dense[idx.astype(np.int64)] = val
        return dense.reshape(shape)


CODECS = ("none", "fp16", "int8", "topk:FRACTION")
"""The ``--compress`` choices, for help texts."""


def parse_codec(spec: str) -> Codec:
    """The codec for a ``--compress`` value (or a ``delta``'s ``codec`` field).

    ``none``, ``fp16``, ``int8`` or ``topk:FRACTION`` with FRACTION a decimal number in
    (0, 1], e.g. ``topk:0.01``. ``ValueError`` for anything else.
    """
    if not isinstance(spec, str):
        raise ValueError(f"compression must be a string, got {type(spec).__name__}")
    if spec == "none":
        return Identity()
    if spec == "fp16":
        return Float16()
    if spec == "int8":
        return Int8()
    if spec.startswith("topk:"):
        text = spec[5:]
        if not _FRACTION.fullmatch(text):
            raise ValueError(f"compression {spec[:40]!r}: FRACTION must be a decimal number"
                             " in (0, 1], e.g. topk:0.01")
        fraction = float(text)
        if not 0 < fraction <= 1:
            raise ValueError(f"compression {spec[:40]!r}: FRACTION must be in (0, 1]")
        return TopK(fraction)
    raise ValueError(f"unknown compression {spec[:40]!r}; choose one of {', '.join(CODECS)}")


class ErrorFeedback:
    """Per-node residual memory for a lossy codec (error feedback / error compensation).

    ``compress(delta)`` encodes ``delta + residual`` and keeps as the new residual what
    the receiver will not see, ``(delta + residual) - decode(payload)``, so that no part
    of an update is lost for good, only delayed. Residuals are float64 per floating-point
    tensor; integer and boolean tensors are sent exactly and have none.

    It assumes every payload it produced is applied by the aggregator. If one is lost
    (refused, round abandoned), the most faithful recovery is ``restore(payload)``, which
    adds the lost payload's decoded content back into the residual.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._residual: dict[str, np.ndarray] = {}

    def compress(self, delta: Mapping[str, np.ndarray]) -> Weights:
        """The payload to send for ``delta``, with the stored residual added first.

        ``ValueError`` if a tensor's shape differs from its stored residual (``reset()``
        after changing the model) or if the delta is not finite.
        """
        corrected: Weights = {}
        target: dict[str, np.ndarray] = {}  # delta + residual, float64, per float tensor
        for name, value in delta.items():
            x = np.asarray(value)
            if x.dtype.kind not in _FLOAT_KINDS:
                corrected[name] = x
                continue
            r = self._residual.get(name)
            if r is not None and r.shape != x.shape:
                raise ValueError(f"error feedback: {name} has shape {x.shape}, its residual"
                                 f" {r.shape}; reset() after changing the model")
            target[name] = np.asarray(x.astype(np.float64) + (r if r is not None else 0.0))
            corrected[name] = target[name].astype(x.dtype)
        payload = self.codec.encode(corrected)
        decoded = self.codec.decode(payload, spec_of(corrected))
        # Against the float64 target, so the cast to the delta's dtype loses nothing either.
        self._residual = {name: np.asarray(t - decoded[name].astype(np.float64))
                          for name, t in target.items()}
        return payload

    def restore(self, payload: Mapping[str, np.ndarray],
                spec: Spec) -> None:
        """Put back a payload that never reached the aggregator: its decoded content
        joins the residual, to be sent with the next delta."""
        decoded = self.codec.decode(payload, spec)
        for name, value in decoded.items():
            if value.dtype.kind in _FLOAT_KINDS:
                r = self._residual.get(name)
                self._residual[name] = np.asarray(value.astype(np.float64)
                                                  + (r if r is not None else 0.0))

    def reset(self) -> None:
        """Forget the residual (a new model, or a new run)."""
        self._residual = {}

    def state(self) -> dict[str, np.ndarray]:
        """The residual, tensor name -> float64 array (copies), to persist."""
        return {name: r.copy() for name, r in self._residual.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a residual saved by ``state()``. ``ValueError`` for a non-float or
        non-finite array (the store is left unchanged)."""
        new = {}
        for name, value in state.items():
            arr = np.asarray(value)
            if arr.dtype.kind not in _FLOAT_KINDS or not np.isfinite(arr).all():
                raise ValueError(f"error feedback state: {name} is not a finite float array")
            new[name] = arr.astype(np.float64, copy=True)
        self._residual = new


def decode_delta(delta: Delta, spec: list[tuple[str, str, tuple[int, ...]]]) -> Weights:
    """Decode a compressed update against the federation's tensors ``spec`` (name, dtype,
    shape): the dense difference to its base model (ProtocolError if malformed)."""
    try:
        codec = parse_codec(delta.codec)
        return codec.decode(from_tensors(delta.weights),
                            {name: (dtype, shape) for name, dtype, shape in spec})
    except ValueError as exc:
        raise ProtocolError(f"delta: {exc}") from None

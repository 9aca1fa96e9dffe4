"""Test helpers: fixed identities, small tensors, and hand-built signed frames.

``sign_payload`` frames an arbitrary payload exactly as protocol/envelope.py signs one
(Ed25519 over DOMAIN + SHA-256(payload bytes)), so that a test can build a frame whose
signature is valid but whose content is wrong, and prove that the content check, not the
signature check, rejects it.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack

from protocol.envelope import DOMAIN, PROTOCOL_VERSION
from protocol.identity import Identity
from protocol.tensors import Tensor

FED = "test-fed"
TS = 1_700_000_000_000  # a fixed wall clock, in ms


def identity(n: int) -> Identity:
    """A deterministic identity; different ``n``, different key."""
    return Identity.from_seed(bytes([n]) * 32)


def f32(name: str, values: list[float], shape: tuple[int, ...] | None = None) -> Tensor:
    """A little-endian float32 tensor."""
    return Tensor(name, "float32", shape or (len(values),),
                  struct.pack(f"<{len(values)}f", *values))


def genesis() -> list[Tensor]:
    """A tiny model: a 2x3 matrix and a bias vector of 2."""
    return [f32("w", [0.0] * 6, (2, 3)), f32("b", [0.0, 0.0])]


def weights(value: float) -> list[Tensor]:
    """Weights with the genesis spec, every element ``value``."""
    return [f32("w", [value] * 6, (2, 3)), f32("b", [value, value])]


def tensor_map(name: str = "w", dtype: str = "float32", shape: Any = (2,),
               data: Any = bytes(8)) -> dict[str, Any]:
    """One tensor as a wire map (fields freely wrong)."""
    return {"name": name, "dtype": dtype, "shape": list(shape) if isinstance(shape, tuple)
            else shape, "data": data}


def hello_body(**changes: Any) -> dict[str, Any]:
    body = {"name": "alice", "nonce": bytes(range(32)), "echo": bytes(32), "port": 7700,
            "genesis": bytes(32), "round": 0, "proof": b""}
    body.update(changes)
    return body


def update_body(**changes: Any) -> dict[str, Any]:
    body = {"round": 1, "attempt": 0, "base": bytes(32), "n": 10, "loss": 0.5,
            "secs": 1.25, "weights": [tensor_map()]}
    body.update(changes)
    return body


def model_body(aggregator: bytes, **changes: Any) -> dict[str, Any]:
    body = {"round": 1, "attempt": 0, "aggregator": aggregator, "contributors": [aggregator],
            "n": 10, "digest": bytes(32), "weights": [tensor_map()]}
    body.update(changes)
    return body


def heartbeat_body(**changes: Any) -> dict[str, Any]:
    body = {"round": 0, "state": "training", "ping_ts": TS, "echo_ts": 0}
    body.update(changes)
    return body


def payload(signer: Identity, mtype: str, body: Any, **changes: Any) -> dict[str, Any]:
    """An envelope payload map; ``changes`` override or add top-level fields."""
    out = {"v": PROTOCOL_VERSION, "type": mtype, "from": signer.public_key, "seq": 1,
           "ts": TS, "fed": FED, "body": body}
    out.update(changes)
    return out


def sign_payload(signer: Identity, payload_obj: dict[str, Any] | bytes) -> bytes:
    """Pack (unless already bytes) and sign a payload; return the frame [payload, sig]."""
    packed = payload_obj if isinstance(payload_obj, bytes) else msgpack.packb(
        payload_obj, use_bin_type=True)
    signature = signer.sign(DOMAIN + hashlib.sha256(packed).digest())
    return msgpack.packb([packed, signature], use_bin_type=True)

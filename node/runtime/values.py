"""Value checks the executor makes on weights (node.runtime.executor): how far an update
moves the global model (the aggregator's bound, docs/trust.md), and whether what we
trained is something our peers would accept before it leaves this node."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from node.peers.checks import check_finite
from node.runtime.learner import Weights
from protocol.errors import ProtocolError
from protocol.tensors import Tensor


@dataclass
class Decoded:
    """A round's updates as dense weights with example counts, and those refused (why)."""

    updates: dict[bytes, tuple[Weights, int]]
    refused: dict[bytes, str]


def l2_norm(arrays: Iterable[np.ndarray]) -> float:
    """The L2 norm of all floating-point ``arrays`` together (float64)."""
    total = 0.0
    for a in arrays:
        if a.dtype.kind == "f":
            flat = a.ravel().astype(np.float64)
            total += float(np.dot(flat, flat))
    return math.sqrt(total)


class TrainingDiverged(ValueError):
    """Our own training produced values peers would refuse (NaN, infinite, too large)."""


def check_trained(tensors: list[Tensor], loss: float, what: str) -> None:
    """TrainingDiverged unless a trained model and its loss are what peers accept: a
    finite loss (section 3.2 of docs/protocol.md) and weights that pass
    node.peers.checks.check_finite (finite, at most ``MAX_ABS_WEIGHT`` in magnitude)."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"{what}: training diverged (loss {loss})")
    try:
        check_finite(tensors, "trained model")
    except ProtocolError as exc:
        raise TrainingDiverged(f"{what}: training diverged ({exc.reason})") from None

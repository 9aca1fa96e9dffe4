"""The record of one completed round, as status, ``/api/metrics`` and the database see it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class RoundRecord:
    """What one completed round looked like from this node."""

    round: int
    accuracy: float | None
    loss: float | None
    aggregator: str
    contributors: int
    num_examples: int
    model_hash: str
    started_at: float
    committed_at: float
    evaluated_at: float
    train_seconds: float
    round_seconds: float
    update_bytes: int
    model_bytes: int
    #: Privacy budget spent by this node when the round was recorded (None without DP).
    epsilon: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

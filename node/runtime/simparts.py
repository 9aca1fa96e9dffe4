"""The parts a simulated node has instead of I/O: a vector learner, an in-memory
checkpoint store (with an injectable fault), an in-memory round log and an event sink.

node.runtime.sim wires them to the real ``NodeCore`` and the real ``Executor``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.runtime.checkpoints import Checkpoint, decode_checkpoint, encode_checkpoint
from node.runtime.learner import Weights


@dataclass(frozen=True)
class VectorTrained:
    """What ``VectorLearner.train`` returns."""

    weights: Weights
    num_examples: int
    loss: float
    seconds: float


@dataclass(frozen=True)
class VectorEvaluated:
    """What ``VectorLearner.evaluate`` returns."""

    loss: float
    accuracy: float
    num_examples: int


class VectorLearner:
    """A stand-in ``Learner``: each node pulls the model towards its own target vector.

    ``budget``: the number of trainings allowed, after which ``can_train`` refuses as a
    spent privacy budget does (None: unlimited)."""

    def __init__(self, index: int, size: int = 8, num_examples: int = 100,
                 budget: int | None = None) -> None:
        rng = np.random.default_rng(index)
        self.target = rng.normal(size=size).astype(np.float32)
        self.size = size
        self._num_examples = num_examples
        self.budget = budget
        self.trained = 0

    @property
    def num_examples(self) -> int:
        return self._num_examples

    def initial_weights(self) -> Weights:
        return {"w": np.zeros(self.size, np.float32), "b": np.zeros(2, np.float32)}

    def train(self, weights: Weights, round_number: int,
              stop: threading.Event | None = None) -> VectorTrained:
        self.trained += 1
        w = weights["w"] + 0.5 * (self.target - weights["w"])
        out = {"w": w.astype(np.float32), "b": (weights["b"] + 1).astype(np.float32)}
        return VectorTrained(out, self._num_examples, self._loss(out), 1.0)

    def _loss(self, weights: Weights) -> float:
        return float(np.mean((weights["w"] - self.target) ** 2))

    def evaluate(self, weights: Weights) -> VectorEvaluated:
        loss = self._loss(weights)
        return VectorEvaluated(loss, 1.0 / (1.0 + loss), self._num_examples)

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        return self.average(updates)

    def average(self, models: Sequence[tuple[Weights, int]]) -> Weights:
        total = sum(n for _, n in models)
        out = {}
        for k in models[0][0]:
            acc = np.zeros(models[0][0][k].shape, np.float64)
            for w, n in models:
                acc += w[k].astype(np.float64) * n
            out[k] = (acc / total).astype(np.float32)
        return out

    def can_train(self) -> str | None:
        if self.budget is not None and self.trained >= self.budget:
            return f"privacy budget spent after {self.budget} trainings"
        return None

    def privacy(self) -> dict[str, Any] | None:
        return None

    def describe(self) -> dict[str, object]:
        return {"model": "vector", "size": self.size}


class MemoryCheckpoints:
    """Checkpoints in memory, in the file format (so restore checks them the same way).

    ``fault``: when set, every save raises it (a full disk), until it is cleared."""

    def __init__(self) -> None:
        self.rounds: dict[int, bytes] = {}
        self.offline: bytes | None = None
        self.fault: OSError | None = None
        self.saves = 0

    def save(self, round_number: int, digest: bytes, frame: bytes) -> None:
        if self.fault is not None:
            raise self.fault
        self.rounds[round_number] = encode_checkpoint(round_number, digest, frame)
        for old in sorted(self.rounds)[:-3]:
            del self.rounds[old]
        self.saves += 1

    def save_offline(self, round_number: int, digest: bytes, frame: bytes) -> None:
        if self.fault is not None:
            raise self.fault
        self.offline = encode_checkpoint(round_number, digest, frame)
        self.saves += 1

    def load_latest(self, verify: Callable[[int, bytes, bytes], None]) -> Checkpoint | None:
        for r in sorted(self.rounds, reverse=True):
            checkpoint = self._load(self.rounds[r], verify, f"round-{r:06d}")
            if checkpoint is not None:
                return checkpoint
        return None

    def load_offline(self, verify: Callable[[int, bytes, bytes], None]) -> Checkpoint | None:
        return None if self.offline is None else self._load(self.offline, verify, "offline")

    @staticmethod
    def _load(data: bytes, verify: Callable[[int, bytes, bytes], None],
              name: str) -> Checkpoint | None:
        try:
            round_number, digest, frame = decode_checkpoint(data)
            verify(round_number, digest, frame)
        except ValueError:
            return None
        return Checkpoint(round_number, digest, frame, Path(f"memory/{name}.ckpt"))


@dataclass
class MemoryLog:
    """Per-round records in memory (the ``RoundLog`` of a simulated node)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def record_round(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


class SimEvents:
    """A simulated node's ``EventSink``: notes with their simulated time, and the commits
    seen in ``round_completed`` events, asserting one model per round: a node restarted
    from older checkpoints may apply a round again, but only with the same model."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.notes: list[tuple[float, str, str]] = []
        self.commits: dict[int, bytes] = {}

    def note(self, kind: str, detail: str) -> None:
        self.notes.append((self.clock(), kind, detail))

    def publish(self, event: str, data: dict[str, Any]) -> None:
        if event == "round_completed":
            digest = bytes.fromhex(data["model_hash"])
            assert self.commits.setdefault(data["round"], digest) == digest, (
                "two models applied for one round")

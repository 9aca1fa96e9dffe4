"""A learner without torch, for node tests: a linear model on a seeded toy problem."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from node.peers.channel import Channel


@dataclass(frozen=True)
class Trained:
    weights: dict[str, np.ndarray]
    num_examples: int
    loss: float
    seconds: float


@dataclass(frozen=True)
class Evaluated:
    loss: float
    accuracy: float
    num_examples: int


class FakeLearner:
    """Least squares by gradient steps; 'accuracy' is 1 / (1 + loss)."""

    def __init__(self, index: int, dim: int = 16, delay: float = 0.0) -> None:
        rng = np.random.default_rng(100 + index)
        self.true = np.arange(dim, dtype=np.float32) / dim
        self.x = rng.normal(size=(64, dim)).astype(np.float32)
        self.y = self.x @ self.true
        self.dim = dim
        self.delay = delay
        # gradient descent on 64 examples stays stable for large ``dim`` too
        self.step = 0.05 * min(1.0, 64 / dim)
        self.trained_rounds: list[int] = []
        #: Set by a test to make the node stop training, as an exhausted budget does.
        self.refusal: str | None = None

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {"w": np.zeros(self.dim, np.float32), "b": np.zeros(1, np.float32)}

    def _loss(self, w: np.ndarray) -> float:
        return float(np.mean((self.x @ w - self.y) ** 2))

    def train(self, weights, round_number: int, stop: threading.Event | None = None) -> Trained:
        start = time.perf_counter()
        w = np.array(weights["w"], dtype=np.float32)
        for _ in range(20):
            if stop is not None and stop.is_set():
                break
            grad = 2 * self.x.T @ (self.x @ w - self.y) / len(self.x)
            w = (w - self.step * grad).astype(np.float32)
            if self.delay:
                time.sleep(self.delay / 20)
        self.trained_rounds.append(round_number)
        return Trained({"w": w, "b": np.array(weights["b"]) + 1}, len(self.x), self._loss(w),
                       time.perf_counter() - start)

    def evaluate(self, weights) -> Evaluated:
        loss = self._loss(np.asarray(weights["w"]))
        return Evaluated(loss, 1.0 / (1.0 + loss), len(self.x))

    def average(self, updates: Sequence[tuple[dict[str, np.ndarray], int]]):
        total = sum(n for _, n in updates)
        return {k: (sum(w[k].astype(np.float64) * n for w, n in updates) / total).astype(np.float32)
                for k in updates[0][0]}

    def aggregate(self, base, updates: Sequence[tuple[dict[str, np.ndarray], int]]):
        return self.average(updates)

    def can_train(self) -> str | None:
        return self.refusal

    def privacy(self):
        return None

    @property
    def num_examples(self) -> int:
        return len(self.x)

    def describe(self) -> dict[str, object]:
        return {"dataset": "fake", "model": "linear", "num_examples": len(self.x)}


def idle_channel(ws: object) -> Channel:
    """A link channel over ``ws`` with zero keys, for link tests that never exchange
    records (the transport needs one on every Link)."""
    return Channel(ws, bytes(32), bytes(32), (bytes(32), bytes(32)))  # type: ignore[arg-type]

"""The seam between the node and machine learning.

The node never imports ``ml``: it talks to anything with these methods. ``node.cli.main`` wires
in ``ml.learner.TorchLearner``; node tests use small fakes without torch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

Weights = dict[str, np.ndarray]


class TrainResultLike(Protocol):
    """What ``Learner.train`` returns (read-only: frozen dataclasses fit)."""

    @property
    def weights(self) -> Weights: ...

    @property
    def num_examples(self) -> int: ...

    @property
    def loss(self) -> float: ...

    @property
    def seconds(self) -> float: ...


class EvalResultLike(Protocol):
    """What ``Learner.evaluate`` returns (read-only)."""

    @property
    def loss(self) -> float: ...

    @property
    def accuracy(self) -> float: ...

    @property
    def num_examples(self) -> int: ...


class Learner(Protocol):
    """Local training, evaluation and aggregation over plain numpy weights.

    Methods block and are called from a worker thread, one at a time.
    """

    def initial_weights(self) -> Weights:
        """The genesis model: identical on every node with the same configuration."""

    def train(self, weights: Weights, round_number: int,
              stop: threading.Event | None = None) -> TrainResultLike:
        """Train locally from ``weights``; return early when ``stop`` is set."""

    def evaluate(self, weights: Weights) -> EvalResultLike:
        """Loss and accuracy on the held-out test split."""

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """The next global model from the current one (``base``, with any strategy-state
        tensors) and the round's (weights, example count) pairs: the configured strategy."""

    def average(self, models: Sequence[tuple[Weights, int]]) -> Weights:
        """Offline gossip averaging of (weights, example count) pairs (FedAvg)."""

    def can_train(self) -> str | None:
        """Why another round of training is not allowed (the privacy budget), or None."""

    def privacy(self) -> dict[str, Any] | None:
        """The privacy budget spent (docs/api.md, ``privacy``), or None without DP."""

    @property
    def num_examples(self) -> int:
        """Size of this node's training shard."""

    def describe(self) -> dict[str, object]:
        """Facts about the data and model, for status."""

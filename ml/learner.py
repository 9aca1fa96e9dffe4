"""``TorchLearner``: the real implementation of the node's Learner seam."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .datasets import load_dataset
from .models import build_model
from .partition import partition_indices
from .strategies import fedavg
from .training import evaluate, train_local
from .weights import Weights, get_weights, set_weights


@dataclass(frozen=True)
class TrainResult:
    """Weights after local training, with the shard size, mean loss and time."""

    weights: Weights
    num_examples: int
    loss: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on the held-out test split."""

    loss: float
    accuracy: float
    num_examples: int


class TorchLearner:
    """Trains one node's shard of a data set with a registered model.

    The shard is ``partition_indices(train labels, num_partitions, partition_index)``,
    so nodes that agree on (dataset, partition, alpha, num_partitions, seed) hold
    disjoint shards that cover the training set. Local training is SGD with momentum
    0.9 (see ``ml.training.train_local``). The defaults take three digits nodes to
    >= 90 % test accuracy in 5 FedAvg rounds, IID or Dirichlet(0.5).

    Methods run on one worker thread at a time; a lock makes concurrent calls safe too.
    ``ValueError`` from the constructor means a bad configuration (unknown name,
    missing data, bad hyperparameter), with a message meant for the operator.
    """

    def __init__(self, *, dataset: str = "digits", model: str = "cnn",
                 data_dir: str | None = None, download: bool = False,
                 partition: str = "iid", alpha: float = 0.5, num_partitions: int = 1,
                 partition_index: int = 0, seed: int = 0, local_epochs: int = 2,
                 batch_size: int = 32, lr: float = 0.05) -> None:
        if local_epochs < 1 or batch_size < 1:
            raise ValueError(f"local_epochs ({local_epochs}) and batch_size ({batch_size})"
                             " must be >= 1")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.data = load_dataset(dataset, data_dir=data_dir, download=download, seed=seed)
        idx = partition_indices(self.data.train_y.numpy(), num_partitions, partition_index,
                                scheme=partition, alpha=alpha, seed=seed)
        index = torch.from_numpy(idx)
        self.x = self.data.train_x[index]
        self.y = self.data.train_y[index]
        self.model_name = model
        self.partition = partition
        self.alpha = alpha
        self.num_partitions = num_partitions
        self.partition_index = partition_index
        self.seed = seed
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.lr = lr
        self._lock = threading.Lock()
        # Seeded in a forked RNG: identical genesis weights on every node with the same
        # seed, without resetting the caller's global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_model(model, self.data.input_shape, self.data.num_classes)
        self._initial = get_weights(self.model)

    def initial_weights(self) -> Weights:
        """The genesis model: built right after ``torch.manual_seed(seed)``, so identical
        on every node with the same seed, model and data set."""
        return {k: v.copy() for k, v in self._initial.items()}

    def train(self, weights: Weights, round_number: int,
              stop: threading.Event | None = None) -> TrainResult:
        """``local_epochs`` of SGD on this shard, starting from ``weights``.

        The shuffle seed comes from (seed, partition_index, round_number), so a rerun of a
        round reproduces its update bit for bit. ``weights`` is not modified.
        """
        with self._lock:
            set_weights(self.model, weights)
            stats = train_local(
                self.model, self.x, self.y, epochs=self.local_epochs,
                batch_size=self.batch_size, lr=self.lr,
                seed=(self.seed * 1_000_003 + self.partition_index * 10_007 + round_number) % 2**31,
                stop=stop,
            )
            return TrainResult(get_weights(self.model), stats.num_examples, stats.loss,
                               stats.seconds)

    def evaluate(self, weights: Weights) -> EvalResult:
        """Accuracy and loss of ``weights`` on the test split."""
        with self._lock:
            set_weights(self.model, weights)
            s = evaluate(self.model, self.data.test_x, self.data.test_y)
            return EvalResult(s.loss, s.accuracy, s.num_examples)

    def aggregate(self, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """FedAvg weighted by example counts."""
        return fedavg(updates)

    @property
    def num_examples(self) -> int:
        """Examples in this node's shard."""
        return len(self.x)

    def describe(self) -> dict[str, object]:
        """Data and model facts for status."""
        counts = np.bincount(self.y.numpy(), minlength=self.data.num_classes)
        return {
            "dataset": self.data.name, "model": self.model_name, "partition": self.partition,
            "alpha": self.alpha if self.partition == "dirichlet" else None,
            "partition_index": self.partition_index, "num_partitions": self.num_partitions,
            "num_examples": self.num_examples, "test_examples": len(self.data.test_y),
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
            "input_shape": list(self.data.input_shape), "num_classes": self.data.num_classes,
            "label_counts": counts.tolist(),
        }

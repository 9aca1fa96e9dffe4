"""``TorchLearner``: the real implementation of the node's Learner seam."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import load_dataset
from .models import build_model
from .partition import partition_indices
from .privacy import (
    DPConfig,
    DPTrainStats,
    PrivacyLedger,
    check_model_for_dp,
    poisson_schedule,
    train_local_dp,
)
from .strategies import FedAvg, Median, Strategy, fedavg, proximal_mu, split_state
from .training import TrainStats, evaluate, train_local
from .weights import Weights, get_weights, set_weights

log = logging.getLogger(__name__)


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
                 batch_size: int = 32, lr: float = 0.05, strategy: Strategy | None = None,
                 dp: DPConfig | None = None, ledger_path: str | Path | None = None,
                 rounds: int = 1) -> None:
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
        self.strategy: Strategy = strategy or FedAvg()
        self.dp = dp
        self.ledger: PrivacyLedger | None = None
        self._privacy: dict[str, Any] | None = None
        if dp is not None:
            self._setup_dp(dp, ledger_path, rounds)

    def _setup_dp(self, dp: DPConfig, ledger_path: str | Path | None, rounds: int) -> None:
        """Check the model and delta, fix the noise for the planned run, load the ledger
        (one per node, for its whole life: a corrupt one stops the node, never resets)."""
        if ledger_path is None:
            raise ValueError("--dp needs a state dir for its privacy ledger")
        check_model_for_dp(self.model)
        dp.check_delta(len(self.x))
        self.sample_rate, self.steps_per_epoch = poisson_schedule(len(self.x), self.batch_size)
        self.noise_multiplier = dp.resolve_noise_multiplier(
            sample_rate=self.sample_rate,
            planned_steps=rounds * self.local_epochs * self.steps_per_epoch)
        self.ledger_path = Path(ledger_path)
        self.ledger = PrivacyLedger.load(self.ledger_path)
        self._privacy = self._snapshot_privacy()
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
        model_weights, _ = split_state(weights)
        seed = (self.seed * 1_000_003 + self.partition_index * 10_007 + round_number) % 2**31
        stats: TrainStats | DPTrainStats
        with self._lock:
            set_weights(self.model, model_weights)
            if self.dp is not None and self.ledger is not None:
                # Fresh OS randomness: a seed every peer can compute would let them
                # subtract the noise. Steps are recorded, then saved, before the update
                # leaves this node.
                stats = train_local_dp(
                    self.model, self.x, self.y, epochs=self.local_epochs,
                    batch_size=self.batch_size, lr=self.lr, seed=None, ledger=self.ledger,
                    noise_multiplier=self.noise_multiplier,
                    max_grad_norm=self.dp.max_grad_norm, delta=self.dp.delta, stop=stop)
                self.ledger.save(self.ledger_path)
                self._privacy = self._snapshot_privacy()
            else:
                # FedProx anchors on the global model just loaded (train_local's default).
                stats = train_local(
                    self.model, self.x, self.y, epochs=self.local_epochs,
                    batch_size=self.batch_size, lr=self.lr, seed=seed, stop=stop,
                    prox_mu=proximal_mu(self.strategy))
            return TrainResult(get_weights(self.model), stats.num_examples, stats.loss,
                               stats.seconds)

    def can_train(self) -> str | None:
        """Why this node may not train another round (None: it may): with DP, when the
        next round would spend more than the privacy budget."""
        if self.dp is None or self.ledger is None or self.dp.within_budget(
                self.ledger, noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=self.local_epochs * self.steps_per_epoch):
            return None
        spent = self.ledger.epsilon(self.dp.delta)
        return (f"privacy budget: another round would spend more than epsilon"
                f" {self.dp.target_epsilon:g} (spent {spent:.3f})")

    def privacy(self) -> dict[str, Any] | None:
        """The privacy budget spent over this node's life (None without DP).

        Read by every status request (the event loop, several times a second with the
        dashboard open): a snapshot made when the ledger changes, not an RDP computation."""
        return self._privacy

    def _snapshot_privacy(self) -> dict[str, Any] | None:
        if self.dp is None or self.ledger is None:
            return None
        return {
            "epsilon": self.ledger.epsilon(self.dp.delta), "delta": self.dp.delta,
            "target_epsilon": self.dp.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.dp.max_grad_norm, "sample_rate": self.sample_rate,
            "total_steps": self.ledger.total_steps, "exhausted": self.can_train() is not None,
        }

    def evaluate(self, weights: Weights) -> EvalResult:
        """Accuracy and loss of ``weights`` on the test split."""
        with self._lock:
            set_weights(self.model, split_state(weights)[0])
            s = evaluate(self.model, self.data.test_x, self.data.test_y)
            return EvalResult(s.loss, s.accuracy, s.num_examples)

    def aggregate(self, base: Weights, updates: Sequence[tuple[Weights, int]]) -> Weights:
        """The next global model from ``base`` (the current one, with any strategy state)
        and the round's updates, by the configured strategy."""
        try:
            return self.strategy.aggregate(base, updates)
        except ValueError as exc:
            # A robust strategy that cannot run on this round's updates (Krum with
            # n <= 2f + 2, say, after a deadline): the coordinate-wise median still
            # resists a minority of bad updates.
            log.warning("strategy %s refused this round (%s); using the median",
                        getattr(self.strategy, "name", "?"), exc)
            return Median().aggregate(base, updates)

    def average(self, models: Sequence[tuple[Weights, int]]) -> Weights:
        """Offline gossip averaging: FedAvg weighted by example counts."""
        return fedavg(models)

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
            "label_counts": None if self.dp else counts.tolist(),
            "strategy": getattr(self.strategy, "name", type(self.strategy).__name__),
            "dp": self.dp is not None,
        }

"""Local training and evaluation loops."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrainStats:
    """What one call of ``train_local`` did."""

    num_examples: int
    loss: float
    steps: int
    seconds: float
    stopped: bool


@dataclass(frozen=True)
class EvalStats:
    """Mean loss and accuracy on a data set."""

    loss: float
    accuracy: float
    num_examples: int


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                batch_size: int, lr: float, seed: int, momentum: float = 0.9,
                stop: threading.Event | None = None) -> TrainStats:
    """SGD (momentum 0.9 by default) over shuffled mini-batches, in place on ``model``.

    Shuffling uses a ``torch.Generator`` seeded with ``seed``, so identical inputs give
    bit-identical weights (on one thread). ``stop`` is checked before every batch, so a
    node can abandon a round promptly; ``loss`` is the mean over the last epoch run.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    if not lr > 0 or not 0 <= momentum < 1:
        raise ValueError(f"need lr > 0 (got {lr}) and 0 <= momentum < 1 (got {momentum})")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    start = time.perf_counter()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    steps, last_total, last_count, stopped = 0, 0.0, 0, False
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        last_total, last_count = 0.0, 0
        for i in range(0, n, batch_size):
            if stop is not None and stop.is_set():
                stopped = True
                break
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            steps += 1
            last_total += float(loss.detach()) * len(idx)
            last_count += len(idx)
        if stopped:
            break
    mean = last_total / last_count if last_count else float("nan")
    return TrainStats(n, mean, steps, time.perf_counter() - start, stopped)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 512) -> EvalStats:
    """Mean cross-entropy loss and accuracy, in eval mode and without gradients."""
    model.train(False)  # evaluation mode
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        total += float(loss_fn(out, y[i : i + batch_size]))
        correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    n = len(x)
    return EvalStats(total / n if n else float("nan"), correct / n if n else 0.0, n)
